//! Convolutions as im2col + GEMM: [`conv2d`], [`conv3d`] (a sum of 2-D convolutions over the
//! temporal taps) and the [`Conv2d`] module.
//!
//! Three paths, picked per call:
//!
//! * **Trainable** (the weight or bias tracks a Var): im2col and one GEMM recorded in Candle's
//!   graph, so the kernel gradient is a GEMM too. The graph keeps the columns (C·kh·kw × N·Ho·Wo,
//!   9× the input for a 3×3 kernel; conv3d: every tap's, plus a frame-major copy of x) until
//!   backward.
//! * **Frozen** (weight and bias are plain tensors, the input tracks an op): the same im2col +
//!   GEMM run on the *detached* input, so the columns are temporaries of the forward, wrapped in
//!   [`FrozenConv`], a custom op that holds only the input and the weight and whose backward is
//!   the input gradient alone (no kernel gradient is computed or stored). The forward's peak is
//!   unchanged (the columns still exist while the GEMM runs); what the graph holds drops to x
//!   and the output (test `shared/tests/conv_graph_memory.rs`).
//! * **Untracked** (nothing tracks): the trainable path, which records nothing.
//!
//! Forward values are bit-identical on all three (the frozen value *is* the trainable forward of
//! the detached input). On the CPU, im2col/col2im are our own kernels for f32, f64, bf16 and f16;
//! elsewhere the columns are gathered with `index_select` and the frozen input gradient is
//! Candle's `conv_transpose2d`. Tests run those device-generic paths on the CPU too.

use std::sync::{Arc, Mutex};

use super::parallel::SharedSlice;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, DType, Layout, MetalStorage, Module, Result, Shape, Storage, Tensor, WithDType,
};

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
///
/// With a frozen weight (and bias) — plain tensors, `!track_op()` — and an input that needs a
/// gradient, the columns are not kept for backward (see the module docs).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(x, weight, bias, stride, padding, ConvPaths::default())
}

/// 3-D convolution without temporal padding: x (B, C, T, H, W), weight (O, C, kt, kh, kw),
/// optional bias (O) → (B, O, T', H', W') with T' = (T − kt)/st + 1, `stride = (st, s)` (temporal,
/// spatial) and symmetric spatial zero padding `padding` on H and W (PyTorch
/// `F.conv3d(x, w, b, stride=(st, s, s), padding=(0, p, p))`; causal temporal padding is the
/// caller's, as in diffusers' `WanCausalConv3d`).
///
/// Built as Σ over the kt temporal taps τ of [`conv2d`] with weight[:, :, τ] applied to frames
/// τ, τ+st, …, τ+(T'−1)·st folded into the batch, so it shares conv2d's kernels and backward.
/// With a frozen weight and bias the graph holds only x (see the module docs).
pub fn conv3d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: usize,
) -> Result<Tensor> {
    conv3d_with(x, weight, bias, stride, padding, ConvPaths::default())
}

/// Which implementation each device-dependent step takes. The defaults pick by device; tests
/// choose the others on the CPU to check the paths CUDA/Metal take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ConvPaths {
    pub columns: ColumnsPath,
    pub frozen_input_grad: InputGradPath,
}

/// How the columns are built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum ColumnsPath {
    /// The CPU im2col kernel on the CPU, [`gathered_columns`] elsewhere.
    #[default]
    ByDevice,
    /// [`gathered_columns`] on every device.
    #[cfg_attr(not(test), allow(dead_code))]
    Gather,
}

