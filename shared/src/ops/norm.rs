//! Batch normalisation: the training-mode forward as one op with its closed-form backward, and
//! the [`BatchNorm2d`] module (PyTorch's and `candle_nn`'s parameter names and running-statistics
//! rule).
//!
//! Why one op: composed from tensor ops (what `candle_nn::BatchNorm` does), a training-mode
//! batch norm is nine full-size passes forward (transpose copy, mean, subtract, square, mean,
//! divide, scale, shift, transpose back) and about twice that backward, each allocating a
//! full-size tensor; in the multimodal LAPO iteration (ResNet18, batch 64) the twenty batch norms
//! and their backward were the largest share of the elementwise time after the GEMMs (profile in
//! issue #20's note). Here the forward reads x twice and writes y once; the backward reads x and
//! the output gradient twice and writes the input gradient once. CPU, f32/f64; other devices and
//! dtypes take the composed path (same formula, Candle differentiates it).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, ModuleT, Result, Shape, Storage, Tensor, Var, WithDType};

use super::parallel::SharedSlice;

/// Per-channel batch statistics of one training-mode forward: mean and biased variance.
#[derive(Clone, Debug)]
struct Stats {
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// (N, C, S) of x (N, C, *): batch, channels, positions per channel and image.
fn geometry(x: &Tensor) -> Result<(usize, usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("batch norm: input of shape {dims:?}, expected (N, C, ...)");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Training-mode batch norm of x (N, C, *) with per-channel `weight` and `bias` (C): normalised by
/// the batch's own per-channel mean and biased variance over N and the trailing dimensions, as
/// PyTorch's `F.batch_norm(training=True)`. Returns (y, batch mean, batch biased variance); the
/// statistics are plain tensors (C) for the caller's running averages.
///
/// Differentiable in x, weight and bias, through the statistics (finite-difference tests).
pub fn batch_norm_train(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, s) = geometry(x)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            candle_core::bail!("batch norm: {name} of shape {:?} for {c} channels", t.dims());
        }
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        candle_core::bail!("batch norm: eps must be finite and ≥ 0, got {eps}");
    }
    if n * s == 0 {
        candle_core::bail!("batch norm: no values per channel in an input of shape {:?}", x.dims());
    }
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype();
    if !fused {
        return batch_norm_train_composed(x, weight, bias, eps);
    }
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain { eps, geometry: (n, c, s), stats: stats.clone() };
    let y = x.contiguous()?.apply_op3_arc(&weight.contiguous()?, &bias.contiguous()?, Arc::new(Box::new(op)))?;
    let Stats { mean, var } = stats
        .lock()
        .map_err(|_| candle_core::Error::Msg("batch norm: statistics lock poisoned".into()))?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch norm: the forward recorded no statistics".into()))?;
    let stat = |v: Vec<f64>| Tensor::from_vec(v, c, x.device())?.to_dtype(x.dtype());
    Ok((y, stat(mean)?, stat(var)?))
}

/// The same function from tensor ops (any device and dtype; half precision computed in f32).
pub(super) fn batch_norm_train_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, _) = geometry(x)?;
    let internal = if matches!(x.dtype(), DType::F16 | DType::BF16) { DType::F32 } else { x.dtype() };
    let by_channel = x.to_dtype(internal)?.transpose(0, 1)?;
    let channel_dims = by_channel.dims().to_vec();
    let flat = by_channel.flatten_from(1)?;
    let mean = flat.mean_keepdim(1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let scale = weight.to_dtype(internal)?.reshape((c, 1))?.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = centred.broadcast_mul(&scale)?.broadcast_add(&bias.to_dtype(internal)?.reshape((c, 1))?)?;
    let y = y.reshape(channel_dims)?.transpose(0, 1)?.to_dtype(x.dtype())?;
    let stat = |t: Tensor| t.detach().flatten_all()?.to_dtype(x.dtype());
    Ok((y, stat(mean)?, stat(var)?))
}

/// The fused training-mode op: (x, weight, bias) → y, recording the batch statistics for the
/// caller and for its own backward.
struct BatchNormTrain {
    eps: f64,
    geometry: (usize, usize, usize),
    stats: Arc<Mutex<Option<Stats>>>,
}

/// The contiguous `T` slice of a CPU storage.
fn cpu_slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("batch norm: expects contiguous buffers"),
    }
}

