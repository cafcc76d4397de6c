//! Noise modes, churn, and the noise tensors a trajectory is a function of.
//!
//! The source system had three modes that were identical in effect, because nothing ever
//! injected noise. Here injection is Cosmos/EDM churn (the only injection `res_sampler` has):
//! before step i, if S_min < σ_i < S_max, η = min(S_churn/(N+1), √1.2 − 1), σ̂ = (1+η)·σ_i and
//! x ← x + S_noise·√(σ̂² − σ_i²)·ξ_i. The modes differ in what ξ_i is:
//!
//! * `ode`: no injection at all (churn is off; the trajectory is the probability-flow ODE);
//! * `sde`: ξ_i drawn once from the seed and held fixed while z0 is optimised;
//! * `sde-learnable`: every ξ_i is a `Var` optimised together with z0 (DNO);
//! * `sde-from-z0`: every ξ_i is a fixed, seeded, norm-preserving function of z0,
//!   ξ_i = Q_i z0 with Q_i a [`SignedPermutation`] ([`StepNoiseFromZ0`]); z0 is the only learned
//!   tensor and its gradient includes the paths through every ξ_i (the source's
//!   `LEARNABLE_STEP_NOISE=1`: z0 → step noise → video).

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::rng::SplitMix64;

/// How per-step noise is injected and whether it is learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseMode {
    Ode,
    Sde,
    SdeLearnable,
    SdeFromZ0,
}

impl NoiseMode {
    pub const ALLOWED: &'static [&'static str] = &["ode", "sde", "sde-learnable", "sde-from-z0"];

    /// The name in params files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ode => "ode",
            Self::Sde => "sde",
            Self::SdeLearnable => "sde-learnable",
            Self::SdeFromZ0 => "sde-from-z0",
        }
    }

    pub fn injects(self) -> bool {
        self != Self::Ode
    }

    pub fn learns_step_noise(self) -> bool {
        self == Self::SdeLearnable
    }

    /// ξ_i = Q_i z0 rather than a tensor of its own.
    pub fn derives_step_noise_from_z0(self) -> bool {
        self == Self::SdeFromZ0
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

/// A signed permutation Q of the n entries of a sample: (Q x)[k] = s_k · x[π(k)], s_k = ±1.
///
/// Why this map for ξ_i = Q_i z0: it is orthogonal and preserves every norm *exactly* (it only
/// moves entries and flips signs, no arithmetic, so not even rounding); it costs one gather and
/// one multiply, O(n) time and memory, for any n (no power-of-two or dense n×n matrix); its
/// transpose is the inverse gather. For z0 ~ N(0, I) every ξ_i is exactly N(0, I), and the
/// cross-covariances E[ξ_i z0ᵀ] = Q_i and E[ξ_i ξ_jᵀ] = Q_i Q_jᵀ are signed permutations whose
/// diagonals are zero except at fixed points (about one per map, each with a random sign), so
/// the elementwise correlation of ξ_i with z0 and with ξ_j is 0 in expectation, and ξ_i[k]
/// depends on a *different* entry of z0 than x_0[k] = σ_0 z0[k] does. A denser orthogonal mix
/// cannot do better on second moments — ‖Cov(ξ_i, z0)‖_F² = n for every orthogonal Q — and a
/// Householder reflection I − 2vvᵀ alone is a rank-one change of the identity (ξ ≈ z0), while
/// butterfly/Givens networks need n a power of two (padding breaks orthogonality) or log n
/// gathers, with rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedPermutation {
    /// π: output k reads input `perm[k]`.
    pub perm: Vec<u32>,
    /// s_k ∈ {−1.0, +1.0} (exact in every float dtype).
    pub signs: Vec<f32>,
}

