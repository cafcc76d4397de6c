//! Differentiable versions of the ops Candle fuses.
//!
//! Candle 0.11's fused kernels (`softmax_last_dim`, `ops::layer_norm`, `ops::rms_norm`,
//! `rotary_emb::rope*`, `sdpa`) are applied without a backward pass: gradients stop there with
//! no error, and with a residual path around them the gradient is silently *wrong*. Everything
//! here is composed from primitive tensor ops that all have backward implementations, so any
//! model built from these can be trusted under `backward()`. Each op has a finite-difference
//! test in f64 (see the tests at the bottom), and each fused op a test proving it still drops
//! its gradient — so an upgrade that fixes Candle is noticed.

use candle_core::{DType, Device, Module, Result, Tensor, D};

mod attention;
mod checkpoint;
mod conv;
mod fused;
mod norm;
mod optim;
mod pad;
mod parallel;
mod pool;
pub use attention::sdpa_tiled;
pub use checkpoint::{checkpoint, checkpoint_many};
pub use conv::{conv2d, conv3d, Conv2d};
#[cfg(test)]
use conv::{conv2d_with, conv3d_with, gathered_columns, ColumnsPath, ConvPaths, Im2Col, InputGradPath};
pub use norm::{batch_norm_train, BatchNorm2d};
pub use optim::{adam_step_inplace, inplace_applicable, polyak_inplace, AdamStep};
pub use pad::causal_pad;
pub use pool::max_pool2d;

/// Numerically stable softmax along `dim` (max-subtracted; the max is detached because the
/// result does not depend on it).
pub fn softmax<Dm: candle_core::shape::Dim>(x: &Tensor, dim: Dm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "softmax")?;
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

/// log-softmax along `dim`: x − max − ln Σ exp(x − max).
pub fn log_softmax<Dm: candle_core::shape::Dim>(x: &Tensor, dim: Dm) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "log_softmax")?;
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Layer norm over the last dimension, with optional affine weight and bias.
///
/// With constant (or no) weight and bias the graph keeps only x and the backward is the closed
/// form (see `fused.rs`); a weight or bias that carries a gradient takes the composition.
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if weight.is_some_and(Tensor::track_op) || bias.is_some_and(Tensor::track_op) {
        return layer_norm_composed(x, weight, bias, eps);
    }
    fused::norm(fused::Norm::Layer, x, weight, bias, eps, internal_dtype(x.dtype()))
}

/// [`layer_norm`] from primitives (every parameter differentiable).
fn layer_norm_composed(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let internal = internal_dtype(x.dtype());
    let xf = x.to_dtype(internal)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x.dtype())?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// RMS norm over the last dimension: x / sqrt(mean(x²) + eps) · weight.
///
/// With a constant (or no) weight the graph keeps only x and the backward is the closed form
/// (see `fused.rs`); a weight that carries a gradient takes the composition.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if weight.is_some_and(Tensor::track_op) {
        return rms_norm_composed(x, weight, eps);
    }
    fused::norm(fused::Norm::Rms, x, weight, None, eps, internal_dtype(x.dtype()))
}

/// [`rms_norm`] from primitives.
fn rms_norm_composed(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let internal = internal_dtype(x.dtype());
    let xf = x.to_dtype(internal)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(x.dtype())?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    Ok(y)
}

/// Half-precision inputs are normalised in f32, as the fused kernels do.
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Rotary embedding, interleaved pairs (x₀,x₁),(x₂,x₃),… — GPT-J / Candle `rope_i` layout.
///
/// `x`: (b, h, t, d); `cos`, `sin`: (t, d/2).
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let pairs = x.reshape((b, h, t, d / 2, 2))?;
    let x0 = pairs.narrow(D::Minus1, 0, 1)?;
    let x1 = pairs.narrow(D::Minus1, 1, 1)?;
    let cos = cos.reshape((1, 1, t, d / 2, 1))?;
    let sin = sin.reshape((1, 1, t, d / 2, 1))?;
    let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))
}

