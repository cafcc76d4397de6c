//! Max pooling with padding (PyTorch's `F.max_pool2d(x, k, stride, padding)`), differentiable.
//!
//! Candle's `max_pool2d_with_stride` has no padding and no backward unless kernel = stride, so
//! ResNet's 3×3/2 pool was composed from six strided `index_select`s and four `maximum`s, whose
//! backward is `index_add`s and comparison masks over the whole 64-channel stem map. On the CPU
//! this is one op: the forward takes each window's maximum, the backward recomputes each window's
//! first maximum (PyTorch's rule: the first in row-major window order, NaN wins) and adds the
//! output gradient there. Elsewhere the composed path runs (ties split the gradient there, which
//! sums to the same total).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor, WithDType};

use super::parallel::SharedSlice;

/// Max pooling of x (N, C, H, W) over `kernel`×`kernel` windows at `stride`, with implicit −∞
/// padding of `padding` on each side (at most `kernel / 2`, PyTorch's limit): output
/// (N, C, (H + 2p − k)/s + 1, (W + 2p − k)/s + 1).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 || padding > kernel / 2 || h + 2 * padding < kernel || w + 2 * padding < kernel {
        candle_core::bail!(
            "max_pool2d: {h}x{w} input, kernel {kernel}, stride {stride}, padding {padding} (kernel and stride ≥ 1, padding ≤ kernel / 2)"
        );
    }
    let pool = MaxPool { n, c, h, w, kernel, stride, padding };
    if x.device().is_cpu() && x.dtype().is_float() {
        x.contiguous()?.apply_op1(pool)
    } else {
        pool.composed(x)
    }
}

/// [`max_pool2d`]'s device-generic path, on any device (tests run it on the CPU).
#[cfg(test)]
pub(super) fn max_pool2d_composed(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    MaxPool { n, c, h, w, kernel, stride, padding }.composed(x)
}

#[derive(Clone, Copy, Debug)]
struct MaxPool {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    fn output_hw(&self) -> (usize, usize) {
        let out = |len: usize| (len + 2 * self.padding - self.kernel) / self.stride + 1;
        (out(self.h), out(self.w))
    }

