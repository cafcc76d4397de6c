//! Solvers: one step of the probability-flow ODE in EDM coordinates, behind one trait.
//!
//! A step is a pure function `(x_i, state_i) → (x_{i+1}, state_{i+1})`. Multistep solvers keep
//! earlier denoiser outputs in `state` (RES: `D_{i−1}`; UniPC: the last sample and two model
//! outputs), so the per-step recomputation backward in [`crate::trajectory`] can rebuild any
//! one step from stored tensors alone and carry the adjoint of the state as well as of `x`.

use candle_core::{Result, Tensor};

use crate::denoiser::{uniform_sigma, Conditioning, Denoiser};

pub mod euler;
pub mod res;
pub mod unipc;

pub use euler::Euler;
pub use res::Res;
pub use unipc::UniPc;

/// What a step may look at besides its inputs.
pub struct StepContext<'a> {
    pub denoiser: &'a dyn Denoiser,
    pub cond: &'a Conditioning,
    /// The schedule σ_0 … σ_N.
    pub sigmas: &'a [f64],
    /// The noise level at which step j evaluates the denoiser: σ_j, or σ̂_j = (1+η)σ_j where
    /// churn raised it (j = 0 … N−1).
    pub eval_sigmas: &'a [f64],
}

impl StepContext<'_> {
    /// D(x, σ) at one noise level for every frame.
    pub fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        self.denoiser.denoise(x, &uniform_sigma(x, sigma)?, self.cond)
    }

    /// Whether churn injected noise before step `i` (multistep correctors skip such steps).
    pub fn churned(&self, i: usize) -> bool {
        self.eval_sigmas[i] != self.sigmas[i]
    }
}

/// One solver step. `x` is the sample at `ctx.eval_sigmas[i]` (churn already applied);
/// the result is the sample at `ctx.sigmas[i + 1]` and the state the next step needs.
pub trait Solver {
    fn name(&self) -> &'static str;

    fn step(&self, ctx: &StepContext, i: usize, x: &Tensor, state: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)>;
}

/// Which solver, as named in params files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SolverKind {
    Euler,
    Res,
    Unipc,
}

impl SolverKind {
    pub const ALLOWED: &'static [&'static str] = &["euler", "res", "unipc"];

    pub fn build(self) -> Box<dyn Solver> {
        match self {
            Self::Euler => Box::new(Euler),
            Self::Res => Box::new(Res),
            Self::Unipc => Box::new(UniPc),
        }
    }
}

/// The first-order data-prediction step every solver falls back to (and takes exactly when the
/// target level is 0): x ← (t/s)·x + (1 − t/s)·D.
pub fn euler_update(x: &Tensor, d: &Tensor, s: f64, t: f64) -> Result<Tensor> {
    if t == 0.0 {
        return Ok(d.clone());
    }
    let r = t / s;
    (x * r)? + (d * (1.0 - r))?
}
