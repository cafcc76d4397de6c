//! Memory-efficient scaled dot-product attention: [`sdpa_tiled`].
//!
//! [`super::sdpa`] builds the whole (Lq × Lk) score matrix per head, and Candle's graph keeps it
//! and the softmax until backward: at the Cosmos DiT's 480p × 93 frames that is ~1.4·10⁹ entries
//! per head. [`sdpa_tiled`] never holds more than one (tile × tile) block of scores per head, in
//! the forward or in the backward (FlashAttention-2, Dao 2023, algorithms 1 and 2):
//!
//! * forward: for each query tile, a pass over key tiles with the online softmax — running row
//!   max m, normaliser l = Σ exp(s − m) and accumulator Σ exp(s − m)·V, rescaled by exp(m_old −
//!   m_new) whenever the max grows. It keeps only the output O and each row's log-sum-exp
//!   L = m + ln l.
//! * backward: a custom op on (q, k, v) whose backward recomputes each tile's probabilities
//!   P = exp(S − L) from q, k and L, and with D = rowsum(dO ∘ O):
//!   dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = Pᵀ·dO.
//!
//! Everything is composed from Candle tensor ops on tiles (batched over batch and heads), so it
//! runs on every device Candle has; the forward and backward are computed on detached tensors,
//! so no graph of tiles is ever recorded. Why not CPU kernels: the cost is in the tile GEMMs
//! (7 per tile pair: 2 forward, 5 backward, against 6 for the materialising version), which
//! Candle's matmul already does; fused CPU loops would save the few elementwise passes over a
//! tile, would need a second, tensor-op path for CUDA and Metal anyway, and each path its own
//! tests.

use std::sync::{Arc, Mutex};

use super::conv::{on_cpu as cpu, on_cuda as cuda, on_metal as metal};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, MetalStorage, Result, Shape, Storage, Tensor};

/// Scaled dot-product attention that never holds a full Lq × Lk matrix, forward or backward.
///
/// `q`: (B, H, Lq, D), `k`: (B, H, Lk, D), `v`: (B, H, Lk, Dv); returns (B, H, Lq, Dv) in q's
/// dtype. `mask` and `scale` as in [`super::sdpa`]: the mask is additive and broadcast to
/// (B, H, Lq, Lk), 0 where attention is allowed and a large negative number (or −∞) where not;
/// `scale` defaults to 1/√D. The mask is a constant here: one that carries a gradient is refused
/// (its gradient would be a mask-sized matrix, the very thing this op avoids).
///
/// `tile` is the side of the query and key tiles (the last ones may be shorter): the working set
/// is a few (tile × tile) blocks per head. f32 and f64 are computed in their own precision; f16
/// and bf16 inputs are computed and accumulated in f32, and the results rounded back.
///
/// A row whose every key is masked with −∞ gives NaN, as in [`super::sdpa`]; the finite −1e9 of
/// [`super::additive_mask`] keeps it finite, also as there.
pub fn sdpa_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f64>,
    tile: usize,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4().map_err(|e| e.context("sdpa_tiled: q must be (B, H, Lq, D)"))?;
    let (kb, kh, lk, kd) = k.dims4().map_err(|e| e.context("sdpa_tiled: k must be (B, H, Lk, D)"))?;
    let (vb, vh, vl, _dv) = v.dims4().map_err(|e| e.context("sdpa_tiled: v must be (B, H, Lk, Dv)"))?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) {
        candle_core::bail!(
            "sdpa_tiled: q {:?}, k {:?} and v {:?} do not fit (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if lq == 0 || lk == 0 {
        candle_core::bail!("sdpa_tiled: empty attention, {lq} queries and {lk} keys")
    }
    if tile == 0 {
        candle_core::bail!("sdpa_tiled: tile must be at least 1")
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("sdpa_tiled: q, k, v are {:?}, {:?}, {:?}", q.dtype(), k.dtype(), v.dtype())
    }
    let compute = compute_dtype(q.dtype())?;
    let mask = match mask {
        None => None,
        Some(m) if m.track_op() => candle_core::bail!(
            "sdpa_tiled: the mask carries a gradient, which this op does not compute; detach it, or use sdpa"
        ),
        // A broadcast view: no copy of the mask is made, tiles are narrowed out of it.
        Some(m) => Some(m.broadcast_as((b, h, lq, lk)).map_err(|e| {
            e.context(format!("sdpa_tiled: a mask of {:?} for scores of {:?}", m.dims(), (b, h, lq, lk)))
        })?),
    };
    let tiling = Tiling { scale: scale.unwrap_or(1.0 / (d as f64).sqrt()), tile, mask, compute };
    let (out, lse) =
        tiling.forward(&working_copy(q, compute)?, &working_copy(k, compute)?, &working_copy(v, compute)?)?;
    let out = out.to_dtype(q.dtype())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        // Nothing to backpropagate to: no op, no copy.
        return Ok(out);
    }
    let op = TiledAttention { value: Mutex::new(Some(out)), lse, tiling };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// f32 and f64 are computed as they are; half precision in f32.
