//! Noise modes, churn, and the noise tensors a trajectory is a function of.
//!
//! The source system had three modes that were identical in effect, because nothing ever
//! injected noise. Here injection is Cosmos/EDM churn (the only injection `res_sampler` has):
//! before step i, if S_min < σ_i < S_max, η = min(S_churn/(N+1), √1.2 − 1), σ̂ = (1+η)·σ_i and
//! x ← x + S_noise·√(σ̂² − σ_i²)·ξ_i. The modes differ in what ξ_i is:
//!
//! * `ode`: no injection at all (churn is off; the trajectory is the probability-flow ODE);
//! * `sde`: ξ_i drawn once from the seed and held fixed while z0 is optimised;
//! * `sde-learnable`: every ξ_i is a `Var` optimised together with z0 (DNO).

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::rng::SplitMix64;

/// How per-step noise is injected and whether it is learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseMode {
    Ode,
    Sde,
    SdeLearnable,
}

impl NoiseMode {
    pub const ALLOWED: &'static [&'static str] = &["ode", "sde", "sde-learnable"];

    pub fn injects(self) -> bool {
        self != Self::Ode
    }

    pub fn learns_step_noise(self) -> bool {
        self == Self::SdeLearnable
    }
}

/// Churn parameters (EDM's S_churn, S_min, S_max, S_noise).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Churn {
    pub s_churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
}

/// Cosmos caps η at √1.2 − 1 (EDM's paper uses √2 − 1).
pub const COSMOS_ETA_CAP: f64 = 0.095_445_115_010_332_2;

impl Default for Churn {
    fn default() -> Self {
        Self { s_churn: 0.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 }
    }
}

/// Per step: the level the denoiser is evaluated at, and the coefficient of ξ_i (0 = no noise).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChurnPlan {
    pub eval_sigmas: Vec<f64>,
    pub noise_scales: Vec<f64>,
}

impl Churn {
    /// The plan for a schedule σ_0..σ_N; `enabled = false` (ODE mode) gives no injection.
    pub fn plan(&self, sigmas: &[f64], enabled: bool) -> ChurnPlan {
        let n = sigmas.len() - 1;
        let eta = (self.s_churn / (n as f64 + 1.0)).min(COSMOS_ETA_CAP);
        let mut eval_sigmas = Vec::with_capacity(n);
        let mut noise_scales = Vec::with_capacity(n);
        for &s in &sigmas[..n] {
            if enabled && eta > 0.0 && self.s_tmin < s && s < self.s_tmax {
                let s_hat = (1.0 + eta) * s;
                eval_sigmas.push(s_hat);
                noise_scales.push(self.s_noise * (s_hat * s_hat - s * s).sqrt());
            } else {
                eval_sigmas.push(s);
                noise_scales.push(0.0);
            }
        }
        ChurnPlan { eval_sigmas, noise_scales }
    }
}

/// A tensor that is either optimised (`Var`) or held fixed.
#[derive(Clone, Debug)]
pub enum NoiseTensor {
    Fixed(Tensor),
    Learnable(Var),
}

impl NoiseTensor {
    pub fn tensor(&self) -> Tensor {
        match self {
            Self::Fixed(t) => t.clone(),
            Self::Learnable(v) => v.as_tensor().clone(),
        }
    }

    pub fn var(&self) -> Option<&Var> {
        match self {
            Self::Learnable(v) => Some(v),
            Self::Fixed(_) => None,
        }
    }
}

/// Everything random a trajectory depends on: z0 and one ξ_i per churned step.
#[derive(Clone, Debug)]
pub struct NoiseState {
    pub z0: NoiseTensor,
    /// `None` where step i injects nothing.
    pub steps: Vec<Option<NoiseTensor>>,
}

impl NoiseState {
    /// Seeded draws: z0 from `SplitMix64(seed)`, the step noises from a second stream so that
    /// z0 is the same in every mode. `learn_z0` makes z0 a `Var`; the step noises are `Var`s in
    /// `sde-learnable` and fixed in `sde`.
    pub fn draw(
        seed: u64,
        shape: &[usize],
        plan: &ChurnPlan,
        mode: NoiseMode,
        learn_z0: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let z0 = SplitMix64::new(seed).normal_tensor(shape, dtype, device)?;
        let z0 = if learn_z0 { NoiseTensor::Learnable(Var::from_tensor(&z0)?) } else { NoiseTensor::Fixed(z0) };
        let mut step_rng = SplitMix64::new(seed ^ 0x5EED_0000_57E9_0001);
        let mut steps = Vec::with_capacity(plan.noise_scales.len());
        for &scale in &plan.noise_scales {
            // Draw for every step regardless, so the noise of step i does not depend on which
            // other steps churn.
            let xi = step_rng.normal_tensor(shape, dtype, device)?;
            steps.push(match (mode.injects() && scale > 0.0, mode.learns_step_noise()) {
                (false, _) => None,
                (true, false) => Some(NoiseTensor::Fixed(xi)),
                (true, true) => Some(NoiseTensor::Learnable(Var::from_tensor(&xi)?)),
            });
        }
        Ok(Self { z0, steps })
    }

    /// The current values (z0, ξ_i) as plain tensors.
    pub fn tensors(&self) -> (Tensor, Vec<Option<Tensor>>) {
        (self.z0.tensor(), self.steps.iter().map(|s| s.as_ref().map(NoiseTensor::tensor)).collect())
    }

    /// All learnable tensors with names: `z0`, `xi.{i}`.
    pub fn learnable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Some(v) = self.z0.var() {
            out.push(("z0".to_string(), v.clone()));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if let Some(v) = s.as_ref().and_then(NoiseTensor::var) {
                out.push((format!("xi.{i:03}"), v.clone()));
            }
        }
        out
    }
}
