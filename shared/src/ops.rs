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
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
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
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
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
/// `x`: (b, h, t, d); `cos`, `sin`: (t, d/2).
pub fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// Exact GELU: x·Φ(x) = ½x(1 + erf(x/√2)) (PyTorch's default).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let phi = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?;
    (x * 0.5)?.mul(&phi)
}

/// SiLU / swish: x·σ(x), with σ built from exp so its backward is Candle's primitive one.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.div(&(x.neg()?.exp()? + 1.0)?)
}

/// Logistic sigmoid from primitives.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// 2-D convolution (x: N×C×H×W, weight: O×C×kh×kw, optional bias O) as im2col and one batched
/// GEMM, so the kernel gradient is a GEMM too and the input gradient (col2im) is computed only
/// when the input needs one.
///
/// Why not `Tensor::conv2d`: on the CPU its backward runs a naive `conv_transpose2d` for the
/// input gradient (even for raw images, which need none) and a kernel gradient through an
/// im2col as large as the output map: 4× slower for the 9-channel ResNet18. On the CPU,
/// im2col/col2im are our own kernels (each the other's adjoint); elsewhere the columns are
/// gathered with `index_select`, whose backward Candle provides. Forward values equal
/// `Tensor::conv2d` (test); gradients are checked by finite differences.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with_columns(x, weight, bias, stride, padding, ColumnsPath::ByDevice)
}

/// How [`conv2d`] builds its columns. Only tests pick [`ColumnsPath::Gather`] on the CPU, to
/// check the CUDA/Metal path's gradients where there is no GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnsPath {
    /// The CPU im2col kernel on the CPU, [`gathered_columns`] elsewhere.
    ByDevice,
    /// [`gathered_columns`] on every device.
    #[cfg_attr(not(test), allow(dead_code))]
    Gather,
}

fn conv2d_with_columns(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    path: ColumnsPath,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("conv2d: input has {c} channels, weight expects {wc}");
    }
    if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!("conv2d: {h}x{w} input, {kh}x{kw} kernel, padding {padding}, stride {stride}");
    }
    let geometry = Im2Col { n, c, h, w, kh, kw, stride, padding };
    let (ho, wo) = geometry.output_hw();
    let columns = if x.device().is_cpu() && path == ColumnsPath::ByDevice {
        x.contiguous()?.apply_op1(geometry)?
    } else {
        gathered_columns(x, &geometry)?
    };
    // One GEMM over the whole batch, (O, K) · (K, N·L), so the backward is two large GEMMs
    // too (per-image matmuls were 2× slower); then back to N×O×Ho×Wo.
    let kernel = weight.reshape((o, c * kh * kw))?;
    let mut out = kernel.matmul(&columns)?;
    if let Some(bias) = bias {
        out = out.broadcast_add(&bias.reshape((o, 1))?)?;
    }
    out.reshape((o, n, ho, wo))?.permute((1, 0, 2, 3))?.contiguous()
}