/// How [`FrozenConv`] computes the input gradient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum InputGradPath {
    /// col2im(Wᵀ·g) with our kernel on the CPU, `conv_transpose2d` elsewhere.
    #[default]
    ByDevice,
    /// Candle's `conv_transpose2d` on every device.
    #[cfg_attr(not(test), allow(dead_code))]
    ConvTranspose,
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The dtype sums over taps run in: f32 for bf16/f16 (one rounding at the end instead of one per
/// tap), the dtype itself otherwise.
fn accumulation_dtype(dtype: DType) -> DType {
    if is_half(dtype) {
        DType::F32
    } else {
        dtype
    }
}

/// Frozen: weight and bias are plain tensors (no gradient wanted) while the input needs one.
fn frozen(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.track_op() && !weight.track_op() && !bias.is_some_and(|b| b.track_op())
}

pub(super) fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    paths: ConvPaths,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    let image = Im2Col::checked("conv2d", (n, c, h, w), (wc, kh, kw), stride, padding)?;
    check_bias("conv2d", bias, o)?;
    if frozen(x, weight, bias) {
        let value = conv2d_with_columns(&x.detach(), weight, bias, &image, paths.columns)?;
        let geometry =
            ConvGeometry { batch: n, out_channels: o, frames_in: 1, frames_out: 1, taps: 1, frame_stride: 1, image };
        return FrozenConv::apply(x, &weight.unsqueeze(2)?, value, geometry, paths.frozen_input_grad);
    }
    conv2d_with_columns(x, weight, bias, &image, paths.columns)
}

pub(super) fn conv3d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: usize,
    paths: ConvPaths,
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, wc, kt, kh, kw) = weight.dims5()?;
    let (frame_stride, spatial_stride) = stride;
    if frame_stride == 0 || kt == 0 || t < kt {
        candle_core::bail!(
            "conv3d: {t} frames, {kt} temporal taps, temporal stride {frame_stride} (no temporal padding)"
        );
    }
    let frames_out = (t - kt) / frame_stride + 1;
    let image = Im2Col::checked("conv3d", (frames_out * b, c, h, w), (wc, kh, kw), spatial_stride, padding)?;
    check_bias("conv3d", bias, o)?;
    let geometry = ConvGeometry { batch: b, out_channels: o, frames_in: t, frames_out, taps: kt, frame_stride, image };
    if frozen(x, weight, bias) {
        let value = conv3d_by_taps(&x.detach(), weight, bias, &geometry, paths.columns)?;
        return FrozenConv::apply(x, weight, value, geometry, paths.frozen_input_grad);
    }
    conv3d_by_taps(x, weight, bias, &geometry, paths.columns)
}

fn check_bias(what: &str, bias: Option<&Tensor>, out_channels: usize) -> Result<()> {
    match bias.map(|b| b.dims()) {
        Some(dims) if dims != [out_channels] => {
            candle_core::bail!("{what}: bias of shape {dims:?}, expected [{out_channels}]")
        }
        _ => Ok(()),
    }
}

/// Σ_τ conv2d(frames τ + st·t', weight[:, :, τ]), frames folded into the batch frame-major:
/// image t'·B + b. x (B, C, T, H, W) → (B, O, T', H', W').
fn conv3d_by_taps(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: &ConvGeometry,
    columns: ColumnsPath,
) -> Result<Tensor> {
    // (T, B, C, H, W): with a temporal stride of 1 each tap's frames are then one contiguous
    // range, a free view, whatever B is.
    let by_frame = x.permute((2, 0, 1, 3, 4))?.contiguous()?;
    let Im2Col { c, h, w, .. } = g.image;
    let mut sum: Option<Tensor> = None;
    for tap in 0..g.taps {
        let frames = if g.frame_stride == 1 {
            by_frame.narrow(0, tap, g.frames_out)?
        } else {
            by_frame.index_select(&g.frame_index(tap, x.device())?, 0)?
        };
        let frames = frames.reshape((g.frames_out * g.batch, c, h, w))?;
        let tap_weight = weight.narrow(2, tap, 1)?.squeeze(2)?;
        // The bias once, with the first tap.
        let y = conv2d_with_columns(&frames, &tap_weight, if tap == 0 { bias } else { None }, &g.image, columns)?;
        let y = if g.taps > 1 { y.to_dtype(accumulation_dtype(x.dtype()))? } else { y };
        sum = Some(match sum {
            None => y,
            Some(s) => (s + y)?,
        });
    }
    let (ho, wo) = g.image.output_hw();
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("conv3d: no temporal taps".into()))?;
    let sum = sum.to_dtype(x.dtype())?;
    sum.reshape((g.frames_out, g.batch, g.out_channels, ho, wo))?.permute((1, 2, 0, 3, 4))?.contiguous()
}

