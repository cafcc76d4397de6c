//! Ops whose graph keeps only their input: the activations ([`super::gelu_erf`],
//! [`super::silu`]), the norms with constant (or no) affine parameters ([`super::layer_norm`],
//! [`super::rms_norm`]), RoPE with constant tables ([`super::rope_half`]) and a broadcast
//! scale-and-shift by constants ([`super::scale_shift`]).
//!
//! Composed from primitives, these keep every intermediate in the graph and their backward walks
//! the chain, with temporaries at each link. Candle also computes — and keeps in the `GradStore`
//! until the backward ends — a full-size gradient for every constant operand of a binary op (a
//! norm's weight, a RoPE table, an AdaLN scale, each broadcast to the input's size). Measured per
//! input-size N·D (f32, one op, forward + backward): exact GELU kept 5 and peaked at 26 (its erf
//! chain), a layer norm kept 3 and peaked at 20, RoPE kept 4 + left 4 constant gradients. In the
//! Cosmos DiT these made a block's backward ~150 N·D.
//!
//! Here each forward computes the same composition on the detached input — the values are
//! exactly those of the composition — and hands it to a node on the input whose backward applies
//! the closed-form vector–Jacobian product to the incoming gradient, from the input and the
//! constants:
//! * GELU (exact): d/dx x·Φ(x) = Φ(x) + x·φ(x), φ(x) = exp(−x²/2)/√(2π);
//! * SiLU: d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)));
//! * layer norm, x̂ = (x − μ)/σ, σ = √(var + ε), ḡ = g·w: x̄ = (ḡ − mean(ḡ) − x̂·mean(ḡ·x̂))/σ;
//! * RMS norm, x̂ = x/r, r = √(mean(x²) + ε): x̄ = (ḡ − x̂·mean(ḡ·x̂))/r;
//! * L2 normalisation y = x/‖x‖ (norm clamped to ≥ eps): x̄ = (g − y·Σ(g·y))/‖x‖, or g/eps where
//!   the clamp holds;
//! * RoPE: the rotation's transpose, the same rotation by −θ;
//! * scale-and-shift x·a + b: x̄ = g·a.
//!
//! When a parameter carries a gradient (a trained norm weight, learned tables) the callers use
//! the composition instead, so every gradient is still computed. Half-precision norms compute in
//! f32 forward and backward, as the composition does.

use std::sync::{Arc, Mutex};

use super::conv::{on_cpu as cpu, on_cuda as cuda, on_metal as metal, take_precomputed};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Storage, Tensor, D};

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// A node on `x` whose forward hands over `value` (computed beforehand, on the detached x) and
/// whose backward is x̄ = `backward(x, ȳ)` (both detached). Without a graph on x, the value.
pub(super) fn with_backward<B>(x: &Tensor, value: Tensor, name: &'static str, backward: B) -> Result<Tensor>
where
    B: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(value);
    }
    let op = Node { name, value: Mutex::new(Some(value)), backward: Box::new(backward) };
    x.apply_op1_arc(Arc::new(Box::new(op)))
}

struct Node {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl Node {
    fn take_value<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        take_precomputed(&self.value, pick, self.name)
    }
}

impl CustomOp1 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take_value(cpu)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.take_value(cuda)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.take_value(metal)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(&x.detach(), &grad_y.detach())?))
    }
}

// ---------------------------------------------------------------------------------------------
// Activations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Activation {
    GeluErf,
    Silu,
}