/// Rotary embedding, half-split pairs (xᵢ, x_{i+d/2}) — GPT-NeoX / Candle `rope` layout, the one
/// diffusers' Cosmos uses (`use_real_unbind_dim=-2`).
///
/// `x`: (b, h, t, d); `cos`, `sin`: (t, d/2). With constant tables the graph keeps only x and
/// the backward is the inverse rotation (see `fused.rs`).
pub fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.track_op() || sin.track_op() {
        return rope_half_composed(x, cos, sin);
    }
    fused::rope_half(x, cos, sin)
}

/// [`rope_half`] from primitives.
fn rope_half_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, t, d) = x.dims4()?;
    let x0 = x.narrow(D::Minus1, 0, d / 2)?;
    let x1 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let cos = cos.reshape((1, 1, t, d / 2))?;
    let sin = sin.reshape((1, 1, t, d / 2))?;
    let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::cat(&[y0, y1], D::Minus1)
}

/// 1D rotary angle tables: cos and sin of shape (len, dim/2) with frequencies
/// θ^(−2i/dim), positions 0..len scaled by `pos_scale` (Cosmos extrapolation factors).
pub fn rope_tables_1d(
    len: usize,
    dim: usize,
    theta: f64,
    pos_scale: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = dim / 2;
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in 0..len {
        for i in 0..half {
            let freq = theta.powf(-((2 * i) as f64) / dim as f64);
            let angle = p as f64 * pos_scale * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// 3D rotary tables for video tokens laid out t-major then h then w, with the head dimension
/// split into `dims = (d_t, d_h, d_w)` (Cosmos: 44/42/42 of 128). Returns cos, sin of shape
/// (t·h·w, (d_t+d_h+d_w)/2), to be used with [`rope_half`] or [`rope_interleaved`] as each
/// model's layout requires. Each axis has its own `theta`.
pub fn rope_tables_3d(
    grid: (usize, usize, usize),
    dims: (usize, usize, usize),
    thetas: (f64, f64, f64),
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (nt, nh, nw) = grid;
    let (ct, st) = rope_tables_1d(nt, dims.0, thetas.0, 1.0, DType::F64, device)?;
    let (ch, sh) = rope_tables_1d(nh, dims.1, thetas.1, 1.0, DType::F64, device)?;
    let (cw, sw) = rope_tables_1d(nw, dims.2, thetas.2, 1.0, DType::F64, device)?;
    let expand = |tt: &Tensor, th: &Tensor, tw: &Tensor| -> Result<Tensor> {
        let (ht, hh, hw) = (dims.0 / 2, dims.1 / 2, dims.2 / 2);
        let a = tt.reshape((nt, 1, 1, ht))?.broadcast_as((nt, nh, nw, ht))?;
        let b = th.reshape((1, nh, 1, hh))?.broadcast_as((nt, nh, nw, hh))?;
        let c = tw.reshape((1, 1, nw, hw))?.broadcast_as((nt, nh, nw, hw))?;
        Tensor::cat(&[a, b, c], D::Minus1)?.reshape((nt * nh * nw, ht + hh + hw))?.to_dtype(dtype)
    };
    Ok((expand(&ct, &ch, &cw)?, expand(&st, &sh, &sw)?))
}

/// Scaled dot-product attention. `q`: (…, tq, d), `k`, `v`: (…, tk, d).
///
/// `mask`, if given, is additive and broadcast to (…, tq, tk): 0 where attention is allowed and a
/// large negative number (or −∞) where it is not. `scale` defaults to 1/√d.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: Option<f64>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut logits = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        logits = logits.broadcast_add(&m.to_dtype(logits.dtype())?)?;
    }
    let attn = softmax(&logits, D::Minus1)?;
    attn.matmul(&v.contiguous()?)
}

/// Boolean-style mask (1 = attend, 0 = blocked) to the additive form [`sdpa`] takes.
pub fn additive_mask(allowed: &Tensor, dtype: DType) -> Result<Tensor> {
    let allowed = allowed.to_dtype(dtype)?;
    // −1e9 rather than −∞ so a fully-masked row gives a uniform row instead of NaN.
    (allowed.ones_like()? - allowed)? * -1e9
}

/// GELU with the tanh approximation (PyTorch `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    (x * 0.5)?.mul(&(inner.tanh()? + 1.0)?)
}

