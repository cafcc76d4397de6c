//! Central finite-difference checks of analytic gradients, **per variable**.
//!
//! A gradient that is merely `Some` proves nothing — Candle's fused ops return partial
//! gradients without complaint. [`check_gradients`] compares the analytic directional derivative
//! ⟨∇f, d⟩ (from `backward`) with the central difference (f(θ+εd) − f(θ−εd)) / 2ε along random
//! unit-variance directions d drawn from a fixed seed:
//!
//! * once per variable, moving that variable alone (its own directions, its own relative error,
//!   reported by its name) — a wrong gradient in a small tensor (a bias, a norm's gain) changes a
//!   joint directional derivative by only its share of the total and can hide under the large
//!   tensors; alone, it cannot (test `a_wrong_bias_gradient_hides_from_the_joint_check_only`);
//! * and jointly, all variables moved together, which also covers cross terms of the
//!   perturbation.
//!
//! The relative error of a direction is taken against the larger of the two derivatives and of
//! ‖∇f‖ over the moved variables — the root-mean-square of ⟨∇f, d⟩ over unit-variance
//! directions. Without that term, a direction that happens to be nearly orthogonal to the
//! gradient divides the finite difference's own round-off by a near-zero derivative (measured on
//! the LAPO actor: ⟨∇f, d⟩ = 7.8e-7 where ‖∇f‖ ~ 1e-4, relative error 6.8e-4 from an absolute
//! error of 5e-10, the same as every other direction's).
//!
//! Run it in f64: in f32 the central difference itself is only good to ~1e-3.

use std::fmt::Write as _;

use crate::rng::SplitMix64;
use candle_core::{DType, Result, Tensor, Var};

/// One directional comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DirectionalCheck {
    /// ⟨∇f, d⟩ from backpropagation.
    pub analytic: f64,
    /// (f(θ+εd) − f(θ−εd)) / 2ε.
    pub numeric: f64,
    /// ‖∇f‖ over the moved variables: the root-mean-square of ⟨∇f, d⟩ over directions.
    pub grad_norm: f64,
    /// |analytic − numeric| / max(|analytic|, |numeric|, grad_norm, floor).
    pub rel_error: f64,
    pub abs_error: f64,
}

/// The checks of one variable, moved on its own.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VarCheck {
    pub name: String,
    pub elements: usize,
    /// Whether backward produced a gradient for it at all.
    pub has_grad: bool,
    pub checks: Vec<DirectionalCheck>,
}

impl VarCheck {
    pub fn max_rel_error(&self) -> f64 {
        max_rel(&self.checks)
    }
}

/// The outcome of [`check_gradients`]: every variable alone, then all together.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GradCheckReport {
    pub per_var: Vec<VarCheck>,
    /// All variables moved together along one direction each.
    pub joint: Vec<DirectionalCheck>,
    pub eps: f64,
}

fn max_rel(checks: &[DirectionalCheck]) -> f64 {
    // NaN must not vanish in a max: report it as infinite.
    checks.iter().map(|c| if c.rel_error.is_nan() { f64::INFINITY } else { c.rel_error }).fold(0.0, f64::max)
}

impl GradCheckReport {
    /// Names of the variables backward did not reach at all.
    pub fn vars_without_grad(&self) -> Vec<&str> {
        self.per_var.iter().filter(|v| !v.has_grad).map(|v| v.name.as_str()).collect()
    }

    /// The worst relative error over every variable's own checks and the joint ones.
    pub fn max_rel_error(&self) -> f64 {
        self.per_var.iter().map(VarCheck::max_rel_error).fold(max_rel(&self.joint), f64::max)
    }

    /// The worst relative error of the joint checks alone (what a joint-only check would see).
    pub fn joint_max_rel_error(&self) -> f64 {
        max_rel(&self.joint)
    }

    /// The variable with the worst relative error, and that error.
    pub fn worst_var(&self) -> Option<(&str, f64)> {
        self.per_var.iter().map(|v| (v.name.as_str(), v.max_rel_error())).fold(None, |best, cur| match best {
            Some((_, e)) if e >= cur.1 => best,
            _ => Some(cur),
        })
    }

    /// The smallest |derivative| (analytic or numeric, whichever is larger) of any check: a
    /// check whose derivative is ~0 on both sides proves nothing, so tests bound this below.
    pub fn min_abs_derivative(&self) -> f64 {
        self.per_var
            .iter()
            .flat_map(|v| v.checks.iter())
            .chain(&self.joint)
            .map(|c| c.analytic.abs().max(c.numeric.abs()))
            .fold(f64::INFINITY, f64::min)
    }

    /// Error unless every variable's checks and the joint checks agree to `tol` (relative), and
    /// no variable was missed by backward while moving it changes the value.
    pub fn assert_close(&self, tol: f64, what: &str) -> anyhow::Result<()> {
        let worst = self.max_rel_error();
        if worst <= tol {
            Ok(())
        } else {
            anyhow::bail!(
                "gradient check failed for {what}: max relative error {worst:.3e} > {tol:.1e}\n{}",
                self.table()
            )
        }
    }

    /// Error unless every check's derivative is at least `min_abs` in magnitude, naming the
    /// variable that is not: a check of a value the variable barely moves proves nothing.
    pub fn assert_nondegenerate(&self, min_abs: f64, what: &str) -> anyhow::Result<()> {
        for v in &self.per_var {
            for c in &v.checks {
                if c.analytic.abs().max(c.numeric.abs()) < min_abs {
                    anyhow::bail!(
                        "degenerate gradient check for {what}: variable '{}' moves the value by |d| < {min_abs:.1e}\n{}",
                        v.name,
                        self.table()
                    );
                }
            }
        }
        Ok(())
    }