/// Geometry of one convolution; as a custom op, x (N, C, H, W) → columns (C·kh·kw, N·Ho·Wo).
#[derive(Clone, Copy, Debug)]
struct Im2Col {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn output_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }

    /// Calls `f(column_index, source_index)` for every column entry that reads the input
    /// (padding reads none), per image: the shared walk of im2col and its adjoint.
    fn walk(&self, mut f: impl FnMut(usize, usize)) {
        let (ho, wo) = self.output_hw();
        let l = ho * wo;
        for b in 0..self.n {
            for ch in 0..self.c {
                for i in 0..self.kh {
                    for j in 0..self.kw {
                        let row = ((ch * self.kh + i) * self.kw + j) * self.n + b;
                        for oy in 0..ho {
                            let y = (oy * self.stride + i) as isize - self.padding as isize;
                            if y < 0 || y >= self.h as isize {
                                continue;
                            }
                            let src_row = ((b * self.c + ch) * self.h + y as usize) * self.w;
                            for ox in 0..wo {
                                let x = (ox * self.stride + j) as isize - self.padding as isize;
                                if x >= 0 && x < self.w as isize {
                                    f(row * l + oy * wo + ox, src_row + x as usize);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// im2col: columns[dst] = x[src] (padding stays zero).
    fn gather<T: Copy + Default>(&self, x: &[T], len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        self.walk(|dst, from| out[dst] = x[from]);
        out
    }

    /// col2im, the adjoint: x[src] += columns[dst].
    fn scatter_add<T: Copy + Default + std::ops::AddAssign>(&self, columns: &[T], len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        self.walk(|from, dst| out[dst] += columns[from]);
        out
    }

    fn columns_shape(&self) -> (usize, usize) {
        let (ho, wo) = self.output_hw();
        (self.c * self.kh * self.kw, self.n * ho * wo)
    }
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &candle_core::Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv2d: im2col expects a contiguous tensor"),
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (k, nl) = self.columns_shape();
        let storage = match storage {
            CpuStorage::F32(data) => CpuStorage::F32(self.gather(contiguous_slice(data, layout)?, k * nl)),
            CpuStorage::F64(data) => CpuStorage::F64(self.gather(contiguous_slice(data, layout)?, k * nl)),
            _ => candle_core::bail!("conv2d: im2col supports f32 and f64 on the CPU"),
        };
        Ok((storage, (k, nl).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Raw images have no gradient to receive: skip the scatter entirely.
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(*self))?))
    }
}

/// The adjoint of [`Im2Col`]: columns (K, N·L) → x (N, C, H, W), summing overlapping taps.
#[derive(Clone, Copy, Debug)]
struct Col2Im(Im2Col);

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let g = self.0;
        let size = g.n * g.c * g.h * g.w;
        let storage = match storage {
            CpuStorage::F32(data) => CpuStorage::F32(g.scatter_add(contiguous_slice(data, layout)?, size)),
            CpuStorage::F64(data) => CpuStorage::F64(g.scatter_add(contiguous_slice(data, layout)?, size)),
            _ => candle_core::bail!("conv2d: col2im supports f32 and f64 on the CPU"),
        };
        Ok((storage, (g.n, g.c, g.h, g.w).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(grad_res.contiguous()?.apply_op1(self.0)?))
    }
}

/// Device-generic im2col from padding and gathers (Candle differentiates every step).
fn gathered_columns(x: &Tensor, g: &Im2Col) -> Result<Tensor> {
    let (ho, wo) = g.output_hw();
    let x = if g.padding > 0 {
        x.pad_with_zeros(2, g.padding, g.padding)?.pad_with_zeros(3, g.padding, g.padding)?
    } else {
        x.clone()
    };
    let taps = |offset: usize, count: usize| -> Result<Tensor> {
        let index: Vec<u32> = (0..count).map(|k| (offset + k * g.stride) as u32).collect();
        Tensor::from_vec(index, count, x.device())
    };
    let mut columns = Vec::with_capacity(g.kh * g.kw);
    for i in 0..g.kh {
        let rows = x.index_select(&taps(i, ho)?, 2)?;
        for j in 0..g.kw {
            columns.push(rows.index_select(&taps(j, wo)?, 3)?);
        }
    }
    // (N, C, kh·kw, Ho, Wo) → (C·kh·kw, N·Ho·Wo), weight order (c, i, j).
    let (k, _) = g.columns_shape();
    Tensor::stack(&columns, 2)?.reshape((g.n, k, ho * wo))?.transpose(0, 1)?.reshape(g.columns_shape())
}

/// Differentiable 2-D convolution module over [`conv2d`], a drop-in for `candle_nn::Conv2d`
/// (same var names `weight`, `bias` and the same default initialisation).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Kaiming-uniform weights (and bias) like `candle_nn::conv2d`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        with_bias: bool,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if with_bias {
            let bound = 1.0 / (in_channels as f64).sqrt();
            Some(vb.get_with_hints(out_channels, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?)
        } else {
            None
        };
        Ok(Self { weight, bias, stride, padding })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.padding)
    }
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