fn compute_dtype(dtype: DType) -> Result<DType> {
    match dtype {
        DType::F32 | DType::F64 => Ok(dtype),
        DType::F16 | DType::BF16 => Ok(DType::F32),
        other => candle_core::bail!("sdpa_tiled: {other:?} inputs (floating point only)"),
    }
}

/// `t` without its graph, in the compute dtype and contiguous, so that tiles narrowed along the
/// sequence are views the batched matmul takes as they are (no copy for contiguous f32/f64).
fn working_copy(t: &Tensor, compute: DType) -> Result<Tensor> {
    t.detach().to_dtype(compute)?.contiguous()
}

/// (start, length) of each tile of `len`; the last one is shorter when `tile` does not divide it.
fn tiles(len: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(tile).map(move |start| (start, tile.min(len - start)))
}

fn accumulate(total: Option<Tensor>, term: Tensor) -> Result<Tensor> {
    match total {
        None => Ok(term),
        Some(total) => total + term,
    }
}

/// What the forward and the backward share: the scale, the tile size, the mask as a broadcast
/// view (B, H, Lq, Lk) of the caller's tensor, and the compute dtype.
struct Tiling {
    scale: f64,
    tile: usize,
    mask: Option<Tensor>,
    compute: DType,
}

impl Tiling {
    /// The scores S = (q·scale)·kᵀ + mask of query rows `rows` against key columns `cols`;
    /// `q_scaled` is the query tile already multiplied by the scale (a tile × D product instead
    /// of a tile × tile one).
    fn scores(&self, q_scaled: &Tensor, k: &Tensor, rows: (usize, usize), cols: (usize, usize)) -> Result<Tensor> {
        let s = q_scaled.matmul(&k.narrow(2, cols.0, cols.1)?.t()?)?;
        match &self.mask {
            None => Ok(s),
            Some(mask) => {
                let tile = mask.narrow(2, rows.0, rows.1)?.narrow(3, cols.0, cols.1)?;
                s.broadcast_add(&tile.to_dtype(self.compute)?)
            }
        }
    }