impl Activation {
    /// The value, composed from primitives.
    pub(super) fn value(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluErf => {
                let phi = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?;
                (x * 0.5)?.mul(&phi)
            }
            Activation::Silu => x.div(&(x.neg()?.exp()? + 1.0)?),
        }
    }

    fn derivative(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluErf => {
                let cdf = (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf = ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
                cdf + (x * pdf)?
            }
            Activation::Silu => {
                let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
                let inner = ((x * sigmoid.affine(-1.0, 1.0)?)? + 1.0)?;
                sigmoid * inner
            }
        }
    }

    pub(super) fn apply(self, x: &Tensor) -> Result<Tensor> {
        let name = match self {
            Activation::GeluErf => "gelu-erf",
            Activation::Silu => "silu",
        };
        with_backward(x, self.value(&x.detach())?, name, move |x, g| g * self.derivative(x)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Norms over the last dimension

/// Which norm: layer norm (centred) or RMS norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Norm {
    Layer,
    Rms,
}

/// The normalised input x̂ and 1/σ (or 1/r) per row, in `internal` precision.
fn normalised(kind: Norm, x: &Tensor, eps: f64, internal: DType) -> Result<(Tensor, Tensor)> {
    let xf = x.to_dtype(internal)?;
    let (centred, second_moment) = match kind {
        Norm::Layer => {
            let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            (centred, var)
        }
        Norm::Rms => {
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            (xf, ms)
        }
    };
    let denom = (second_moment + eps)?.sqrt()?;
    Ok((centred.broadcast_div(&denom)?, denom.recip()?))
}

/// The norm with constant weight and bias (or none): the composed value (as `super::layer_norm`
/// and `super::rms_norm` compute it), and a node whose backward is the closed form.
pub(super) fn norm(
    kind: Norm,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    internal: DType,
) -> Result<Tensor> {
    let value = {
        let xd = x.detach();
        let xf = xd.to_dtype(internal)?;
        // Exactly the composition's ops, in its order.
        let core = match kind {
            Norm::Layer => {
                let mean = xf.mean_keepdim(D::Minus1)?;
                let centred = xf.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred.broadcast_div(&(var + eps)?.sqrt()?)?
            }
            Norm::Rms => {
                let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
                xf.broadcast_div(&(ms + eps)?.sqrt()?)?
            }
        };
        let mut y = core.to_dtype(x.dtype())?;
        if let Some(w) = weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        y
    };
    let weight = weight.map(Tensor::detach);
    let name = match kind {
        Norm::Layer => "layer-norm",
        Norm::Rms => "rms-norm",
    };
    with_backward(x, value, name, move |x, g| {
        let (x_hat, inv) = normalised(kind, x, eps, internal)?;
        let mut g = g.to_dtype(internal)?;
        if let Some(w) = &weight {
            g = g.broadcast_mul(&w.to_dtype(internal)?)?;
        }
        let projection = (&g * &x_hat)?.mean_keepdim(D::Minus1)?;
        let mut grad = (g.clone() - x_hat.broadcast_mul(&projection)?)?;
        if kind == Norm::Layer {
            grad = grad.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
        }
        grad.broadcast_mul(&inv)?.to_dtype(x.dtype())
    })
}

/// `F.normalize(x, 2, dim, eps)`: x / n, n = √max(Σx², eps²) along `dim`. Where Σx² > eps²,
/// x̄ = (g − y·Σ(g·y))/n; where the norm is clamped to eps, x̄ = g/eps.
pub(super) fn l2_normalize(x: &Tensor, dim: usize, eps: f64, internal: DType) -> Result<Tensor> {
    let value = super::l2_normalize_composed(&x.detach(), dim, eps)?;
    with_backward(x, value, "l2-normalize", move |x, g| {
        let xf = x.to_dtype(internal)?;
        let squares = xf.sqr()?.sum_keepdim(dim)?;
        let norm = squares.maximum(eps * eps)?.sqrt()?;
        let y = xf.broadcast_div(&norm)?;
        let active = squares.gt(eps * eps)?.to_dtype(internal)?;
        let g = g.to_dtype(internal)?;
        let projection = ((&g * &y)?.sum_keepdim(dim)? * active)?;
        (g - y.broadcast_mul(&projection)?)?.broadcast_div(&norm)?.to_dtype(x.dtype())
    })
}

// ---------------------------------------------------------------------------------------------
// RoPE (half-split pairs) with constant tables

pub(super) fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let value = super::rope_half_composed(&x.detach(), cos, sin)?;
    let (cos, neg_sin) = (cos.detach(), sin.detach().neg()?);
    // The rotation by θ is orthogonal: its transpose is the rotation by −θ.
    with_backward(x, value, "rope-half", move |_x, g| super::rope_half_composed(g, &cos, &neg_sin))
}

// ---------------------------------------------------------------------------------------------
// Scale and shift by constants

pub(super) fn scale_shift(x: &Tensor, scale: Option<&Tensor>, shift: Option<&Tensor>) -> Result<Tensor> {
    let value = {
        let mut y = x.detach();
        if let Some(a) = scale {
            y = y.broadcast_mul(a)?;
        }
        if let Some(b) = shift {
            y = y.broadcast_add(b)?;
        }
        y
    };
    let scale = scale.map(Tensor::detach);
    with_backward(x, value, "scale-shift", move |_x, g| match &scale {
        Some(a) => g.broadcast_mul(a),
        None => Ok(g.clone()),
    })
}

#[cfg(test)]
mod tests {
    //! Each op against its composition: equal values, gradients equal to round-off, and the
    //! graph it leaves (the input and one node). Finite differences per variable: `ops::tests`.

    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::{Device, Var};