/// Exact GELU: x·Φ(x) = ½x(1 + erf(x/√2)) (PyTorch's default). The graph keeps only x; the
/// backward is the closed-form derivative (see `fused.rs`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    fused::Activation::GeluErf.apply(x)
}

/// SiLU / swish: x·σ(x). The graph keeps only x; the backward is the closed-form derivative.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    fused::Activation::Silu.apply(x)
}

/// x·scale + shift, each broadcast to x's shape (either may be absent). With constant scale and
/// shift the graph keeps nothing of them (Candle's broadcast product would keep a full-size
/// gradient for the constant until the backward ends); otherwise the composition.
pub fn scale_shift(x: &Tensor, scale: Option<&Tensor>, shift: Option<&Tensor>) -> Result<Tensor> {
    if scale.is_some_and(Tensor::track_op) || shift.is_some_and(Tensor::track_op) {
        let mut y = x.clone();
        if let Some(a) = scale {
            y = y.broadcast_mul(a)?;
        }
        if let Some(b) = shift {
            y = y.broadcast_add(b)?;
        }
        return Ok(y);
    }
    fused::scale_shift(x, scale, shift)
}

/// Logistic sigmoid from primitives.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// PyTorch's `F.normalize(x, p=2, dim, eps)`: x / max(‖x‖₂ along `dim`, eps).
///
/// The norm is taken as √max(Σx², eps²) — the same value, since √ is increasing — so that a zero
/// vector (or any with ‖x‖ < eps) has the finite gradient of x / eps instead of the 0·∞ = NaN
/// that √ of an exact 0 gives in backward. Half-precision inputs are normalised in f32 (eps² of
/// 1e-12 underflows f16).
///
/// The graph keeps only x; the backward is the closed form (see `fused.rs`).
pub fn l2_normalize(x: &Tensor, dim: usize, eps: f64) -> Result<Tensor> {
    if dim >= x.rank() {
        candle_core::bail!("l2_normalize: dim {dim} of a rank-{} tensor", x.rank());
    }
    fused::l2_normalize(x, dim, eps, internal_dtype(x.dtype()))
}

/// [`l2_normalize`] from primitives.
fn l2_normalize_composed(x: &Tensor, dim: usize, eps: f64) -> Result<Tensor> {
    let internal = internal_dtype(x.dtype());
    let xf = x.to_dtype(internal)?;
    let norm = xf.sqr()?.sum_keepdim(dim)?.maximum(eps * eps)?.sqrt()?;
    xf.broadcast_div(&norm)?.to_dtype(x.dtype())
}

/// Nearest-neighbour 2× upsampling, (N, C, H, W) → (N, C, 2H, 2W), each pixel repeated 2×2 —
/// PyTorch's `interpolate(scale_factor=2, mode="nearest-exact")`, which equals `mode="nearest"`
/// at factor 2 (test against torch numbers).
///
/// Built as a broadcast (whose backward sums each 2×2 block and accumulates like any other
/// op) instead of Candle's `upsample_nearest2d`, whose backward overwrites the input's gradient
/// when the input is used elsewhere too.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
}

/// Differentiable layer norm module, a drop-in for `candle_nn::LayerNorm` (same weight names:
/// `weight`, `bias`). Use it in every model that is backpropagated.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    /// Affine layer norm with weights `weight` and `bias` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight: Some(weight), bias: Some(bias), eps })
    }

    /// Layer norm without learnable parameters (Cosmos' `elementwise_affine=False`).
    pub fn no_affine(eps: f64) -> Self {
        Self { weight: None, bias: None, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// Differentiable RMS norm module (weight name `weight`).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Option<Tensor>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight: Some(weight), eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, self.weight.as_ref(), self.eps)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cnn;