    /// O and the log-sum-exp L (B, H, Lq, 1), in the compute dtype. Inputs detached, in the
    /// compute dtype.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, lq, _) = q.dims4()?;
        let lk = k.dim(2)?;
        // The running max is kept ≥ the lowest finite value: where a row's keys so far are all
        // −∞ (masked), exp(S − m) is then exp(−∞) = 0 instead of exp(−∞ + ∞) = NaN, and the first
        // finite score's correction exp(lowest − m) = 0 wipes nothing that counted.
        let lowest = if self.compute == DType::F64 { f64::MIN } else { f32::MIN as f64 };
        let mut outputs = Vec::new();
        let mut log_sum_exps = Vec::new();
        for rows in tiles(lq, self.tile) {
            let q_scaled = (q.narrow(2, rows.0, rows.1)? * self.scale)?;
            // (running max, Σ exp(S − max), Σ exp(S − max)·V)
            let mut running: Option<(Tensor, Tensor, Tensor)> = None;
            for cols in tiles(lk, self.tile) {
                let (p, tile_max) = {
                    let s = self.scores(&q_scaled, k, rows, cols)?;
                    let tile_max = s.max_keepdim(3)?;
                    let max = match &running {
                        Some((max, _, _)) => max.maximum(&tile_max)?,
                        None => tile_max,
                    }
                    .maximum(lowest)?;
                    (s.broadcast_sub(&max)?.exp()?, max)
                };
                let p_sum = p.sum_keepdim(3)?;
                let pv = p.matmul(&v.narrow(2, cols.0, cols.1)?)?;
                drop(p);
                running = Some(match running {
                    None => (tile_max, p_sum, pv),
                    Some((old_max, sum, acc)) => {
                        let correction = (old_max - &tile_max)?.exp()?;
                        let sum = ((sum * &correction)? + p_sum)?;
                        let acc = (acc.broadcast_mul(&correction)? + pv)?;
                        (tile_max, sum, acc)
                    }
                });
            }
            let (max, sum, acc) = running.ok_or_else(|| candle_core::Error::Msg("sdpa_tiled: no key tiles".into()))?;
            outputs.push(acc.broadcast_div(&sum)?);
            log_sum_exps.push((max + sum.log()?)?);
        }
        Ok((Tensor::cat(&outputs, 2)?, Tensor::cat(&log_sum_exps, 2)?))
    }

    /// (dQ, dK, dV) in the compute dtype from the detached inputs, the output O, its gradient dO
    /// and the log-sum-exp L, one (query tile, key tile) pair at a time.
    fn backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        out: &Tensor,
        grad_out: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let lq = q.dim(2)?;
        let lk = k.dim(2)?;
        // D = rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax Jacobian's correction per row.
        let delta = (grad_out * out)?.sum_keepdim(3)?;
        let query_tiles: Vec<(usize, usize)> = tiles(lq, self.tile).collect();
        let mut grad_q: Vec<Option<Tensor>> = vec![None; query_tiles.len()];
        let mut grad_k = Vec::new();
        let mut grad_v = Vec::new();
        for cols in tiles(lk, self.tile) {
            // dQ = dS·K·scale: the scale goes on the key tile (tile × D) rather than on dS.
            let k_scaled = (k.narrow(2, cols.0, cols.1)? * self.scale)?;
            let v_tile = v.narrow(2, cols.0, cols.1)?;
            let mut grad_k_tile = None;
            let mut grad_v_tile = None;
            for (rows, grad_q_tile) in query_tiles.iter().copied().zip(grad_q.iter_mut()) {
                let q_scaled = (q.narrow(2, rows.0, rows.1)? * self.scale)?;
                let grad_out_rows = grad_out.narrow(2, rows.0, rows.1)?;
                // P = exp(S − L): the forward's probabilities, recomputed.
                let p = self.scores(&q_scaled, k, rows, cols)?.broadcast_sub(&lse.narrow(2, rows.0, rows.1)?)?.exp()?;
                grad_v_tile = Some(accumulate(grad_v_tile, p.t()?.matmul(&grad_out_rows)?)?);
                // dS = P ∘ (dO·Vᵀ − D)
                let grad_s =
                    (&p * grad_out_rows.matmul(&v_tile.t()?)?.broadcast_sub(&delta.narrow(2, rows.0, rows.1)?)?)?;
                drop(p);
                grad_k_tile = Some(accumulate(grad_k_tile, grad_s.t()?.matmul(&q_scaled)?)?);
                *grad_q_tile = Some(accumulate(grad_q_tile.take(), grad_s.matmul(&k_scaled)?)?);
            }
            grad_k.extend(grad_k_tile);
            grad_v.extend(grad_v_tile);
        }
        // Each set of tiles is released as soon as it is joined: at most one L·D copy extra.
        let join = |tiles: Vec<Tensor>| Tensor::cat(&tiles, 2);
        let grad_q = join(grad_q.into_iter().flatten().collect())?;
        let grad_k = join(grad_k)?;
        Ok((grad_q, grad_k, join(grad_v)?))
    }
}