fn conv2d_with_columns(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: &Im2Col,
    path: ColumnsPath,
) -> Result<Tensor> {
    let Im2Col { n, c, kh, kw, .. } = *geometry;
    let o = weight.dim(0)?;
    let (ho, wo) = geometry.output_hw();
    let columns = if x.device().is_cpu() && path == ColumnsPath::ByDevice {
        x.contiguous()?.apply_op1(*geometry)?
    } else {
        gathered_columns(x, geometry)?
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

/// Geometry of one 2-D convolution; as a custom op, x (N, C, H, W) → columns (C·kh·kw, N·Ho·Wo).
#[derive(Clone, Copy, Debug)]
pub(super) struct Im2Col {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Im2Col {
    /// The geometry of images (n, c, h, w) under a kernel (c, kh, kw), or an error naming `what`.
    fn checked(
        what: &str,
        (n, c, h, w): (usize, usize, usize, usize),
        (kernel_c, kh, kw): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if kernel_c != c {
            candle_core::bail!("{what}: input has {c} channels, weight expects {kernel_c}");
        }
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("{what}: {h}x{w} input, {kh}x{kw} kernel, padding {padding}, stride {stride}");
        }
        Ok(Self { n, c, h, w, kh, kw, stride, padding })
    }

    pub(super) fn output_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }

    /// The output columns `ox` of one kernel column `j` that read inside the image (the rest read
    /// padding): `lo..hi`, with source column `ox·stride + j − padding`.
    fn valid_columns(&self, j: usize, wo: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = if p > j { (p - j).div_ceil(s).min(wo) } else { 0 };
        let hi = if self.w + p > j { ((self.w + p - j - 1) / s + 1).min(wo) } else { 0 };
        (lo, hi.max(lo))
    }

    /// im2col: column row `((ch·kh + i)·kw + j)·n + b` holds image b's channel ch shifted by the
    /// tap (i, j), zeros where the tap reads padding. Rows are independent, so they are filled in
    /// parallel on Candle's CPU pool, each row as whole output rows (a copy at stride 1).
    ///
    /// Why not a per-element walk: it was 8 % of a LAPO iteration (ResNet18, batch 64), one thread.
    fn gather<T: WithDType>(&self, x: &[T], len: usize) -> Vec<T> {
        let (ho, wo) = self.output_hw();
        let l = ho * wo;
        let mut out: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation; every element is written below (each row of
        // `l` entries is filled completely: zeros, then the valid range) before it is read.
        unsafe { out.set_len(len) };
        let rows = len / l.max(1);
        let dst = SharedSlice::new(&mut out);
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            for row in range {
                // SAFETY: rows are disjoint ranges of `out`, each visited once.
                let dst = unsafe { dst.range(row * l, l) };
                let (b, k) = (row % self.n, row / self.n);
                let (j, i, ch) = (k % self.kw, (k / self.kw) % self.kh, k / (self.kw * self.kh));
                let (lo, hi) = self.valid_columns(j, wo);
                let zero = std::mem::MaybeUninit::new(T::from_f64(0.0));
                for oy in 0..ho {
                    let line = &mut dst[oy * wo..(oy + 1) * wo];
                    let y = (oy * self.stride + i) as isize - self.padding as isize;
                    if y < 0 || y >= self.h as isize {
                        line.fill(zero);
                        continue;
                    }
                    let src = &x[((b * self.c + ch) * self.h + y as usize) * self.w..][..self.w];
                    line[..lo].fill(zero);
                    line[hi..].fill(zero);
                    // Source column of output column ox: ox·stride + j − padding (≥ 0 for ox ≥ lo).
                    let first = lo * self.stride + j - self.padding;
                    if self.stride == 1 {
                        for (d, &v) in line[lo..hi].iter_mut().zip(&src[first..first + (hi - lo)]) {
                            *d = std::mem::MaybeUninit::new(v);
                        }
                    } else {
                        for (d, &v) in line[lo..hi].iter_mut().zip(src[first..].iter().step_by(self.stride)) {
                            *d = std::mem::MaybeUninit::new(v);
                        }
                    }
                }
            }
        });
        let mut out = std::mem::ManuallyDrop::new(out);
        // SAFETY: every element was initialised above; MaybeUninit<T> has T's layout.
        unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut T, out.len(), out.capacity()) }
    }

    /// col2im, the adjoint: x[b, ch] = Σ over taps (i, j) of the columns that read it. Each image
    /// plane (b, ch) gathers from its own kh·kw rows, so planes are summed in parallel with no
    /// shared writes. bf16/f16 sums run in f32 and are rounded once, as PyTorch's CPU kernels do:
    /// up to kh·kw terms each.
    fn scatter_add<T: WithDType>(&self, columns: &[T], len: usize) -> Vec<T> {
        let (ho, wo) = self.output_hw();
        let (l, plane) = (ho * wo, self.h * self.w);
        let mut out = vec![T::from_f64(0.0); len];
        let dst = SharedSlice::new(&mut out);
        candle_core::utils::barrier_pool().execute_chunked(self.n * self.c, |range| {
            let mut sum = vec![0f32; if is_half(T::DTYPE) { plane } else { 0 }];
            for image in range {
                // SAFETY: planes are disjoint ranges of `out`, each visited once.
                let dst = unsafe { dst.range(image * plane, plane) };
                let (b, ch) = (image / self.c, image % self.c);
                sum.fill(0.0);
                for i in 0..self.kh {
                    for j in 0..self.kw {
                        let row = ((ch * self.kh + i) * self.kw + j) * self.n + b;
                        let (lo, hi) = self.valid_columns(j, wo);
                        for oy in 0..ho {
                            let y = (oy * self.stride + i) as isize - self.padding as isize;
                            if y < 0 || y >= self.h as isize {
                                continue;
                            }
                            let src = &columns[row * l + oy * wo..][lo..hi];
                            let first = y as usize * self.w + lo * self.stride + j - self.padding;
                            if is_half(T::DTYPE) {
                                let line = sum[first..].iter_mut().step_by(self.stride);
                                for (d, &v) in line.zip(src) {
                                    *d += v.to_f64() as f32;
                                }
                            } else {
                                for (d, &v) in dst[first..].iter_mut().step_by(self.stride).zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
                if is_half(T::DTYPE) {
                    for (d, &v) in dst.iter_mut().zip(&sum) {
                        *d = T::from_f64(v as f64);
                    }
                }
            }
        });
        out
    }

    fn columns_shape(&self) -> (usize, usize) {
        let (ho, wo) = self.output_hw();
        (self.c * self.kh * self.kw, self.n * ho * wo)
    }
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv: im2col/col2im expect a contiguous tensor"),
    }
}

/// Runs `f` on the float data of a CPU storage (f32, f64, bf16, f16) and wraps its result in the
/// same dtype.
fn map_float_storage(what: &str, storage: &CpuStorage, layout: &Layout, f: impl FloatMap) -> Result<CpuStorage> {
    fn run<T: WithDType>(f: &impl FloatMap, data: &[T], layout: &Layout) -> Result<CpuStorage> {
        Ok(T::to_cpu_storage_owned(f.apply(contiguous_slice(data, layout)?)))
    }
    match storage {
        CpuStorage::F32(data) => run(&f, data, layout),
        CpuStorage::F64(data) => run(&f, data, layout),
        CpuStorage::BF16(data) => run(&f, data, layout),
        CpuStorage::F16(data) => run(&f, data, layout),
        other => candle_core::bail!("conv: {what} supports f32, f64, bf16 and f16, not {:?}", other.dtype()),
    }
}

/// A kernel generic over the float type (what a closure cannot be).
trait FloatMap {
    fn apply<T: WithDType>(&self, data: &[T]) -> Vec<T>;
}

impl FloatMap for Im2Col {
    fn apply<T: WithDType>(&self, data: &[T]) -> Vec<T> {
        let (k, nl) = self.columns_shape();
        self.gather(data, k * nl)
    }
}

impl FloatMap for Col2Im {
    fn apply<T: WithDType>(&self, data: &[T]) -> Vec<T> {
        let g = self.0;
        self.0.scatter_add(data, g.n * g.c * g.h * g.w)
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = map_float_storage("im2col", storage, layout, *self)?;
        Ok((storage, self.columns_shape().into()))
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

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let storage = map_float_storage("col2im", storage, layout, *self)?;
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
pub(super) fn gathered_columns(x: &Tensor, g: &Im2Col) -> Result<Tensor> {
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

/// A convolution over frames: B clips of `frames_in` frames, `taps` temporal taps at stride
/// `frame_stride`, each tap a 2-D convolution over the `frames_out·B` images of `image`.
/// conv2d is the case of one frame and one tap.
#[derive(Clone, Copy, Debug)]
struct ConvGeometry {
    batch: usize,
    out_channels: usize,
    frames_in: usize,
    frames_out: usize,
    taps: usize,
    frame_stride: usize,
    /// The 2-D geometry of one tap, `n = frames_out · batch`.
    image: Im2Col,
}

impl ConvGeometry {
    /// The input frames tap `tap` reads: tap, tap + st, …, tap + (T'−1)·st.
    fn frame_index(&self, tap: usize, device: &candle_core::Device) -> Result<Tensor> {
        let index: Vec<u32> = (0..self.frames_out).map(|t| (tap + t * self.frame_stride) as u32).collect();
        Tensor::from_vec(index, self.frames_out, device)
    }
}

/// A convolution with a frozen weight, recorded as one node that holds only its input and the
/// weight: the forward value is computed beforehand on the detached input (its im2col columns
/// are temporaries of that computation) and handed over once, and the backward returns the input
/// gradient only — no kernel gradient is computed. Like `FrozenMatmul` in the Cosmos
/// transformer, for convolutions.
struct FrozenConv {
    /// (O, C, kt, kh, kw); conv2d's (O, C, kh, kw) with kt = 1.
    weight: Tensor,
    geometry: ConvGeometry,
    /// The forward value, taken by the (single) forward call.
    value: Mutex<Option<Tensor>>,
    input_grad: InputGradPath,
}

impl FrozenConv {
    fn apply(
        x: &Tensor,
        weight: &Tensor,
        value: Tensor,
        geometry: ConvGeometry,
        input_grad: InputGradPath,
    ) -> Result<Tensor> {
        let op = Self { weight: weight.clone(), geometry, value: Mutex::new(Some(value)), input_grad };
        x.apply_op1_arc(Arc::new(Box::new(op)))
    }

    /// The precomputed value as fresh storage of backend `S`.
    fn take_value<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        take_precomputed(&self.value, pick, "frozen conv")
    }

    /// The input gradient: for each tap, the 2-D input gradient of the frame-major images,
    /// added into the frames that tap read. Returns (B, C, T, H, W).
    fn input_gradient(&self, grad: &Tensor, device_is_cpu: bool) -> Result<Tensor> {
        let g = self.geometry;
        let Im2Col { c, h, w, .. } = g.image;
        let (b, o, t_out) = (g.batch, g.out_channels, g.frames_out);
        let (ho, wo) = g.image.output_hw();
        // (B, O, T', Ho, Wo) → (T'·B, O, Ho, Wo), the image order of the forward's taps.
        let images = grad.reshape((b, o, t_out, ho, wo))?.permute((2, 0, 1, 3, 4))?.contiguous()?;
        let images = images.reshape((t_out * b, o, ho, wo))?;
        let same_frames = g.taps == 1 && g.frame_stride == 1 && t_out == g.frames_in;
        let mut by_frame: Option<Tensor> = None;
        for tap in 0..g.taps {
            let tap_weight = self.weight.narrow(2, tap, 1)?.squeeze(2)?;
            let gx = if device_is_cpu && self.input_grad == InputGradPath::ByDevice {
                col2im_input_grad(&images, &tap_weight, &g.image)?
            } else {
                conv_transpose_input_grad(&images, &tap_weight, &g.image)?
            };
            let gx = gx.reshape((t_out, b * c * h * w))?;
            by_frame = Some(if same_frames {
                gx
            } else {
                let gx = gx.to_dtype(accumulation_dtype(gx.dtype()))?;
                let total = match by_frame {
                    Some(total) => total,
                    None => Tensor::zeros((g.frames_in, b * c * h * w), gx.dtype(), gx.device())?,
                };
                total.index_add(&g.frame_index(tap, gx.device())?, &gx, 0)?
            });
        }
        let by_frame = by_frame.ok_or_else(|| candle_core::Error::Msg("frozen conv: no temporal taps".into()))?;
        let by_frame = by_frame.to_dtype(grad.dtype())?;
        by_frame.reshape((g.frames_in, b, c, h, w))?.permute((1, 2, 0, 3, 4))?.contiguous()
    }
}

/// col2im(Wᵀ·g): images' gradient (N, O, Ho, Wo), weight (O, C, kh, kw) → (N, C, H, W).
fn col2im_input_grad(grad: &Tensor, weight: &Tensor, image: &Im2Col) -> Result<Tensor> {
    let (n, o, ho, wo) = grad.dims4()?;
    let grad = grad.permute((1, 0, 2, 3))?.contiguous()?.reshape((o, n * ho * wo))?;
    let kernel = weight.reshape((o, image.c * image.kh * image.kw))?;
    kernel.t()?.matmul(&grad)?.contiguous()?.apply_op1(Col2Im(*image))
}

/// The device-generic input gradient: Candle's `conv_transpose2d`. Candle takes one output
/// padding for both axes, so it gets the larger remainder and the extra rows or columns (input
/// positions in the right/bottom padding, which have no gradient to keep) are cut off.
fn conv_transpose_input_grad(grad: &Tensor, weight: &Tensor, image: &Im2Col) -> Result<Tensor> {
    let Im2Col { h, w, kh, kw, stride, padding, .. } = *image;
    let output_padding = ((h + 2 * padding - kh) % stride).max((w + 2 * padding - kw) % stride);
    let gx = grad.conv_transpose2d(&weight.contiguous()?, padding, output_padding, stride, 1)?;
    gx.narrow(2, 0, h)?.narrow(3, 0, w)
}

impl candle_core::CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take_value(on_cpu)
    }

    fn cuda_fwd(&self, _x: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.take_value(on_cuda)
    }

    fn metal_fwd(&self, _x: &MetalStorage, _layout: &Layout) -> Result<(MetalStorage, Shape)> {
        self.take_value(on_metal)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_gradient(grad_res, arg.device().is_cpu())?.reshape(arg.shape())?))
    }
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

/// A custom op whose value was computed beforehand with ordinary ops (no graph) hands it over as
/// fresh storage of backend `S` — once; the op exists only for its backward.
pub(super) fn take_precomputed<S>(
    slot: &Mutex<Option<Tensor>>,
    pick: impl Fn(&Storage) -> Option<&S>,
    what: &str,
) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let value = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: value lock poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: forward run twice")))?;
    let (storage, layout) = value.storage_and_layout();
    let storage = pick(&storage).ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: value on {:?}, input elsewhere", value.device().location()))
    })?;
    let mut out = unsafe { storage.device().alloc_uninit(layout.shape(), storage.dtype())? };
    storage.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

/// The backend storage of a tensor, when it lives on that backend (for [`take_precomputed`]).
pub(super) fn on_cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

pub(super) fn on_cuda(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

pub(super) fn on_metal(s: &Storage) -> Option<&MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}