/// The per-channel sums of the forward: mean and biased variance (two passes, f64).
fn channel_stats<T: WithDType>(x: &[T], (n, c, s): (usize, usize, usize), ch: usize) -> (f64, f64) {
    let planes = || (0..n).map(move |i| &x[(i * c + ch) * s..][..s]);
    let count = (n * s) as f64;
    let mean = planes().map(|p| p.iter().map(|v| v.to_f64()).sum::<f64>()).sum::<f64>() / count;
    let var = planes()
        .map(|p| {
            p.iter()
                .map(|v| {
                    let d = v.to_f64() - mean;
                    d * d
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / count;
    (mean, var)
}

fn forward_kernel<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    geometry: (usize, usize, usize),
    eps: f64,
) -> (Vec<T>, Stats) {
    let (n, c, s) = geometry;
    let mut y = vec![T::from_f64(0.0); x.len()];
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    let (y_out, mean_out, var_out) =
        (SharedSlice::new(&mut y), SharedSlice::new(&mut mean), SharedSlice::new(&mut var));
    candle_core::utils::barrier_pool().execute_chunked(c, |channels| {
        for ch in channels {
            let (mu, v) = channel_stats(x, geometry, ch);
            // y = (x − μ)·w/σ + b = x·scale + shift.
            let scale = weight[ch].to_f64() / (v + eps).sqrt();
            let shift = bias[ch].to_f64() - mu * scale;
            for i in 0..n {
                let start = (i * c + ch) * s;
                // SAFETY: each (image, channel) plane belongs to one channel, handled once.
                let out = unsafe { y_out.range(start, s) };
                for (o, xv) in out.iter_mut().zip(&x[start..start + s]) {
                    *o = T::from_f64(xv.to_f64() * scale + shift);
                }
            }
            // SAFETY: one entry per channel.
            unsafe {
                mean_out.range(ch, 1)[0] = mu;
                var_out.range(ch, 1)[0] = v;
            }
        }
    });
    (y, Stats { mean, var })
}

/// dx, dweight, dbias of the training-mode batch norm. With x̂ = (x − μ)/σ, M = N·S values per
/// channel: dbias = Σ g, dweight = Σ g·x̂, dx = (w/σ)·(g − dbias/M − x̂·dweight/M) — the
/// gradient through y's direct dependence on x and through μ and σ.
fn backward_kernel<T: WithDType>(
    x: &[T],
    grad: &[T],
    weight: &[T],
    stats: &Stats,
    geometry: (usize, usize, usize),
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (n, c, s) = geometry;
    let count = (n * s) as f64;
    let mut dx = vec![T::from_f64(0.0); x.len()];
    let (mut dweight, mut dbias) = (vec![T::from_f64(0.0); c], vec![T::from_f64(0.0); c]);
    let (dx_out, dw_out, db_out) =
        (SharedSlice::new(&mut dx), SharedSlice::new(&mut dweight), SharedSlice::new(&mut dbias));
    candle_core::utils::barrier_pool().execute_chunked(c, |channels| {
        for ch in channels {
            let (mu, inv_std) = (stats.mean[ch], 1.0 / (stats.var[ch] + eps).sqrt());
            let (mut sum_g, mut sum_g_xhat) = (0.0, 0.0);
            for i in 0..n {
                let start = (i * c + ch) * s;
                for (g, xv) in grad[start..start + s].iter().zip(&x[start..start + s]) {
                    let g = g.to_f64();
                    sum_g += g;
                    sum_g_xhat += g * (xv.to_f64() - mu) * inv_std;
                }
            }
            // dx = a·g + b·(x − μ) + offset, the three terms of the formula above.
            let a = weight[ch].to_f64() * inv_std;
            let b = -a * inv_std * sum_g_xhat / count;
            let offset = -a * sum_g / count;
            for i in 0..n {
                let start = (i * c + ch) * s;
                // SAFETY: each (image, channel) plane belongs to one channel, handled once.
                let out = unsafe { dx_out.range(start, s) };
                for ((o, g), xv) in out.iter_mut().zip(&grad[start..start + s]).zip(&x[start..start + s]) {
                    *o = T::from_f64(a * g.to_f64() + b * (xv.to_f64() - mu) + offset);
                }
            }
            // SAFETY: one entry per channel.
            unsafe {
                dw_out.range(ch, 1)[0] = T::from_f64(sum_g_xhat);
                db_out.range(ch, 1)[0] = T::from_f64(sum_g);
            }
        }
    });
    (dx, dweight, dbias)
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(
            op: &BatchNormTrain,
            (x, xl): (&CpuStorage, &Layout),
            (w, wl): (&CpuStorage, &Layout),
            (b, bl): (&CpuStorage, &Layout),
        ) -> Result<(CpuStorage, Stats)> {
            let (y, stats) = forward_kernel(
                cpu_slice::<T>(x, xl)?,
                cpu_slice::<T>(w, wl)?,
                cpu_slice::<T>(b, bl)?,
                op.geometry,
                op.eps,
            );
            Ok((T::to_cpu_storage_owned(y), stats))
        }
        let args = ((x, x_layout), (weight, weight_layout), (bias, bias_layout));
        let (y, stats) = match x.dtype() {
            DType::F32 => run::<f32>(self, args.0, args.1, args.2)?,
            DType::F64 => run::<f64>(self, args.0, args.1, args.2)?,
            other => candle_core::bail!("batch norm: the fused op takes f32 or f64, not {other:?}"),
        };
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("batch norm: statistics lock poisoned".into()))? =
            Some(stats);
        Ok((y, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch norm: statistics lock poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward before forward".into()))?;
        let grad = grad_res.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (g_storage, g_layout) = grad.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs), Storage::Cpu(ws)) = (&*x_storage, &*g_storage, &*w_storage) else {
            candle_core::bail!("batch norm: the fused op's backward runs on the CPU");
        };
        fn run<T: WithDType>(
            op: &BatchNormTrain,
            stats: &Stats,
            (x, xl): (&CpuStorage, &Layout),
            (g, gl): (&CpuStorage, &Layout),
            (w, wl): (&CpuStorage, &Layout),
        ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            Ok(backward_kernel(
                cpu_slice::<T>(x, xl)?,
                cpu_slice::<T>(g, gl)?,
                cpu_slice::<T>(w, wl)?,
                stats,
                op.geometry,
                op.eps,
            ))
        }
        let args = ((xs, x_layout), (gs, g_layout), (ws, w_layout));
        let c = self.geometry.1;
        let device = x.device();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (dx, dw, db) = run::<f32>(self, &stats, args.0, args.1, args.2)?;
                (
                    Tensor::from_vec(dx, x.shape(), device)?,
                    Tensor::from_vec(dw, c, device)?,
                    Tensor::from_vec(db, c, device)?,
                )
            }
            DType::F64 => {
                let (dx, dw, db) = run::<f64>(self, &stats, args.0, args.1, args.2)?;
                (
                    Tensor::from_vec(dx, x.shape(), device)?,
                    Tensor::from_vec(dw, c, device)?,
                    Tensor::from_vec(db, c, device)?,
                )
            }
            other => candle_core::bail!("batch norm: the fused op takes f32 or f64, not {other:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Batch normalisation over channel dim 1 with PyTorch's parameters and buffers (`weight`,
/// `bias`, `running_mean`, `running_var`, read from or created in the VarBuilder as
/// `candle_nn::batch_norm` does) and its running-statistics rule: in training mode the running
/// mean and variance move by `momentum` towards the batch mean and the *unbiased* batch
/// variance; in evaluation mode the running statistics normalise (detached) and the path is
/// plain tensor ops, differentiable in x on every device.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    running_mean: Var,
    running_var: Var,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        if !(eps >= 0.0 && eps.is_finite() && (0.0..=1.0).contains(&momentum)) {
            candle_core::bail!("batch norm: eps {eps} (finite, ≥ 0) or momentum {momentum} (in [0, 1]) out of range");
        }
        let running_mean = vb.get_with_hints(channels, "running_mean", candle_nn::Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", candle_nn::Init::Const(1.0))?;
        Ok(Self {
            // A VarMap hands out its variables themselves, so the running statistics written
            // here are the ones the VarMap saves.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            eps,
            momentum,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, s) = geometry(x)?;
        let count = n * s;
        if count < 2 {
            candle_core::bail!(
                "batch norm in training mode needs more than one value per channel, got input {:?}",
                x.dims()
            );
        }
        let (y, mean, var) = batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
        let stat_dtype = self.running_mean.dtype();
        let keep = 1.0 - self.momentum;
        let mean = mean.to_dtype(stat_dtype)?;
        let unbiased = (var.to_dtype(stat_dtype)? * (count as f64 / (count as f64 - 1.0)))?;
        self.running_mean.set(&((self.running_mean.as_tensor() * keep)? + (mean * self.momentum)?)?)?;
        self.running_var.set(&((self.running_var.as_tensor() * keep)? + (unbiased * self.momentum)?)?)?;
        Ok(y)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _) = geometry(x)?;
        let mut shape = vec![1; x.rank()];
        shape[1] = c;
        let mean = self.running_mean.as_detached_tensor().reshape(shape.as_slice())?;
        let std = (self.running_var.as_detached_tensor().reshape(shape.as_slice())? + self.eps)?.sqrt()?;
        x.broadcast_sub(&mean)?
            .broadcast_div(&std)?
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }
}
