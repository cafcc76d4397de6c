//! Gradient checkpointing: [`checkpoint`] runs a function without recording its graph and
//! recomputes it in the backward.
//!
//! Candle's graph keeps every intermediate tensor of a function until the backward is over. For
//! a stack of transformer blocks that is all blocks' activations at once; with each block under
//! [`checkpoint`] the graph keeps only each block's input, and the backward rebuilds one block's
//! graph at a time (Chen et al. 2016, "Training deep nets with sublinear memory cost"; PyTorch's
//! `torch.utils.checkpoint`). The price is one extra forward of each checkpointed function.
//!
//! How: a [`CustomOp1`] on the input x whose forward hands over the value computed beforehand on
//! the detached x (the same "precomputed value" mechanism as the tiled attention and the frozen
//! convolutions), and whose backward evaluates f again on a fresh `Var` holding x, backpropagates
//! ⟨f(x), ḡ⟩ through that one graph and returns ∂/∂x. The node holds f and nothing else: the
//! input is the op's argument (Candle keeps it anyway), the output is the node itself.

use std::sync::{Arc, Mutex};

use super::conv::{on_cpu as cpu, on_cuda as cuda, on_metal as metal, take_precomputed};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Storage, Tensor, Var,
};

/// `f(x)`, with the gradient with respect to `x` computed by recomputing `f` in the backward
/// instead of keeping its graph.
///
/// Only `x` is differentiable: whatever else `f` reads (weights, conditioning) is captured by the
/// closure and must be a constant — a plain tensor that depends on no `Var`. A capture that does
/// (a weight being trained, a context that is optimised) is refused with an error instead of
/// silently getting no gradient: it is detected by running `f` on the detached `x` and finding
/// that its output still records a graph. (Several differentiable inputs: [`checkpoint_many`].)
///
/// `f` must be deterministic (it is evaluated twice and the backward differentiates the second
/// evaluation at the point of the first), and may itself contain custom ops with their own
/// backward (tiled attention, frozen matmuls) and checkpoints (nested checkpointing: each level
/// keeps its inputs, and the backward rebuilds one innermost graph at a time). When `x` records no
/// graph (inference), this is just `f(x)`.
pub fn checkpoint<F>(x: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    checkpoint_many(std::slice::from_ref(x), move |inputs| f(&inputs[0]))
}