/// The graph node of [`sdpa_tiled`]: its forward hands over the output computed beforehand, its
/// backward recomputes the tiles. It holds only L (B, H, Lq, 1) and the mask view.
struct TiledAttention {
    /// The forward value, handed over once.
    value: Mutex<Option<Tensor>>,
    /// Per-row log-sum-exp of the scores, in the compute dtype.
    lse: Tensor,
    tiling: Tiling,
}

impl TiledAttention {
    fn take_value<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        super::conv::take_precomputed(&self.value, pick, "sdpa_tiled")
    }
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "sdpa-tiled"
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
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let compute = self.tiling.compute;
        // Detached: the gradient computation must not record a graph of its own tiles.
        let inputs = (working_copy(q, compute)?, working_copy(k, compute)?, working_copy(v, compute)?);
        let (grad_q, grad_k, grad_v) = self.tiling.backward(
            (&inputs.0, &inputs.1, &inputs.2),
            &working_copy(out, compute)?,
            &working_copy(grad_out, compute)?,
            &self.lse,
        )?;
        Ok((Some(grad_q.to_dtype(q.dtype())?), Some(grad_k.to_dtype(k.dtype())?), Some(grad_v.to_dtype(v.dtype())?)))
    }
}

#[cfg(test)]
mod tests {
    //! [`sdpa_tiled`] against [`sdpa`] (the materialising composition, itself checked against
    //! central finite differences in `ops::tests`) and against central finite differences per
    //! variable.

    use super::*;
    use crate::gradcheck::{check_gradients, GradCheckOptions};
    use crate::ops::{additive_mask, sdpa};
    use crate::rng::SplitMix64;
    use candle_core::{Device, Var};

    const BATCH: usize = 2;
    const HEADS: usize = 3;
    const HEAD_DIM: usize = 4;

    fn normal(shape: &[usize], seed: u64) -> Tensor {
        SplitMix64::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
    }

    #[derive(Clone, Copy, Debug)]
    enum MaskKind {
        None,
        /// Boolean "key j ≤ query i + 2" through `additive_mask` (−1e9), shape (Lq, Lk).
        Banded,
        /// A random bias (B, 1, Lq, Lk) with −∞ on keys 0..4 of every odd row, so that with
        /// tiles of ≤ 4 a row's whole first key tile is −∞ (the online softmax's edge case).
        BiasWithInfinities,
        /// Key padding, shape (Lk,): the last key blocked with −1e9.
        KeyPadding,
    }

    fn mask(kind: MaskKind, lq: usize, lk: usize) -> Option<Tensor> {
        let dev = &Device::Cpu;
        match kind {
            MaskKind::None => None,
            MaskKind::Banded => {
                let allowed: Vec<f64> = (0..lq * lk).map(|n| if n % lk <= n / lk + 2 { 1.0 } else { 0.0 }).collect();
                Some(additive_mask(&Tensor::from_vec(allowed, (lq, lk), dev).unwrap(), DType::F64).unwrap())
            }
            MaskKind::BiasWithInfinities => {
                assert!(lk > 4, "the −∞ block needs finite keys after it");
                let bias = normal(&[BATCH, 1, lq, lk], 77).flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let values: Vec<f64> = bias
                    .iter()
                    .enumerate()
                    .map(|(n, b)| if (n / lk) % 2 == 1 && n % lk < 4 { f64::NEG_INFINITY } else { 2.0 * b })
                    .collect();
                Some(Tensor::from_vec(values, (BATCH, 1, lq, lk), dev).unwrap())
            }
            MaskKind::KeyPadding => {
                let values: Vec<f64> = (0..lk).map(|j| if j + 1 == lk { -1e9 } else { 0.0 }).collect();
                Some(Tensor::from_vec(values, lk, dev).unwrap())
            }
        }
    }

