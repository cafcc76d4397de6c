//! The causal time padding of a cached temporal convolution, with an adjoint injected into its
//! backward.
//!
//! A causal conv over chunks of a video reads `[zeros ‖ cached frames ‖ x]` and hands its last
//! frames on as the next chunk's cache. A chunk-wise recomputing backward (the Wan VAE decode)
//! knows the adjoint of that outgoing cache from the next chunk, and must add it to the gradient of
//! those frames. Adding ⟨cache, adjoint⟩ to the loss does that, but Candle then pads every cached
//! slice's gradient to its full tensor at the very start of the backward and holds them all until
//! the backward reaches each conv (measured: +48 MB, 23 %, on one Wan2.1 decode chunk at 32×32).
//! [`causal_pad`] instead adds the adjoint when the backward reaches the padding itself.

use std::sync::{Arc, Mutex};

use super::conv::{on_cpu as cpu, on_cuda as cuda, on_metal as metal};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// `[zeros(front) ‖ prefix ‖ x]` along `dim`. With `tail_adjoint` (n frames), the backward also
/// adds `tail_adjoint` to the gradient of the output's last n frames — exactly the gradient of an
/// extra term ⟨out[−n:], tail_adjoint⟩ in the loss, without that term's memory. The zeros get no
/// gradient; `prefix` and `x` get theirs as from a concatenation.
pub fn causal_pad(
    x: &Tensor,
    prefix: Option<&Tensor>,
    front: usize,
    dim: usize,
    tail_adjoint: Option<&Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    if front > 0 {
        let mut dims = x.dims().to_vec();
        if dim >= dims.len() {
            candle_core::bail!("causal_pad: dim {dim} of a rank-{} tensor", dims.len())
        }
        dims[dim] = front;
        parts.push(Tensor::zeros(dims, x.dtype(), x.device())?);
    }
    let prefix = prefix.map(|p| p.to_dtype(x.dtype())).transpose()?;
    parts.extend(prefix.iter().cloned());
    parts.push(x.clone());
    let Some(adjoint) = tail_adjoint else {
        return Tensor::cat(&parts, dim);
    };
    // The value, computed with no graph; the op below only copies it into its own storage.
    let detached: Vec<Tensor> = parts.iter().map(Tensor::detach).collect();
    let value = Tensor::cat(&detached, dim)?;
    let total = value.dim(dim)?;
    let n = adjoint.dim(dim)?;
    if n > total || adjoint.rank() != value.rank() {
        candle_core::bail!("causal_pad: an adjoint of {:?} for an output of {:?}", adjoint.dims(), value.dims())
    }
    let op = InjectTail {
        value: Mutex::new(Some(value)),
        adjoint: adjoint.to_dtype(x.dtype())?,
        dim,
        front,
        prefix_len: match &prefix {
            Some(p) => p.dim(dim)?,
            None => 0,
        },
    };
    match &prefix {
        Some(p) => p.apply_op2_arc(x, Arc::new(Box::new(op))),
        None => x.apply_op1_arc(Arc::new(Box::new(op))),
    }
}

struct InjectTail {
    /// The forward value, handed over once.
    value: Mutex<Option<Tensor>>,
    adjoint: Tensor,
    dim: usize,
    front: usize,
    prefix_len: usize,
}

impl InjectTail {
    fn take_value<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        super::conv::take_precomputed(&self.value, pick, "causal_pad")
    }

    /// The output's gradient with the adjoint added to its last frames, split into (prefix, x).
    fn split(&self, grad: &Tensor, x_len: usize) -> Result<(Option<Tensor>, Tensor)> {
        let total = grad.dim(self.dim)?;
        let n = self.adjoint.dim(self.dim)?;
        let tail = (grad.narrow(self.dim, total - n, n)? + &self.adjoint)?;
        let grad = Tensor::cat(&[&grad.narrow(self.dim, 0, total - n)?, &tail], self.dim)?;
        let prefix = (self.prefix_len > 0).then(|| grad.narrow(self.dim, self.front, self.prefix_len)).transpose()?;
        Ok((prefix, grad.narrow(self.dim, self.front + self.prefix_len, x_len)?))
    }
}

impl CustomOp1 for InjectTail {
    fn name(&self) -> &'static str {
        "causal-pad-inject-tail"
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

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.split(grad, x.dim(self.dim)?)?.1))
    }
}

impl CustomOp2 for InjectTail {
    fn name(&self) -> &'static str {
        "causal-pad-inject-tail"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take_value(cpu)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.take_value(cuda)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.take_value(metal)
    }

    fn bwd(
        &self,
        _prefix: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (prefix, x) = self.split(grad, x.dim(self.dim)?)?;
        Ok((prefix, Some(x)))
    }
}
