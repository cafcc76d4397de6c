//! Euler (DDIM) in data-prediction form: first order.

use candle_core::{Result, Tensor};

use super::{euler_update, Solver, StepContext};

#[derive(Clone, Copy, Debug, Default)]
pub struct Euler;

impl Solver for Euler {
    fn name(&self) -> &'static str {
        "euler"
    }

    fn step(&self, ctx: &StepContext, i: usize, x: &Tensor, _state: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let (s, t) = (ctx.eval_sigmas[i], ctx.sigmas[i + 1]);
        let d = ctx.denoise(x, s)?;
        Ok((euler_update(x, &d, s, t)?, Vec::new()))
    }
}