    /// One attention problem: lengths, value width, tile, mask.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        lq: usize,
        lk: usize,
        value_dim: usize,
        tile: usize,
        mask: MaskKind,
        scale: Option<f64>,
    }

    const CASES: [Case; 7] = [
        // Tiles that divide neither length.
        Case { lq: 7, lk: 11, value_dim: 4, tile: 3, mask: MaskKind::None, scale: None },
        // Tiles that divide both; an explicit scale.
        Case { lq: 8, lk: 12, value_dim: 4, tile: 4, mask: MaskKind::Banded, scale: Some(0.3) },
        // Whole −∞ first key tiles on odd rows; Dv ≠ D.
        Case { lq: 7, lk: 11, value_dim: 6, tile: 4, mask: MaskKind::BiasWithInfinities, scale: None },
        // One tile larger than both lengths.
        Case { lq: 5, lk: 6, value_dim: 4, tile: 16, mask: MaskKind::BiasWithInfinities, scale: None },
        // Lq > Lk; the tile divides Lk only; a rank-1 mask.
        Case { lq: 12, lk: 5, value_dim: 3, tile: 5, mask: MaskKind::KeyPadding, scale: None },
        // One query; tiles of 2.
        Case { lq: 1, lk: 9, value_dim: 4, tile: 2, mask: MaskKind::None, scale: Some(1.7) },
        // Tiles of one element.
        Case { lq: 6, lk: 7, value_dim: 2, tile: 1, mask: MaskKind::BiasWithInfinities, scale: None },
    ];

    struct Inputs {
        q: Var,
        k: Var,
        v: Var,
        mask: Option<Tensor>,
        /// The weights of the scalar ⟨O, W⟩ whose gradients are compared.
        w: Tensor,
    }

    fn inputs(case: &Case, seed: u64) -> Inputs {
        let Case { lq, lk, value_dim, .. } = *case;
        let var = |shape: &[usize], s: u64| Var::from_tensor(&normal(shape, seed * 10 + s)).unwrap();
        Inputs {
            q: var(&[BATCH, HEADS, lq, HEAD_DIM], 1),
            k: var(&[BATCH, HEADS, lk, HEAD_DIM], 2),
            v: var(&[BATCH, HEADS, lk, value_dim], 3),
            mask: mask(case.mask, lq, lk),
            w: normal(&[BATCH, HEADS, lq, value_dim], seed * 10 + 4),
        }
    }

    /// The output and the gradients of ⟨O, W⟩ with respect to q, k, v.
    fn output_and_gradients(
        x: &Inputs,
        attend: impl Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> [Tensor; 4] {
        let out = attend(x.q.as_tensor(), x.k.as_tensor(), x.v.as_tensor(), x.mask.as_ref()).unwrap();
        let grads = (&out * &x.w).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
        [out.detach(), grad(&x.q), grad(&x.k), grad(&x.v)]
    }

    #[test]
    fn tiled_equals_sdpa_forward_and_gradients_in_f64() {
        // Both compute the same exact quantities in a different order (and (q·s)·kᵀ instead of
        // (q·kᵀ)·s): measured worst difference 3.7e-15 over all cases, outputs and gradients of
        // order 1. 1e-12 leaves room for summation order and fails any formula slip (a missing
        // correction factor or scale is O(0.1)).
        let mut worst = 0.0f64;
        for (n, case) in CASES.iter().enumerate() {
            let x = inputs(case, n as u64 + 1);
            let reference = output_and_gradients(&x, |q, k, v, m| sdpa(q, k, v, m, case.scale));
            let tiled = output_and_gradients(&x, |q, k, v, m| sdpa_tiled(q, k, v, m, case.scale, case.tile));
            for (what, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(tiled.iter().zip(&reference)) {
                assert_eq!(a.dims(), b.dims(), "{case:?} {what}");
                assert!(max_abs(b) > 1e-3, "{case:?} {what}: degenerate reference");
                let diff = max_abs_diff(a, b);
                assert!(diff <= 1e-12, "{case:?} {what}: max abs difference {diff:.3e}");
                worst = worst.max(diff);
            }
            // Without Vars there is no graph: the plain forward, equal too.
            let plain = sdpa_tiled(
                &x.q.as_tensor().detach(),
                &x.k.as_tensor().detach(),
                &x.v.as_tensor().detach(),
                x.mask.as_ref(),
                case.scale,
                case.tile,
            )
            .unwrap();
            assert!(!plain.track_op());
            assert!(max_abs_diff(&plain, &reference[0]) <= 1e-12, "{case:?}: plain forward");
        }
        eprintln!("sdpa_tiled vs sdpa, f64: worst difference {worst:.2e}");
    }

    #[test]
    fn tiled_matches_finite_differences_per_variable() {
        // The three kinds of tiling edge: non-dividing tiles, −∞ first tiles with Dv ≠ D, a mask
        // of rank 1 with Lq > Lk. Tolerance as for every op in `ops::tests` (f64, ε = 1e-6: the
        // central difference is good to ~1e-9 relative here; measured worst 2.4e-10).
        for n in [0, 2, 4] {
            let case = CASES[n];
            let x = inputs(&case, 100 + n as u64);
            let vars: Vec<(&str, Var)> = vec![("q", x.q.clone()), ("k", x.k.clone()), ("v", x.v.clone())];
            let f = || {
                let out = sdpa_tiled(
                    x.q.as_tensor(),
                    x.k.as_tensor(),
                    x.v.as_tensor(),
                    x.mask.as_ref(),
                    case.scale,
                    case.tile,
                )?;
                (out * &x.w)?.sum_all()
            };
            let report =
                check_gradients(&vars, f, &GradCheckOptions { eps: 1e-6, directions: 4, ..Default::default() })
                    .unwrap();
            let what = format!("sdpa_tiled {case:?}");
            assert!(report.vars_without_grad().is_empty(), "{what}: no gradient for {:?}", report.vars_without_grad());
            report.assert_nondegenerate(1e-8, &what).unwrap();
            report.assert_close(1e-5, &what).unwrap();
            eprintln!("{what}: max rel error {:.2e}", report.max_rel_error());
        }
    }

    #[test]
    fn fully_masked_rows_behave_as_in_sdpa() {
        // Row 1 fully −∞: NaN in both. Row 2 fully −1e9: finite in both and equal up to the
        // rounding of −1e9 + s (f64 spacing at 1e9 is 1.2e-7; the two order the scale
        // differently, so their logits may round apart by one spacing).
        let (lq, lk) = (3, 8);
        let values: Vec<f64> = (0..lq * lk)
            .map(|n| match n / lk {
                1 => f64::NEG_INFINITY,
                2 => -1e9,
                _ => 0.0,
            })
            .collect();
        let mask = Tensor::from_vec(values, (lq, lk), &Device::Cpu).unwrap();
        let (q, k, v) = (normal(&[1, 2, lq, 4], 5), normal(&[1, 2, lk, 4], 6), normal(&[1, 2, lk, 4], 7));
        let reference = sdpa(&q, &k, &v, Some(&mask), None).unwrap();
        let tiled = sdpa_tiled(&q, &k, &v, Some(&mask), None, 3).unwrap();
        let row = |t: &Tensor, r: usize| t.narrow(2, r, 1).unwrap();
        let nan_count =
            |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().filter(|x| x.is_nan()).count();
        assert_eq!(nan_count(&row(&reference, 1)), 8, "sdpa's −∞ row");
        assert_eq!(nan_count(&row(&tiled, 1)), 8, "sdpa_tiled's −∞ row");
        assert_eq!(nan_count(&row(&tiled, 2)), 0);
        assert!(max_abs_diff(&row(&tiled, 0), &row(&reference, 0)) <= 1e-12);
        assert!(max_abs_diff(&row(&tiled, 2), &row(&reference, 2)) <= 1e-5);
    }

    #[test]
    fn half_precision_inputs_are_computed_in_f32() {
        // bf16 / f16 inputs; reference: sdpa in f64 on the same (rounded) inputs and weights.
        // Computed in f32, the output's error is its final rounding, ≤ u·|O| with the unit
        // roundoff u = 2⁻⁸ (bf16), 2⁻¹¹ (f16): tolerance 1 u of max|O| (measured 0.45 u both).
        // Computing in f16 instead measured 3.6 u and fails. The gradients carry O's rounding
        // through D = rowsum(dO ∘ O) and their own: tolerance 2 u of max|grad| (measured ≤ 0.79 u
        // bf16, 0.90 u f16).
        let case = Case { lq: 33, lk: 70, value_dim: 8, tile: 16, mask: MaskKind::Banded, scale: None };
        for (dtype, unit_roundoff) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
            let x = inputs(&case, 9);
            let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let half = Inputs {
                q: Var::from_tensor(&round(x.q.as_tensor())).unwrap(),
                k: Var::from_tensor(&round(x.k.as_tensor())).unwrap(),
                v: Var::from_tensor(&round(x.v.as_tensor())).unwrap(),
                mask: x.mask.clone(),
                w: round(&x.w),
            };
            let exact = Inputs {
                q: Var::from_tensor(&half.q.as_tensor().to_dtype(DType::F64).unwrap()).unwrap(),
                k: Var::from_tensor(&half.k.as_tensor().to_dtype(DType::F64).unwrap()).unwrap(),
                v: Var::from_tensor(&half.v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap(),
                mask: x.mask.clone(),
                w: half.w.to_dtype(DType::F64).unwrap(),
            };
            let tiled = output_and_gradients(&half, |q, k, v, m| sdpa_tiled(q, k, v, m, None, case.tile));
            let reference = output_and_gradients(&exact, |q, k, v, m| sdpa(q, k, v, m, None));
            for (what, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(tiled.iter().zip(&reference)) {
                assert_eq!(a.dtype(), dtype, "{dtype:?} {what}");
                let (diff, scale) = (max_abs_diff(a, b), max_abs(b));
                let units = diff / (unit_roundoff * scale);
                eprintln!("{dtype:?} {what}: max abs difference {diff:.2e} = {units:.2} u of max |·| {scale:.2}");
                let allowed = if *what == "output" { 1.0 } else { 2.0 };
                assert!(units <= allowed, "{dtype:?} {what}: {units:.2} u of max |·|");
            }
        }
    }

    #[test]
    fn rejects_what_it_cannot_compute() {
        let q = normal(&[1, 2, 5, 4], 1);
        let k = normal(&[1, 2, 6, 4], 2);
        let err = |r: Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(sdpa_tiled(&q, &k, &k, None, None, 0)).contains("tile"));
        assert!(err(sdpa_tiled(&q.squeeze(0).unwrap(), &k, &k, None, None, 2)).contains("(B, H, Lq, D)"));
        assert!(err(sdpa_tiled(&q, &k.narrow(3, 0, 3).unwrap(), &k, None, None, 2)).contains("do not fit"));
        assert!(err(sdpa_tiled(&q, &k, &k.narrow(2, 0, 5).unwrap(), None, None, 2)).contains("do not fit"));
        assert!(err(sdpa_tiled(&q, &k, &k.to_dtype(DType::F32).unwrap(), None, None, 2)).contains("F32"));
        let ints = q.to_dtype(DType::U32).unwrap();
        assert!(err(sdpa_tiled(&ints, &ints, &ints, None, None, 2)).contains("floating point"));
        assert!(err(sdpa_tiled(&q, &k, &k, Some(&normal(&[5, 5], 3)), None, 2)).contains("mask"));
        let learned_mask = Var::from_tensor(&normal(&[5, 6], 4)).unwrap();
        assert!(err(sdpa_tiled(&q, &k, &k, Some(learned_mask.as_tensor()), None, 2)).contains("carries a gradient"));
    }
}
