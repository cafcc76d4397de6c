//! What `shared::ops::sdpa_tiled` holds, measured in heap bytes: O(L·D + tile²), never a full
//! L × L matrix — after the forward (what the graph keeps until backward), at the forward's peak
//! and at the backward's peak.
//!
//! A counting global allocator measures the live heap; this binary has this one test only, so no
//! other test allocates meanwhile, and every path is run once beforehand so that thread pools and
//! GEMM scratch space are already allocated. The sizes, f32, B = 1, H = 2, D = 64, tile 128:
//!
//! * U = B·H·L·D·4 bytes, one q-sized tensor (0.5 MiB at L = 1024, 1 MiB at L = 2048);
//! * T = B·H·tile²·4 = 128 KiB, one tile of scores for every head;
//! * F = B·H·L²·4, the full score matrices (8 MiB, 32 MiB: 16 MiB per head at L = 2048).
//!
//! Bounds, from the code (`shared/src/ops/attention.rs`), with R = B·H·L·4 for a per-row vector
//! (the log-sum-exp L, or D) and each tile × D product U·tile/L:
//! * kept by the graph after the forward: the output (U) and the log-sum-exp (R) — q, k, v were
//!   alive before — plus graph nodes: U + R + NODES;
//! * forward peak: during the loop, the finished output tiles (< U) with one query tile's
//!   q·scale, accumulator and products (≤ 4 tile × D) and ≤ 3T of scores (S, S − m, exp(S − m));
//!   then the tiles and their concatenation (2U); then the output and the graph node's copy of it
//!   (2U): max(2U, U + 4U·tile/L + 3T) + R + NODES;
//! * backward peak, from just before `backward`, for the loss ΣO (a weighted sum ⟨O, W⟩ would
//!   add Candle's own cost: its Mul backward stores W's gradient with a graph of three U-sized
//!   tensors): dO (U); in the loop, dO, the three accumulating gradients (3U), D (R), ≤ 4T of
//!   tiles (P, dP, dP − D, dS) and ≤ 6 tile × D products; joining the tiles (+U); then Candle adding
//!   each returned gradient into its store (zeros U + sum U, while dO and the not yet added
//!   gradients are held): max(6U, 4U + 4T + 6U·tile/L) + R + NODES.
//!
//! Measured at L = 2048 (and 1024, all proportional): kept U + R + 632 B; forward peak
//! 2U + R + 26 KB; backward peak 6U + 1.8 KB, i.e. 6.3 MB against 33.5 MB for the two heads' score
//! matrices alone. Materialising `sdpa`, measured the same way to show the measurement does see a
//! full matrix where one is kept, keeps 5.1 F after the forward and peaks at 11 F in backward.

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::memory::{live_bytes, peak_bytes, reset_peak};
use shared::ops::{sdpa, sdpa_tiled};

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

const HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const TILE: usize = 128;
const F32: usize = 4;

/// Allowance for graph nodes, op structs, shapes and tile views (each a few hundred bytes).
const NODES: usize = 64 * 1024;

fn random(shape: &[usize], seed: u64) -> Tensor {
    shared::rng::SplitMix64::new(seed).normal_tensor(shape, DType::F32, &Device::Cpu).expect("random tensor")
}

/// Heap bytes of one attention's forward and backward.
#[derive(Debug)]
struct Measured {
    /// Still allocated after the forward, its output held: what the graph keeps.
    kept: usize,
    /// The most allocated at once during the forward, above the level before it.
    forward_peak: usize,
    /// The most allocated at once during backward, above the level just before it.
    backward_peak: usize,
}

type Attention = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn measure(attend: &Attention, len: usize) -> Measured {
    let shape = [1, HEADS, len, HEAD_DIM];
    let (q, k, v) = (random(&shape, 1), random(&shape, 2), random(&shape, 3));
    let (q, k, v) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
    let run = || -> (Measured, [f32; 3]) {
        let before = live_bytes();
        reset_peak();
        let out = attend(q.as_tensor(), k.as_tensor(), v.as_tensor()).expect("forward");
        let kept = live_bytes() - before;
        let forward_peak = peak_bytes() - before;
        let loss = out.sum_all().expect("loss");
        let before_backward = reset_peak();
        let grads = loss.backward().expect("backward");
        let backward_peak = peak_bytes() - before_backward;
        let norm = |x: &Var| {
            let g = grads.get(x.as_tensor()).expect("gradient");
            g.sqr().and_then(|s| s.sum_all()).and_then(|s| s.to_scalar::<f32>()).expect("norm")
        };
        (Measured { kept, forward_peak, backward_peak }, [norm(&q), norm(&k), norm(&v)])
    };
    // Warm-up: thread pools, GEMM scratch, lazily allocated statics.
    run();
    let (measured, norms) = run();
    assert!(norms.iter().all(|n| n.is_finite() && *n > 0.0), "gradients {norms:?}");
    measured
}

#[test]
fn tiled_attention_holds_o_of_l_d_plus_tile_squared_never_a_score_matrix() {
    let tiled = |q: &Tensor, k: &Tensor, v: &Tensor| sdpa_tiled(q, k, v, None, None, TILE);
    let full = |q: &Tensor, k: &Tensor, v: &Tensor| sdpa(q, k, v, None, None);
    let tile_bytes = HEADS * TILE * TILE * F32;
    for len in [1024, 2048] {
        let one_tensor = HEADS * len * HEAD_DIM * F32;
        let per_row = HEADS * len * F32;
        let score_matrices = HEADS * len * len * F32;
        let m = measure(&tiled, len);
        let materialised = measure(&full, len);
        eprintln!(
            "L = {len}: U = {one_tensor} B, T = {tile_bytes} B, F = {score_matrices} B\n  \
             sdpa_tiled {m:?}\n  sdpa       {materialised:?}"
        );
        // The materialising sdpa keeps at least the scores and the softmax: the measurement sees
        // matrices where they are kept.
        assert!(materialised.kept >= 2 * score_matrices, "L = {len}: sdpa keeps only {} B", materialised.kept);

        assert!(m.kept >= one_tensor, "L = {len}: the graph keeps {} B, less than the output", m.kept);
        let kept_bound = one_tensor + per_row + NODES;
        assert!(m.kept <= kept_bound, "L = {len}: the graph keeps {} B > {kept_bound} B", m.kept);
        let tile_by_d = one_tensor * TILE / len;
        let forward_bound = (2 * one_tensor).max(one_tensor + 4 * tile_by_d + 3 * tile_bytes) + per_row + NODES;
        assert!(m.forward_peak <= forward_bound, "L = {len}: forward peak {} B > {forward_bound} B", m.forward_peak);
        let backward_bound = (6 * one_tensor).max(4 * one_tensor + 4 * tile_bytes + 6 * tile_by_d) + per_row + NODES;
        assert!(
            m.backward_peak <= backward_bound,
            "L = {len}: backward peak {} B > {backward_bound} B",
            m.backward_peak
        );
        // At L = 2048 the bound itself is under a quarter of the score matrices (per head:
        // 3.3 of 16 MiB) — and all of it but NODES grows linearly in L.
        if len == 2048 {
            assert!(4 * backward_bound < score_matrices, "bound {backward_bound} B vs matrices {score_matrices} B");
        }
    }
}