    /// One line per check: variable, elements, analytic, numeric, ‖∇f‖, relative error.
    pub fn table(&self) -> String {
        let mut s = format!(
            "  {:<48} {:>9} {:>18} {:>18} {:>10} {:>10}\n",
            "variable", "elements", "analytic", "numeric", "|grad|", "rel"
        );
        let mut line = |name: &str, elements: String, c: &DirectionalCheck| {
            let _ = writeln!(
                s,
                "  {name:<48} {elements:>9} {:>+18.10e} {:>+18.10e} {:>10.3e} {:>10.3e}",
                c.analytic, c.numeric, c.grad_norm, c.rel_error
            );
        };
        for v in &self.per_var {
            let name = if v.has_grad { v.name.clone() } else { format!("{} (no gradient)", v.name) };
            for c in &v.checks {
                line(&name, v.elements.to_string(), c);
            }
        }
        let total: usize = self.per_var.iter().map(|v| v.elements).sum();
        for c in &self.joint {
            line("(all jointly)", total.to_string(), c);
        }
        s
    }
}

/// Options for [`check_gradients`].
#[derive(Clone, Debug)]
pub struct GradCheckOptions {
    /// Finite-difference step along a unit-variance direction.
    pub eps: f64,
    /// Number of random directions per variable, and for the joint check.
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

/// Checks the gradient of `f` with respect to each named variable on its own (`opts.directions`
/// random directions moving only that variable) and then jointly (as many directions moving all
/// of them). `f` must return a scalar (any shape with one element) and be a pure function of the
/// vars' current values; it is evaluated 2·directions·(vars + 1) times. The vars are restored
/// afterwards.
///
/// A variable that backward does not reach is checked too, with an analytic derivative of 0: if
/// it does move the value, its relative error is 1.
pub fn check_gradients<S, F>(vars: &[(S, Var)], f: F, opts: &GradCheckOptions) -> Result<GradCheckReport>
where
    S: AsRef<str>,
    F: Fn() -> Result<Tensor>,
{
    let loss = f()?;
    let grads = loss.backward()?;
    let grads: Vec<Option<Tensor>> = vars.iter().map(|(_, v)| grads.get(v.as_tensor()).cloned()).collect();
    drop(loss);
    let grad_sq_norms: Vec<f64> = grads
        .iter()
        .map(|g| g.as_ref().map_or(Ok(0.0), |g| scalar_f64(&g.sqr()?.sum_all()?)))
        .collect::<Result<_>>()?;
    let originals: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<Result<_>>()?;
    let mut rng = SplitMix64::new(opts.seed);

    // One direction: `dirs[i]` moves var i (None: var i stays).
    let check_along = |dirs: &[Option<Tensor>]| -> Result<DirectionalCheck> {
        let mut analytic = 0.0;
        let mut grad_sq_norm = 0.0;
        for ((d, g), sq) in dirs.iter().zip(&grads).zip(&grad_sq_norms) {
            if let (Some(d), Some(g)) = (d, g) {
                analytic += scalar_f64(&(g * d)?.sum_all()?)?;
                grad_sq_norm += sq;
            }
        }
        let grad_norm = grad_sq_norm.sqrt();
        let eval_at = |sign: f64| -> Result<f64> {
            for (((_, v), o), d) in vars.iter().zip(&originals).zip(dirs) {
                if let Some(d) = d {
                    v.set(&(o + (d * (sign * opts.eps))?)?)?;
                }
            }
            let value = scalar_f64(&f()?.detach());
            for (((_, v), o), d) in vars.iter().zip(&originals).zip(dirs) {
                if d.is_some() {
                    v.set(o)?;
                }
            }
            value
        };
        let plus = eval_at(1.0)?;
        let minus = eval_at(-1.0)?;
        let numeric = (plus - minus) / (2.0 * opts.eps);
        let abs_error = (analytic - numeric).abs();
        let rel_error = abs_error / analytic.abs().max(numeric.abs()).max(grad_norm).max(opts.floor);
        Ok(DirectionalCheck { analytic, numeric, grad_norm, rel_error, abs_error })
    };

    let mut per_var = Vec::with_capacity(vars.len());
    for (i, (name, v)) in vars.iter().enumerate() {
        let mut checks = Vec::with_capacity(opts.directions);
        for _ in 0..opts.directions {
            let dirs: Vec<Option<Tensor>> = (0..vars.len())
                .map(|j| if j == i { rng.normal_tensor(v.shape(), v.dtype(), v.device()).map(Some) } else { Ok(None) })
                .collect::<Result<_>>()?;
            checks.push(check_along(&dirs)?);
        }
        per_var.push(VarCheck {
            name: name.as_ref().to_string(),
            elements: v.elem_count(),
            has_grad: grads[i].is_some(),
            checks,
        });
    }
    let mut joint = Vec::with_capacity(opts.directions);
    for _ in 0..opts.directions {
        let dirs: Vec<Option<Tensor>> = vars
            .iter()
            .map(|(_, v)| rng.normal_tensor(v.shape(), v.dtype(), v.device()).map(Some))
            .collect::<Result<_>>()?;
        joint.push(check_along(&dirs)?);
    }
    Ok(GradCheckReport { per_var, joint, eps: opts.eps })
}

/// The single value of a one-element tensor as f64.
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests;
