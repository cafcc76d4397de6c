//! Central finite-difference checks of analytic gradients.
//!
//! A gradient that is merely `Some` proves nothing — Candle's fused ops return partial
//! gradients without complaint. This compares the analytic directional derivative
//! ⟨∇f, d⟩ (from `backward`) with the central difference (f(θ+εd) − f(θ−εd)) / 2ε along random
//! unit-variance directions d drawn from a fixed seed. Run it in f64: in f32 the central
//! difference itself is only good to ~1e-3.

use crate::rng::SplitMix64;
use candle_core::{DType, Result, Tensor, Var};

/// One directional comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DirectionalCheck {
    /// ⟨∇f, d⟩ from backpropagation.
    pub analytic: f64,
    /// (f(θ+εd) − f(θ−εd)) / 2ε.
    pub numeric: f64,
    /// |analytic − numeric| / max(|analytic|, |numeric|, floor).
    pub rel_error: f64,
    pub abs_error: f64,
}

/// The outcome over all directions, plus which vars backward did not reach at all.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GradCheckReport {
    pub checks: Vec<DirectionalCheck>,
    /// Indices (into the `vars` slice) of vars that got no gradient from backward.
    pub vars_without_grad: Vec<usize>,
    pub eps: f64,
}

impl GradCheckReport {
    /// The worst relative error over all directions.
    pub fn max_rel_error(&self) -> f64 {
        self.checks.iter().map(|c| c.rel_error).fold(0.0, f64::max)
    }

    /// Error unless every direction agrees to `tol` (relative).
    pub fn assert_close(&self, tol: f64, what: &str) -> anyhow::Result<()> {
        let worst = self.max_rel_error();
        if worst <= tol && worst.is_finite() {
            Ok(())
        } else {
            anyhow::bail!(
                "gradient check failed for {what}: max relative error {worst:.3e} > {tol:.1e}\n{}",
                self.checks
                    .iter()
                    .map(|c| format!(
                        "  analytic {:+.10e}  numeric {:+.10e}  rel {:.3e}",
                        c.analytic, c.numeric, c.rel_error
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        }
    }
}

/// Options for [`check_directional`].
#[derive(Clone, Debug)]
pub struct GradCheckOptions {
    /// Finite-difference step along a unit-variance direction.
    pub eps: f64,
    /// Number of random directions.
    pub directions: usize,
    /// Seed of the directions.
    pub seed: u64,
    /// Denominator floor of the relative error, so two values that are both ~0 compare as equal.
    pub floor: f64,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        Self { eps: 1e-5, directions: 3, seed: 0, floor: 1e-10 }
    }
}

/// Compares ⟨∇f, d⟩ with central differences along `opts.directions` random directions d, each
/// perturbing all `vars` at once. `f` must return a scalar (any shape with one element) and be a
/// pure function of the vars' current values. The vars are restored afterwards.
pub fn check_directional<F>(vars: &[Var], f: F, opts: &GradCheckOptions) -> Result<GradCheckReport>
where
    F: Fn() -> Result<Tensor>,
{
    let loss = f()?;
    let grads = loss.backward()?;
    let vars_without_grad: Vec<usize> =
        vars.iter().enumerate().filter(|(_, v)| grads.get(v.as_tensor()).is_none()).map(|(i, _)| i).collect();
    let originals: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<_>>()?;
    let mut rng = SplitMix64::new(opts.seed);
    let mut checks = Vec::with_capacity(opts.directions);
    for _ in 0..opts.directions {
        let mut dirs = Vec::with_capacity(vars.len());
        let mut analytic = 0.0;
        for v in vars {
            let d = rng.normal_tensor(v.shape(), v.dtype(), v.device())?;
            if let Some(g) = grads.get(v.as_tensor()) {
                analytic += scalar_f64(&(g * &d)?.sum_all()?)?;
            }
            dirs.push(d);
        }
        let eval_at = |sign: f64| -> Result<f64> {
            for ((v, o), d) in vars.iter().zip(&originals).zip(&dirs) {
                v.set(&(o + (d * (sign * opts.eps))?)?)?;
            }
            scalar_f64(&f()?.detach())
        };
        let plus = eval_at(1.0)?;
        let minus = eval_at(-1.0)?;
        for (v, o) in vars.iter().zip(&originals) {
            v.set(o)?;
        }
        let numeric = (plus - minus) / (2.0 * opts.eps);
        let abs_error = (analytic - numeric).abs();
        let rel_error = abs_error / analytic.abs().max(numeric.abs()).max(opts.floor);
        checks.push(DirectionalCheck { analytic, numeric, rel_error, abs_error });
    }
    Ok(GradCheckReport { checks, vars_without_grad, eps: opts.eps })
}

/// The single value of a one-element tensor as f64.
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()
}