    fn normal(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        SplitMix64::new(seed).normal_tensor(shape, dtype, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// (value, ∂⟨y, w⟩/∂x, graph nodes behind y).
    fn run(x: &Var, w: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> (Tensor, Tensor, usize) {
        let y = f(x.as_tensor()).unwrap();
        let nodes = y.sorted_nodes().len();
        let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (y.detach(), g, nodes)
    }

    type Op = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

    /// (name, fused, composed) for the ops under test, with constants drawn in `dtype`.
    fn cases(dtype: DType) -> Vec<(&'static str, Op, Op)> {
        let (rows, d) = (6, 12);
        let w = normal(&[d], 31, dtype).affine(0.3, 1.0).unwrap();
        let b = normal(&[d], 32, dtype);
        let cos = normal(&[rows, d / 2], 33, dtype);
        let sin = normal(&[rows, d / 2], 34, dtype);
        let a = normal(&[1, 1, rows, 1], 35, dtype);
        let shift = normal(&[1, 1, 1, d], 36, dtype);
        let internal = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let (w2, b2, w3) = (w.clone(), b.clone(), w.clone());
        let (c2, s2, a2, sh2) = (cos.clone(), sin.clone(), a.clone(), shift.clone());
        vec![
            (
                "gelu_erf",
                Box::new(|x: &Tensor| Activation::GeluErf.apply(x)),
                Box::new(|x: &Tensor| Activation::GeluErf.value(x)),
            ),
            (
                "silu",
                Box::new(|x: &Tensor| Activation::Silu.apply(x)),
                Box::new(|x: &Tensor| Activation::Silu.value(x)),
            ),
            (
                "layer_norm (w, b)",
                Box::new(move |x: &Tensor| norm(Norm::Layer, x, Some(&w), Some(&b), 1e-5, internal)),
                Box::new(move |x: &Tensor| super::super::layer_norm_composed(x, Some(&w2), Some(&b2), 1e-5)),
            ),
            (
                "layer_norm",
                Box::new(move |x: &Tensor| norm(Norm::Layer, x, None, None, 1e-6, internal)),
                Box::new(|x: &Tensor| super::super::layer_norm_composed(x, None, None, 1e-6)),
            ),
            (
                "rms_norm (w)",
                Box::new(move |x: &Tensor| norm(Norm::Rms, x, Some(&w3), None, 1e-5, internal)),
                Box::new(move |x: &Tensor| {
                    super::super::rms_norm_composed(x, Some(&normal(&[d], 31, dtype).affine(0.3, 1.0)?), 1e-5)
                }),
            ),
            (
                "rope_half",
                Box::new(move |x: &Tensor| rope_half(x, &cos, &sin)),
                Box::new(move |x: &Tensor| super::super::rope_half_composed(x, &c2, &s2)),
            ),
            (
                "l2_normalize (dim 2)",
                Box::new(move |x: &Tensor| l2_normalize(x, 2, 1e-12, internal)),
                Box::new(|x: &Tensor| super::super::l2_normalize_composed(x, 2, 1e-12)),
            ),
            (
                "scale_shift",
                Box::new(move |x: &Tensor| scale_shift(x, Some(&a), Some(&shift))),
                Box::new(move |x: &Tensor| x.broadcast_mul(&a2)?.broadcast_add(&sh2)),
            ),
        ]
    }

    #[test]
    fn fused_ops_equal_their_compositions() {
        // Values: the same ops on the same numbers, exactly equal. Gradients: Candle's chain
        // rule through the composition against the closed forms, f64: measured ≤ 4e-16 relative
        // to the gradient's size; 1e-14 fails any wrong term (O(0.1)).
        let x = Var::from_tensor(&(normal(&[2, 3, 6, 12], 30, DType::F64) * 2.0).unwrap()).unwrap();
        let w = normal(&[2, 3, 6, 12], 37, DType::F64);
        for (name, fused, composed) in cases(DType::F64) {
            let (v_f, g_f, nodes) = run(&x, &w, fused.as_ref());
            let (v_c, g_c, composed_nodes) = run(&x, &w, composed.as_ref());
            assert_eq!(max_abs(&(&v_f - &v_c).unwrap()), 0.0, "{name}: value");
            let diff = max_abs(&(&g_f - &g_c).unwrap()) / max_abs(&g_c);
            eprintln!(
                "{name}: gradient relative difference {diff:.1e}; graph {nodes} nodes (composed {composed_nodes})"
            );
            assert!(diff <= 1e-14, "{name}: {diff:.2e}");
            assert_eq!(nodes, 2, "{name}: the input and the op");
        }
    }

    #[test]
    fn half_precision_equals_the_composition() {
        // Same dtype handling as the compositions (norms in f32): equal values; gradients
        // within a few units of the dtype's rounding of the composition's.
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let x = Var::from_tensor(&normal(&[2, 3, 6, 12], 30, dtype)).unwrap();
            let w = normal(&[2, 3, 6, 12], 37, dtype);
            let unit = match dtype {
                DType::BF16 => 2f64.powi(-8),
                DType::F16 => 2f64.powi(-11),
                _ => 2f64.powi(-24),
            };
            for (name, fused, composed) in cases(dtype) {
                let (v_f, g_f, _) = run(&x, &w, fused.as_ref());
                let (v_c, g_c, _) = run(&x, &w, composed.as_ref());
                assert_eq!(v_f.dtype(), dtype);
                assert_eq!(g_f.dtype(), dtype);
                assert_eq!(max_abs(&(&v_f - &v_c).unwrap()), 0.0, "{name} {dtype:?}: value");
                let units = max_abs(&(&g_f - &g_c).unwrap()) / (max_abs(&g_c) * unit);
                eprintln!("{name} {dtype:?}: gradient difference {units:.2} units of rounding");
                assert!(units <= 8.0, "{name} {dtype:?}: {units:.2} units");
            }
        }
    }
}
