//! What a convolution's graph keeps alive until backward, measured in heap bytes.
//!
//! With a trainable weight the graph must keep the im2col columns (C·kh·kw × N·Ho·Wo, 9× the
//! input for a 3×3 kernel) for the kernel gradient. With a frozen weight (a plain tensor) only
//! the input gradient is needed, and `shared::ops::{conv2d, conv3d}` then keep nothing but the
//! output (the input was alive before). A counting global allocator measures the live heap
//! before and after each forward, with the output still held; this binary has this one test
//! only, so no other test allocates meanwhile, and every path is run once beforehand so thread
//! pools and GEMM scratch space are already allocated. Measured: the frozen graphs hold the
//! output + 728 B (conv2d) and + 488 B (conv3d) of nodes, the trainable ones 3.25 MB and 5.71 MB
//! (bounds 2.95 MB and 4.13 MB); the 64 KiB allowance is ~100× the nodes and < 1/40 of the
//! columns, so the test is neither flaky nor blind to a columns-sized leak.

use candle_core::{DType, Device, Result, Tensor, Var};
use shared::ops::{conv2d, conv3d};

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

/// Heap bytes still allocated after `forward` returns, its output held; and the output.
fn held_after(forward: &dyn Fn() -> Result<Tensor>) -> (isize, Tensor) {
    let before = shared::memory::live_bytes() as isize;
    let y = forward().expect("forward");
    (shared::memory::live_bytes() as isize - before, y)
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    shared::rng::SplitMix64::new(seed).normal_tensor(shape, DType::F32, &Device::Cpu).expect("random tensor")
}

/// One convolution, frozen and trainable: returns (held by the frozen graph, held by the
/// trainable graph, output bytes), after checking both still backpropagate to x.
fn measure(
    what: &str,
    x: &Var,
    weight: &Tensor,
    bias: &Tensor,
    conv: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> (isize, isize, isize) {
    let weight_var = Var::from_tensor(weight).expect("weight var");
    let bias_var = Var::from_tensor(bias).expect("bias var");
    let frozen = || conv(x.as_tensor(), weight, bias);
    let trainable = || conv(x.as_tensor(), weight_var.as_tensor(), bias_var.as_tensor());
    // Warm-up: thread pools, GEMM scratch, lazily allocated statics.
    for _ in 0..2 {
        drop(frozen().expect("frozen forward"));
        drop(trainable().expect("trainable forward"));
    }
    // The least of three measurements: GEMM scratch is allocated lazily per worker thread and
    // kept, so a thread that first works during a measurement adds its scratch once (seen once
    // under load from other processes: +2.1 MB); what the graph keeps shows every time.
    let least = |forward: &dyn Fn() -> Result<Tensor>| {
        let mut runs: Vec<(isize, Tensor)> = (0..3).map(|_| held_after(forward)).collect();
        runs.sort_by_key(|(held, _)| *held);
        runs.swap_remove(0)
    };
    let (frozen_held, y_frozen) = least(&frozen);
    let (trainable_held, y_trainable) = least(&trainable);
    let output_bytes = (y_frozen.elem_count() * 4) as isize;
    for (path, y) in [("frozen", &y_frozen), ("trainable", &y_trainable)] {
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(x.as_tensor()).is_some(), "{what} {path}: no x gradient");
    }
    eprintln!(
        "{what}: output {output_bytes} B, held by the graph: frozen {frozen_held} B, trainable {trainable_held} B"
    );
    (frozen_held, trainable_held, output_bytes)
}

/// Allowance for graph nodes, op structs and index tensors (measured ≤ 728 B).
const NODES: isize = 64 * 1024;

#[test]
fn frozen_weight_convolutions_do_not_keep_the_im2col_columns() {
    // conv2d 3×3, 32 → 32 channels on 48×48: columns 288 × 2304 floats = 2.65 MB, 9× the input.
    let x = Var::from_tensor(&random(&[1, 32, 48, 48], 1)).expect("x");
    let (weight, bias) = (random(&[32, 32, 3, 3], 2), random(&[32], 3));
    let conv = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d(x, w, Some(b), 1, 1);
    let (frozen, trainable, output) = measure("conv2d", &x, &weight, &bias, &conv);
    let columns = (32 * 9 * 48 * 48 * 4) as isize;
    // Frozen: the output and a few graph nodes only.
    assert!(frozen >= output && frozen <= output + NODES, "conv2d frozen graph holds {frozen} B");
    // Trainable: the output, the columns and the GEMM's pre-permute output.
    assert!(trainable >= output + columns, "conv2d trainable graph holds only {trainable} B");

    // conv3d 3×3×3, 16 → 16 channels, 6 frames → 4 of 24×24: three taps' columns of
    // 144 × 2304 floats each, 3.98 MB in all.
    let x = Var::from_tensor(&random(&[1, 16, 6, 24, 24], 4)).expect("x");
    let (weight, bias) = (random(&[16, 16, 3, 3, 3], 5), random(&[16], 6));
    let conv = |x: &Tensor, w: &Tensor, b: &Tensor| conv3d(x, w, Some(b), (1, 1), 1);
    let (frozen, trainable, output) = measure("conv3d", &x, &weight, &bias, &conv);
    let columns = (3 * 16 * 9 * 4 * 24 * 24 * 4) as isize;
    assert!(frozen >= output && frozen <= output + NODES, "conv3d frozen graph holds {frozen} B");
    assert!(trainable >= output + columns, "conv3d trainable graph holds only {trainable} B");
}