/// [`checkpoint`] of a function of one to three inputs, each differentiable: the backward
/// returns a gradient for every input that records a graph. Everything else `f` reads must be a
/// constant, as for [`checkpoint`].
pub fn checkpoint_many<F>(inputs: &[Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    if inputs.is_empty() || inputs.len() > 3 {
        candle_core::bail!("checkpoint: 1 to 3 inputs, got {}", inputs.len())
    }
    let detached: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let value = f(&detached)?;
    if value.track_op() {
        candle_core::bail!(
            "checkpoint: the function's output depends on a Var other than its inputs (a captured weight or \
             input that carries a gradient); only the input is differentiable through a checkpoint"
        )
    }
    if !inputs.iter().any(Tensor::track_op) {
        return Ok(value);
    }
    let op = Checkpoint { value: Mutex::new(Some(value)), f: Box::new(f) };
    match inputs {
        [a] => a.apply_op1_arc(Arc::new(Box::new(op))),
        [a, b] => a.apply_op2_arc(b, Arc::new(Box::new(op))),
        [a, b, c] => a.apply_op3_arc(b, c, Arc::new(Box::new(op))),
        _ => unreachable!("checked above"),
    }
}

type Function = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// The graph node of [`checkpoint_many`].
struct Checkpoint {
    /// f(inputs) from the forward, handed over once.
    value: Mutex<Option<Tensor>>,
    f: Function,
}

impl Checkpoint {
    fn take_value<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        take_precomputed(&self.value, pick, "checkpoint")
    }

    /// The gradient of ⟨f(inputs), ȳ⟩ for each input that records a graph: f evaluated again
    /// on fresh leaves, one backward through that graph, which is dropped on return.
    fn gradients(&self, inputs: &[&Tensor], grad_y: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .map(|t| if t.track_op() { Var::from_tensor(&t.detach()).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        let leaves: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|(t, v)| match v {
                Some(v) => v.as_tensor().clone(),
                None => t.detach(),
            })
            .collect();
        let y = (self.f)(&leaves)?;
        drop(leaves);
        if y.shape() != grad_y.shape() {
            candle_core::bail!(
                "checkpoint: the recomputed output has shape {:?}, the forward's {:?} (f is not deterministic)",
                y.dims(),
                grad_y.dims()
            )
        }
        // ⟨y, ȳ⟩ as one node whose backward gives y the gradient ȳ: the product y·ȳ in the graph
        // would keep a y-sized tensor and a y-sized gradient for the constant ȳ.
        let grad_y = grad_y.detach();
        let seed = (y.detach() * &grad_y)?.sum_all()?;
        let inner = super::fused::with_backward(&y, seed, "checkpoint-seed", move |_y, g| grad_y.broadcast_mul(g))?;
        let grads = inner.backward()?;
        Ok(vars.iter().map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor())).map(Tensor::detach)).collect())
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
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
        Ok(self.gradients(&[x], grad_y)?.pop().flatten())
    }
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
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

    fn bwd(&self, a: &Tensor, b: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.gradients(&[a, b], grad_y)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take_value(cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.take_value(cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.take_value(metal)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.gradients(&[a, b, c], grad_y)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    //! [`checkpoint`] against the full graph of the same function (equal gradients), against
    //! central finite differences per variable, and the graph it leaves (no inner nodes).

    use super::*;
    use crate::gradcheck::{check_gradients, GradCheckOptions};
    use crate::ops::{gelu_erf, layer_norm, sdpa_tiled, softmax};
    use crate::rng::SplitMix64;
    use candle_core::{DType, Device, D};

    const TOKENS: usize = 6;
    const WIDTH: usize = 8;

    fn normal(shape: &[usize], seed: u64) -> Tensor {
        SplitMix64::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap()
    }

    /// A small pre-LN transformer block on (B, N, D): softmax self-attention (one head) and a
    /// GELU MLP, both residual. Frozen weights captured as plain tensors.
    #[derive(Clone)]
    struct Block {
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        w1: Tensor,
        w2: Tensor,
        /// Attention through `sdpa_tiled` (a custom op with its own backward inside the
        /// checkpointed function) instead of the composed softmax.
        tiled: bool,
    }

    impl Block {
        fn new(seed: u64, tiled: bool) -> Self {
            let w = |i: usize, o: usize, s: u64| (normal(&[i, o], seed * 10 + s) / (i as f64).sqrt()).unwrap();
            Self {
                wq: w(WIDTH, WIDTH, 1),
                wk: w(WIDTH, WIDTH, 2),
                wv: w(WIDTH, WIDTH, 3),
                w1: w(WIDTH, 2 * WIDTH, 4),
                w2: w(2 * WIDTH, WIDTH, 5),
                tiled,
            }
        }

        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            let h = layer_norm(x, None, None, 1e-6)?;
            let (q, k, v) =
                (h.broadcast_matmul(&self.wq)?, h.broadcast_matmul(&self.wk)?, h.broadcast_matmul(&self.wv)?);
            let attended = if self.tiled {
                sdpa_tiled(&q.unsqueeze(1)?, &k.unsqueeze(1)?, &v.unsqueeze(1)?, None, None, 4)?.squeeze(1)?
            } else {
                let scores = (q.matmul(&k.t()?)? / (WIDTH as f64).sqrt())?;
                softmax(&scores, D::Minus1)?.matmul(&v)?
            };
            let x = (x + attended)?;
            let m = gelu_erf(&layer_norm(&x, None, None, 1e-6)?.broadcast_matmul(&self.w1)?)?;
            x + m.broadcast_matmul(&self.w2)?
        }
    }

    /// Two blocks, each checkpointed or not; ⟨y, r⟩ of the output.
    struct TwoBlocks {
        blocks: [Block; 2],
        readout: Tensor,
    }

    impl TwoBlocks {
        fn new(tiled: bool) -> Self {
            Self { blocks: [Block::new(1, tiled), Block::new(2, tiled)], readout: normal(&[2, TOKENS, WIDTH], 9) }
        }

        fn output(&self, x: &Tensor, checkpointed: bool) -> Result<Tensor> {
            let mut y = x.clone();
            for b in &self.blocks {
                y = if checkpointed {
                    let b = b.clone();
                    checkpoint(&y, move |t| b.forward(t))?
                } else {
                    b.forward(&y)?
                };
            }
            Ok(y)
        }

        fn loss(&self, x: &Tensor, checkpointed: bool) -> Result<Tensor> {
            (self.output(x, checkpointed)? * &self.readout)?.sum_all()
        }
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn input() -> Var {
        Var::from_tensor(&normal(&[2, TOKENS, WIDTH], 7)).unwrap()
    }

    #[test]
    fn checkpointed_equals_full_graph() {
        // Same function, same inputs: the recomputed block graph is the full graph's block graph,
        // visited in the same order, so the values and the gradient agree to round-off (measured:
        // bitwise equal, 0.0, with both attentions). 1e-14 allows for an order change.
        for tiled in [false, true] {
            let model = TwoBlocks::new(tiled);
            let x = input();
            let full = model.loss(x.as_tensor(), false).unwrap();
            let ckpt = model.loss(x.as_tensor(), true).unwrap();
            let g_full = full.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let g_ckpt = ckpt.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let value_diff = (full.to_scalar::<f64>().unwrap() - ckpt.to_scalar::<f64>().unwrap()).abs();
            let grad_diff = max_abs(&(&g_full - &g_ckpt).unwrap());
            eprintln!("tiled {tiled}: value diff {value_diff:.1e}, gradient max diff {grad_diff:.1e}");
            assert!(max_abs(&g_full) > 1e-2, "degenerate gradient");
            assert!(value_diff <= 1e-14 && grad_diff <= 1e-14 * max_abs(&g_full), "tiled {tiled}");
        }
    }

    #[test]
    fn checkpointed_matches_finite_differences() {
        // Tolerance as for every op in `ops::tests` (f64, ε = 1e-6).
        for tiled in [false, true] {
            let model = TwoBlocks::new(tiled);
            let x = input();
            let report = check_gradients(
                &[("x", x.clone())],
                || model.loss(x.as_tensor(), true),
                &GradCheckOptions { eps: 1e-6, directions: 4, ..Default::default() },
            )
            .unwrap();
            let what = format!("checkpointed 2 blocks, tiled attention {tiled}");
            assert!(report.vars_without_grad().is_empty(), "{what}: no gradient");
            report.assert_nondegenerate(1e-8, &what).unwrap();
            report.assert_close(1e-6, &what).unwrap();
            eprintln!("{what}: max rel error {:.2e}", report.max_rel_error());
        }
    }

    #[test]
    fn the_inner_graph_is_not_kept() {
        // The graph behind the output: the full graph has every op of both blocks; checkpointed,
        // it is the input and one node per block.
        let model = TwoBlocks::new(false);
        let x = input();
        let full = model.output(x.as_tensor(), false).unwrap();
        let ckpt = model.output(x.as_tensor(), true).unwrap();
        let (n_full, n_ckpt) = (full.sorted_nodes().len(), ckpt.sorted_nodes().len());
        eprintln!("graph nodes: full {n_full}, checkpointed {n_ckpt}");
        assert_eq!(n_ckpt, 3, "x and one checkpoint node per block");
        assert!(n_full > 40, "the full graph has the blocks' ops ({n_full})");
    }

    #[test]
    fn without_a_graph_it_is_the_function() {
        let model = TwoBlocks::new(false);
        let x = normal(&[2, TOKENS, WIDTH], 7);
        let y = model.output(&x, true).unwrap();
        assert!(!y.track_op());
        assert_eq!(max_abs(&(y - model.output(&x, false).unwrap()).unwrap()), 0.0);
    }

    /// f(x, a, b) = block(x + a·b) with a, b broadcast over the tokens: three differentiable
    /// inputs of different shapes.
    fn three_inputs(model: &TwoBlocks, t: &[Tensor]) -> Result<Tensor> {
        model.blocks[0].forward(&t[0].broadcast_add(&t[1].broadcast_mul(&t[2])?)?)
    }

    #[test]
    fn checkpoint_many_equals_full_graph_and_finite_differences() {
        let model = std::sync::Arc::new(TwoBlocks::new(true));
        let x = input();
        let a = Var::from_tensor(&normal(&[1, 1, WIDTH], 11)).unwrap();
        let b = Var::from_tensor(&normal(&[2, TOKENS, 1], 12)).unwrap();
        let inputs = || vec![x.as_tensor().clone(), a.as_tensor().clone(), b.as_tensor().clone()];
        let m = model.clone();
        let checkpointed = move || -> Result<Tensor> {
            let inner = m.clone();
            let y = checkpoint_many(&inputs(), move |t| three_inputs(&inner, t))?;
            (y * &m.readout)?.sum_all()
        };
        let full = || {
            (three_inputs(&model, &[x.as_tensor().clone(), a.as_tensor().clone(), b.as_tensor().clone()])?
                * &model.readout)?
                .sum_all()
        };
        let (g_c, g_f) = (checkpointed().unwrap().backward().unwrap(), full().unwrap().backward().unwrap());
        for (name, v) in [("x", &x), ("a", &a), ("b", &b)] {
            let (c, f) = (g_c.get(v.as_tensor()).unwrap(), g_f.get(v.as_tensor()).unwrap());
            assert_eq!(max_abs(&(c - f).unwrap()), 0.0, "{name}: checkpointed differs from the full graph");
        }
        let report = check_gradients(
            &[("x", x.clone()), ("a", a.clone()), ("b", b.clone())],
            checkpointed,
            &GradCheckOptions { eps: 1e-6, directions: 4, ..Default::default() },
        )
        .unwrap();
        assert!(report.vars_without_grad().is_empty());
        report.assert_nondegenerate(1e-8, "checkpoint_many").unwrap();
        report.assert_close(1e-6, "checkpoint_many").unwrap();
        // A constant among the inputs gets no gradient and changes nothing.
        let y =
            checkpoint_many(&[x.as_tensor().clone(), a.as_tensor().detach()], |t| t[0].broadcast_mul(&t[1])).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(checkpoint_many(&[], |t| Ok(t[0].clone())).is_err());
    }

    #[test]
    fn a_captured_var_is_refused() {
        let w = Var::from_tensor(&normal(&[WIDTH, WIDTH], 3)).unwrap();
        let x = input();
        let w_captured = w.as_tensor().clone();
        let err = checkpoint(x.as_tensor(), move |t| t.broadcast_matmul(&w_captured)).unwrap_err().to_string();
        assert!(err.contains("only the input is differentiable"), "{err}");
    }
}