/// Uniform in [0, n), n ≥ 1, without bias: Lemire's multiply-shift with rejection ("Fast random
/// integer generation in an interval", 2019), which divides only in the rare rejection branch.
fn uniform_below(rng: &mut SplitMix64, n: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

impl SignedPermutation {
    /// π by an unbiased Fisher–Yates shuffle and independent fair signs, both from
    /// `SplitMix64(seed)` (uniform over the n! permutations as far as a 64-bit seed can reach:
    /// all of them for n ≤ 20): a pure function of (seed, n), generated on the host, so it is
    /// the same on every device and run. O(n) time; ~0.4 s for n = 10⁷ on a busy 2-core CPU.
    pub fn seeded(seed: u64, n: usize) -> Result<Self> {
        if n == 0 || n > u32::MAX as usize {
            candle_core::bail!("a signed permutation needs 1 ≤ n ≤ {} entries, got {n}", u32::MAX);
        }
        let mut rng = SplitMix64::new(seed);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for k in (1..n).rev() {
            let j = uniform_below(&mut rng, k as u64 + 1) as usize;
            perm.swap(k, j);
        }
        let mut signs = Vec::with_capacity(n);
        while signs.len() < n {
            let bits = rng.next_u64();
            signs.extend((0..64.min(n - signs.len())).map(|b| if (bits >> b) & 1 == 1 { -1.0f32 } else { 1.0 }));
        }
        Ok(Self { perm, signs })
    }

    /// n, the entries of one sample.
    pub fn len(&self) -> usize {
        self.perm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.perm.is_empty()
    }

    /// π⁻¹.
    pub fn inverse_perm(&self) -> Vec<u32> {
        let mut inv = vec![0u32; self.perm.len()];
        for (k, &p) in self.perm.iter().enumerate() {
            inv[p as usize] = k as u32;
        }
        inv
    }

    /// `x` as rows of n entries: every row (sample) gets the same map.
    fn rows(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.len();
        if !x.elem_count().is_multiple_of(n) {
            candle_core::bail!("signed permutation of {n} entries applied to a tensor of shape {:?}", x.dims());
        }
        x.reshape((x.elem_count() / n, n))
    }

    fn sign_row(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_slice(&self.signs, (1, self.len()), x.device())?.to_dtype(x.dtype())
    }

    /// Q x, row by row (a gather and a sign flip; differentiable: the gather's backward is a
    /// scatter-add).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let index = Tensor::from_slice(&self.perm, self.len(), x.device())?;
        self.rows(x)?.index_select(&index, 1)?.broadcast_mul(&self.sign_row(x)?)?.reshape(x.shape())
    }

    /// Qᵀ g: (Qᵀ g)[j] = s_{π⁻¹(j)} g[π⁻¹(j)], i.e. flip the signs, then gather with π⁻¹.
    pub fn apply_transpose(&self, g: &Tensor) -> Result<Tensor> {
        let index = Tensor::from_vec(self.inverse_perm(), self.len(), g.device())?;
        self.rows(g)?.broadcast_mul(&self.sign_row(g)?)?.index_select(&index, 1)?.reshape(g.shape())
    }
}

/// `sde-from-z0`'s step noises: ξ_i = Q_i z0 on every step that injects, with Q_i the
/// [`SignedPermutation`] seeded by (run seed, i) alone, applied to each batch element (the dims
/// after the first; a 1-D tensor is one sample) with the same map, so that a sample's noises do
/// not depend on the other samples in its batch.
#[derive(Clone, Debug, PartialEq)]
pub struct StepNoiseFromZ0 {
    pub seed: u64,
    /// Whether step i injects noise (churn scale > 0); ξ_i is formed only there.
    pub injects: Vec<bool>,
}

/// Separates this stream from z0's and from the `sde` draws of the same seed.
const FROM_Z0_STREAM: u64 = 0x5EED_0000_2E70_0002;

impl StepNoiseFromZ0 {
    pub fn new(seed: u64, plan: &ChurnPlan) -> Self {
        Self { seed, injects: plan.noise_scales.iter().map(|&s| s > 0.0).collect() }
    }

    pub fn num_steps(&self) -> usize {
        self.injects.len()
    }

