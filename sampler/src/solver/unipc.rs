//! UniPC (Zhao et al. 2023), B(h) = e^{h}−1 ("bh2"), order 2, data prediction — the solver of
//! Cosmos Predict2.5's flow models, written in EDM coordinates where λ = −ln σ (dividing
//! diffusers' update by α_t turns it into exactly this form, so one code serves flow and EDM
//! schedules).
//!
//! Step i (x_i is the *predicted* sample at σ_i):
//! 1. m_i = D(x_i, σ_i);
//! 2. corrector UniC (if i > 0 and no churn at i): re-does the step from the previous sample
//!    using m_i, giving x_i^c — no extra network call;
//! 3. predictor UniP from x_i^c with m_i and m_{i−1} (order 1 at i = 0 and when σ_{i+1} = 0).
//!
//! State after step i: `[x_i^c, m_i, m_{i−1}]` (the last only once it exists).

use candle_core::{Result, Tensor};

use super::{euler_update, Solver, StepContext};

#[derive(Clone, Copy, Debug, Default)]
pub struct UniPc;

/// The `b` vector of UniPC's order conditions for step size h (bh2), `order` entries.
fn b_coefficients(h: f64, order: usize) -> Vec<f64> {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::with_capacity(order);
    for k in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (k + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    b
}

/// UniP: from `x` at s0 with model output `m0` (and `m_prev` at `s_prev`, for order 2) to t.
fn predictor(x: &Tensor, m0: &Tensor, s0: f64, t: f64, prev: Option<(&Tensor, f64)>) -> Result<Tensor> {
    if t == 0.0 {
        return Ok(m0.clone());
    }
    let h = (s0 / t).ln();
    let h_phi_1 = (-h).exp_m1();
    let base = ((x * (t / s0))? - (m0 * h_phi_1)?)?;
    match prev {
        None => Ok(base),
        Some((m_prev, s_prev)) => {
            let r1 = (s0 / s_prev).ln() / h;
            let d1 = ((m_prev - m0)? / r1)?;
            // bh2 order 2 uses ρ_p = ½.
            base - (d1 * (h_phi_1 * 0.5))?
        }
    }
}

/// UniC: re-does the step from `x_last` at s0 (model output `m0`) to t given the new model
/// output `m_t` at t; order 2 also uses `m_prev` at `s_prev`.
fn corrector(
    x_last: &Tensor,
    m0: &Tensor,
    m_t: &Tensor,
    s0: f64,
    t: f64,
    prev: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    let h = (s0 / t).ln();
    let h_phi_1 = (-h).exp_m1();
    let b_h = h_phi_1;
    let base = ((x_last * (t / s0))? - (m0 * h_phi_1)?)?;
    let d1_t = (m_t - m0)?;
    match prev {
        None => base - (d1_t * (b_h * 0.5))?,
        Some((m_prev, s_prev)) => {
            let r1 = (s0 / s_prev).ln() / h;
            let b = b_coefficients(h, 2);
            // Solve [[1, 1], [r1, 1]]·ρ = b.
            let rho0 = (b[0] - b[1]) / (1.0 - r1);
            let rho1 = b[0] - rho0;
            let d1 = ((m_prev - m0)? / r1)?;
            base - (((d1 * rho0)? + (d1_t * rho1)?)? * b_h)?
        }
    }
}

impl Solver for UniPc {
    fn name(&self) -> &'static str {
        "unipc"
    }

    fn step(&self, ctx: &StepContext, i: usize, x: &Tensor, state: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let (s, t) = (ctx.eval_sigmas[i], ctx.sigmas[i + 1]);
        let m = ctx.denoise(x, s)?;
        if i == 0 || state.len() < 2 {
            let next = euler_update(x, &m, s, t)?;
            return Ok((next, vec![x.clone(), m]));
        }
        let (x_last, m_prev) = (&state[0], &state[1]);
        let s_prev = ctx.eval_sigmas[i - 1];
        let corrected = if ctx.churned(i) {
            // The churned sample is off the path the corrector interpolates; skip it there
            // (as diffusers' `disable_corrector`).
            x.clone()
        } else {
            let older = state.get(2).map(|m2| (m2, ctx.eval_sigmas[i - 2]));
            corrector(x_last, m_prev, &m, s_prev, s, older)?
        };
        let next = predictor(&corrected, &m, s, t, Some((m_prev, s_prev)))?;
        Ok((next, vec![corrected, m, m_prev.clone()]))
    }
}
