//! Optimiser updates in place: Adam's moments and step, and the Polyak mix, each one pass over
//! the buffers it writes, with no temporary tensor. The tensor-op formulation they replace
//! allocated about ten full-size temporaries per parameter and step (over LAPO's 11 M parameters,
//! ~440 MB of allocations per iteration, most of the allocator's system time).
//!
//! Each computes exactly what the tensor ops compute, element by element and rounding for
//! rounding — Candle's `tensor * f64` is `affine(x, 0)`: `x · T(c) + T(0)` in the tensor's type,
//! `tensor / f64` multiplies by `T(1 / c)`, `tensor + f64` is `x · T(1) + T(c)` — so switching
//! path never changes a number (tests: bit-identical to the tensor path). CPU, f32/f64 and
//! contiguous buffers only; the callers keep the tensor path for everything else.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// Whether the in-place kernels can run on all of `tensors`: CPU, f32 or f64, one dtype,
/// contiguous, the same element count.
pub fn inplace_applicable(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else { return false };
    tensors.iter().all(|t| {
        t.device().is_cpu()
            && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
            && t.dtype() == first.dtype()
            && t.is_contiguous()
            && t.elem_count() == first.elem_count()
    })
}

/// The contiguous slice a layout addresses.
fn span(layout: &Layout) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => candle_core::bail!("in-place optimiser op on a non-contiguous buffer"),
    }
}

/// Applies `f(dst, srcs)` elementwise over f32 or f64 storages of one dtype.
macro_rules! over_floats {
    ($name:expr, $dst:expr, $dst_l:expr, [$(($src:expr, $src_l:expr)),*], |$t:ident, $d:ident, $($s:ident),*| $body:expr) => {{
        let (d0, d1) = span($dst_l)?;
        match $dst {
            CpuStorage::F32(dst) => {
                $( let CpuStorage::F32($s) = $src else { candle_core::bail!("{}: dtypes differ", $name) };
                   let $s = { let (a, b) = span($src_l)?; &$s[a..b] }; )*
                type $t = f32;
                for (i, $d) in dst[d0..d1].iter_mut().enumerate() {
                    $( let $s = $s[i]; )*
                    $body
                }
            }
            CpuStorage::F64(dst) => {
                $( let CpuStorage::F64($s) = $src else { candle_core::bail!("{}: dtypes differ", $name) };
                   let $s = { let (a, b) = span($src_l)?; &$s[a..b] }; )*
                type $t = f64;
                for (i, $d) in dst[d0..d1].iter_mut().enumerate() {
                    $( let $s = $s[i]; )*
                    $body
                }
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $name),
        }
        Ok(())
    }};
}

/// An exponential moving average in place: `m ← m·β + x·(1 − β)` with `x = g` (Adam's first
/// moment) or `x = g·g` (its second).
struct MovingAverage {
    decay: f64,
    squared: bool,
}

impl candle_core::InplaceOp2 for MovingAverage {
    fn name(&self) -> &'static str {
        "moving-average"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, g_l: &Layout) -> Result<()> {
        let (decay, rest, squared) = (self.decay, 1.0 - self.decay, self.squared);
        over_floats!(self.name(), dst, dst_l, [(g, g_l)], |T, m, g| {
            let x = if squared { g * g } else { g };
            *m = (*m * decay as T + 0.0) + (x * rest as T + 0.0);
        })
    }
}

/// Adam's parameter step in place from its updated moments (bias-corrected):
/// `θ ← θ − lr·m̂/(√v̂ + ε) [− lr·wd·θ]`.
struct AdamApply {
    lr: f64,
    inv_bias1: f64,
    inv_bias2: f64,
    eps: f64,
    /// Decoupled weight decay (AdamW) when > 0.
    weight_decay: f64,
}

impl candle_core::InplaceOp3 for AdamApply {
    fn name(&self) -> &'static str {
        "adam-apply"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let c = self;
        let decay = c.lr * c.weight_decay;
        let decayed = c.weight_decay > 0.0;
        over_floats!(c.name(), dst, dst_l, [(m, m_l), (v, v_l)], |T, theta, m, v| {
            let m_hat = m * c.inv_bias1 as T + 0.0;
            let v_hat = v * c.inv_bias2 as T + 0.0;
            let update = m_hat / (v_hat.sqrt() * 1.0 + c.eps as T);
            let mut next = *theta - (update * c.lr as T + 0.0);
            if decayed {
                next -= *theta * decay as T + 0.0;
            }
            *theta = next;
        })
    }
}

/// The Polyak mix in place: `target ← target·(1 − τ) + online·τ`.
struct PolyakMix {
    tau: f64,
}

impl candle_core::InplaceOp2 for PolyakMix {
    fn name(&self) -> &'static str {
        "polyak-mix"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, online: &CpuStorage, online_l: &Layout) -> Result<()> {
        let (keep, take) = (1.0 - self.tau, self.tau);
        over_floats!(self.name(), dst, dst_l, [(online, online_l)], |T, target, online| {
            *target = (*target * keep as T + 0.0) + (online * take as T + 0.0);
        })
    }
}

/// Hyperparameters of one Adam step (`t` ≥ 1 is the step number, for the bias corrections).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: i32,
}

/// One Adam(W) step in place on CPU f32/f64 contiguous buffers (check [`inplace_applicable`]):
/// the moments `m`, `v` and the parameter `theta` are overwritten, `g` is read. Three passes, no
/// allocation.
pub fn adam_step_inplace(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, step: AdamStep) -> Result<()> {
    m.inplace_op2(g, &MovingAverage { decay: step.beta1, squared: false })?;
    v.inplace_op2(g, &MovingAverage { decay: step.beta2, squared: true })?;
    let apply = AdamApply {
        lr: step.lr,
        inv_bias1: 1.0 / (1.0 - step.beta1.powi(step.t)),
        inv_bias2: 1.0 / (1.0 - step.beta2.powi(step.t)),
        eps: step.eps,
        weight_decay: step.weight_decay,
    };
    theta.inplace_op3(m, v, &apply)
}

/// `target ← target·(1 − τ) + online·τ` in place (check [`inplace_applicable`]).
pub fn polyak_inplace(target: &Tensor, online: &Tensor, tau: f64) -> Result<()> {
    target.inplace_op2(online, &PolyakMix { tau })
}