    /// The seed of Q_i: SplitMix64's output on (seed, i), so neighbouring steps' streams are
    /// unrelated (seeds that differ by SplitMix64's increment would give shifted copies).
    pub fn step_seed(&self, i: usize) -> u64 {
        SplitMix64::new(self.seed ^ FROM_Z0_STREAM ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
    }

    /// The entries of one sample of a latent of `shape`.
    pub fn sample_len(shape: &[usize]) -> usize {
        match shape {
            [_, rest @ ..] if !rest.is_empty() => rest.iter().product(),
            _ => shape.iter().product(),
        }
    }

    /// Q_i for latents of `shape` (whether or not step i injects).
    pub fn map(&self, i: usize, shape: &[usize]) -> Result<SignedPermutation> {
        SignedPermutation::seeded(self.step_seed(i), Self::sample_len(shape))
    }

    /// Q_i where step i injects, `None` elsewhere.
    pub fn map_if_injecting(&self, i: usize, shape: &[usize]) -> Result<Option<SignedPermutation>> {
        match self.injects.get(i) {
            Some(true) => self.map(i, shape).map(Some),
            Some(false) => Ok(None),
            None => candle_core::bail!("no step {i}: the step noises from z0 cover {} steps", self.num_steps()),
        }
    }

    /// ξ_i = Q_i z0 (`None` where step i injects nothing); part of z0's graph if z0 has one.
    pub fn noise(&self, i: usize, z0: &Tensor) -> Result<Option<Tensor>> {
        self.map_if_injecting(i, z0.dims())?.map(|q| q.apply(z0)).transpose()
    }

    /// Every ξ_i.
    pub fn noises(&self, z0: &Tensor) -> Result<Vec<Option<Tensor>>> {
        (0..self.num_steps()).map(|i| self.noise(i, z0)).collect()
    }
}

/// Everything random a trajectory depends on: z0 and one ξ_i per churned step.
#[derive(Clone, Debug)]
pub struct NoiseState {
    pub z0: NoiseTensor,
    /// `None` where step i injects nothing — and on every step in `sde-from-z0`, where
    /// `from_z0` forms ξ_i from z0.
    pub steps: Vec<Option<NoiseTensor>>,
    /// `sde-from-z0`: ξ_i = Q_i z0.
    pub from_z0: Option<StepNoiseFromZ0>,
}

impl NoiseState {
    /// Seeded draws: z0 from `SplitMix64(seed)`, the step noises from a second stream so that
    /// z0 is the same in every mode. `learn_z0` makes z0 a `Var`; the step noises are `Var`s in
    /// `sde-learnable`, fixed in `sde`, and functions of z0 in `sde-from-z0` (nothing drawn).
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
        if mode.derives_step_noise_from_z0() {
            let steps = vec![None; plan.noise_scales.len()];
            return Ok(Self { z0, steps, from_z0: Some(StepNoiseFromZ0::new(seed, plan)) });
        }
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
        Ok(Self { z0, steps, from_z0: None })
    }

    /// The current values (z0, ξ_i). In `sde-from-z0` each ξ_i = Q_i z0 is formed here from
    /// z0's tensor, so it is part of z0's graph when z0 is a `Var`.
    pub fn values(&self) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let z0 = self.z0.tensor();
        let steps = match &self.from_z0 {
            Some(map) => map.noises(&z0)?,
            None => self.steps.iter().map(|s| s.as_ref().map(NoiseTensor::tensor)).collect(),
        };
        Ok((z0, steps))
    }

    /// [`Self::values`] for callers that cannot fail. Only `sde-from-z0` does any work here (a
    /// gather and a multiply per step on tensors that exist); a failure there is a device
    /// failure, reported by the panic — use [`Self::values`] to get it as an error.
    pub fn tensors(&self) -> (Tensor, Vec<Option<Tensor>>) {
        self.values().unwrap_or_else(|e| panic!("forming the step noises ξ_i = Q_i z0: {e}"))
    }

    /// All learnable tensors with names: `z0`, `xi.{i}` (in `sde-from-z0` only z0, if learned).
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
