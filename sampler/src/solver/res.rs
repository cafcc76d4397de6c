//! RES 2-step exponential Adams–Bashforth, as Cosmos' `res_sampler`: Euler for the first step,
//! then with h = ln(s/t), c = ln(s/s_prev)/h, φ1(z) = (e^z−1)/z, φ2(z) = (φ1(z)−1)/z,
//! b2 = φ2(−h)/c, b1 = φ1(−h) − b2:  x ← e^{−h}·x + h·(b1·D_i + b2·D_{i−1}).
//! State: `[D_i]` — the adjoint of D_{i−1} flows back through it. Second order.

use candle_core::{Result, Tensor};

use super::{euler_update, Solver, StepContext};

#[derive(Clone, Copy, Debug, Default)]
pub struct Res;

/// φ1(z) = (e^z − 1)/z with expm1 so small |z| keeps its digits.
pub fn phi1(z: f64) -> f64 {
    if z == 0.0 {
        1.0
    } else {
        z.exp_m1() / z
    }
}

/// φ2(z) = (φ1(z) − 1)/z (limit ½ at 0; series below 1e-4 to avoid cancellation).
pub fn phi2(z: f64) -> f64 {
    if z.abs() < 1e-4 {
        0.5 + z / 6.0 + z * z / 24.0
    } else {
        (phi1(z) - 1.0) / z
    }
}

/// The RES coefficients (e^{−h}, h·b1, h·b2) for a step s → t with previous level s_prev.
pub fn res_coefficients(s: f64, t: f64, s_prev: f64) -> (f64, f64, f64) {
    let h = (s / t).ln();
    let c = (s / s_prev).ln() / h;
    let b2 = phi2(-h) / c;
    let b1 = phi1(-h) - b2;
    ((-h).exp(), h * b1, h * b2)
}

impl Solver for Res {
    fn name(&self) -> &'static str {
        "res"
    }

    fn step(&self, ctx: &StepContext, i: usize, x: &Tensor, state: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let (s, t) = (ctx.eval_sigmas[i], ctx.sigmas[i + 1]);
        let d = ctx.denoise(x, s)?;
        let next = match state.first() {
            // A step to σ = 0 has h = ∞; its limit is x ← D (the Euler step), as for i = 0.
            Some(d_prev) if i > 0 && t > 0.0 => {
                let (decay, w_cur, w_prev) = res_coefficients(s, t, ctx.eval_sigmas[i - 1]);
                ((x * decay)? + (&d * w_cur)?)?.add(&(d_prev * w_prev)?)?
            }
            _ => euler_update(x, &d, s, t)?,
        };
        Ok((next, vec![d]))
    }
}