    /// Input rows (or columns) `lo..hi` that output row (or column) `o` reads, padding excluded.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize) as usize).min(len);
        (lo, hi)
    }

    /// The index within `plane` of each output's window maximum: the first in row-major order,
    /// a NaN if there is one (as PyTorch). Every window holds at least one input element because
    /// padding ≤ kernel / 2.
    fn argmax<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let ((y0, y1), (x0, x1)) = (self.window(oy, self.h), self.window(ox, self.w));
        let mut best = y0 * self.w + x0;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * self.w + x;
                let v = plane[i];
                #[allow(clippy::eq_op)]
                let is_nan = v != v;
                if is_nan {
                    return i;
                }
                if v > plane[best] {
                    best = i;
                }
            }
        }
        best
    }

    fn forward_kernel<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (ho, wo) = self.output_hw();
        let (plane_in, plane_out) = (self.h * self.w, ho * wo);
        let mut y = vec![T::from_f64(0.0); self.n * self.c * plane_out];
        let out = SharedSlice::new(&mut y);
        candle_core::utils::barrier_pool().execute_chunked(self.n * self.c, |planes| {
            for p in planes {
                let plane = &x[p * plane_in..][..plane_in];
                // SAFETY: one output plane per input plane, each handled once.
                let dst = unsafe { out.range(p * plane_out, plane_out) };
                for oy in 0..ho {
                    for ox in 0..wo {
                        dst[oy * wo + ox] = plane[self.argmax(plane, oy, ox)];
                    }
                }
            }
        });
        y
    }

    fn backward_kernel<T: WithDType>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        let (ho, wo) = self.output_hw();
        let (plane_in, plane_out) = (self.h * self.w, ho * wo);
        let mut dx = vec![T::from_f64(0.0); x.len()];
        let out = SharedSlice::new(&mut dx);
        candle_core::utils::barrier_pool().execute_chunked(self.n * self.c, |planes| {
            for p in planes {
                let plane = &x[p * plane_in..][..plane_in];
                // SAFETY: each input plane's gradient is written by the task of that plane only.
                let dst = unsafe { out.range(p * plane_in, plane_in) };
                let g = &grad[p * plane_out..][..plane_out];
                for oy in 0..ho {
                    for ox in 0..wo {
                        dst[self.argmax(plane, oy, ox)] += g[oy * wo + ox];
                    }
                }
            }
        });
        dx
    }

    /// Device-generic: −∞ padding by edge replication (the replicated value is in every window
    /// that reads the padding, since padding ≤ kernel / 2), then a separable maximum over
    /// `kernel` strided taps per axis, each an `index_select`.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let padded = if self.padding > 0 {
            x.pad_with_same(2, self.padding, self.padding)?.pad_with_same(3, self.padding, self.padding)?
        } else {
            x.clone()
        };
        let (ho, wo) = self.output_hw();
        let rows = self.strided_window_max(&padded, 2, ho)?;
        self.strided_window_max(&rows, 3, wo)
    }

    fn strided_window_max(&self, x: &Tensor, dim: usize, out: usize) -> Result<Tensor> {
        let mut best: Option<Tensor> = None;
        for tap in 0..self.kernel {
            let index: Vec<u32> = (0..out).map(|i| (i * self.stride + tap) as u32).collect();
            let values = x.index_select(&Tensor::new(index, x.device())?, dim)?;
            best = Some(match best {
                None => values,
                Some(b) => b.maximum(&values)?,
            });
        }
        best.ok_or_else(|| candle_core::Error::Msg("max_pool2d: kernel of size 0".into()))
    }
}

/// The part of a buffer a contiguous layout addresses.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("max_pool2d: expects a contiguous buffer"),
    }
}

impl candle_core::CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(pool: &MaxPool, data: &[T], layout: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(pool.forward_kernel(contiguous(data, layout)?)))
        }
        let y = match storage {
            CpuStorage::F32(d) => run(self, d, layout)?,
            CpuStorage::F64(d) => run(self, d, layout)?,
            CpuStorage::BF16(d) => run(self, d, layout)?,
            CpuStorage::F16(d) => run(self, d, layout)?,
            other => candle_core::bail!("max_pool2d: float input expected, not {:?}", other.dtype()),
        };
        let (ho, wo) = self.output_hw();
        Ok((y, (self.n, self.c, ho, wo).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let grad = grad_res.contiguous()?;
        let (x_storage, x_layout) = arg.storage_and_layout();
        let (g_storage, g_layout) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*x_storage, &*g_storage) else {
            candle_core::bail!("max_pool2d: the CPU op's backward runs on the CPU");
        };
        fn run<T: WithDType>(
            pool: &MaxPool,
            x: &[T],
            g: &[T],
            (xl, gl): (&Layout, &Layout),
            arg: &Tensor,
        ) -> Result<Tensor> {
            let dx = pool.backward_kernel(contiguous(x, xl)?, contiguous(g, gl)?);
            Tensor::from_vec(dx, arg.shape(), arg.device())
        }
        let layouts = (x_layout, g_layout);
        let dx = match (xs, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => run(self, x, g, layouts, arg)?,
            (CpuStorage::F64(x), CpuStorage::F64(g)) => run(self, x, g, layouts, arg)?,
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => run(self, x, g, layouts, arg)?,
            (CpuStorage::F16(x), CpuStorage::F16(g)) => run(self, x, g, layouts, arg)?,
            _ => candle_core::bail!("max_pool2d: input {:?} and gradient {:?} dtypes", xs.dtype(), gs.dtype()),
        };
        Ok(Some(dx))
    }
}
