//! Every op against central finite differences in f64, and every fused Candle op shown to
//! still drop its gradient.
//!
//! On the device `WORLDGRAD_TEST_DEVICE` names (the CPU when unset; `crate::device::test_device`),
//! so `scripts/gpu-check.sh` runs the same checks on CUDA. The few tests about the CPU's own
//! kernels stay on the CPU and say so.

use super::*;
use crate::gradcheck::{check_gradients, GradCheckOptions};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};

const TOL: f64 = 1e-5;

/// The device under test (`WORLDGRAD_TEST_DEVICE`, default the CPU).
fn dev() -> Device {
    crate::device::test_device()
}

fn var(shape: &[usize], seed: u64) -> Var {
    var_on(shape, seed, &dev())
}

fn var_on(shape: &[usize], seed: u64, device: &Device) -> Var {
    let t = SplitMix64::new(seed).normal_tensor(shape, DType::F64, device).unwrap();
    Var::from_tensor(&t).unwrap()
}

fn weights(shape: &[usize], seed: u64) -> Tensor {
    weights_on(shape, seed, &dev())
}

fn weights_on(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    SplitMix64::new(seed ^ 0xABCD).normal_tensor(shape, DType::F64, device).unwrap()
}

/// ⟨op(x), w⟩ with fixed random w: a scalar whose gradient exercises every output element
/// (a plain sum would be constant for softmax). Each input is checked on its own and jointly.
fn check(name: &str, vars: &[(&str, &Var)], f: impl Fn() -> candle_core::Result<Tensor>) {
    check_within(name, vars, f, TOL)
}

/// [`check`] at relative tolerance `tol`.
pub(super) fn check_within(name: &str, vars: &[(&str, &Var)], f: impl Fn() -> candle_core::Result<Tensor>, tol: f64) {
    let vars: Vec<(&str, Var)> = vars.iter().map(|(n, v)| (*n, (*v).clone())).collect();
    let report =
        check_gradients(&vars, f, &GradCheckOptions { eps: 1e-6, directions: 4, ..Default::default() }).unwrap();
    assert!(report.vars_without_grad().is_empty(), "{name}: vars without gradient {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-8, name).unwrap();
    report.assert_close(tol, name).unwrap();
    eprintln!("{name}: max rel error {:.2e}", report.max_rel_error());
}

fn contract(y: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    (y * w)?.sum_all()
}

#[test]
fn softmax_matches_finite_differences() {
    let x = var(&[3, 5, 7], 1);
    let w = weights(&[3, 5, 7], 1);
    check("softmax", &[("x", &x)], || contract(&softmax(x.as_tensor(), D::Minus1)?, &w));
    let w1 = weights(&[3, 5, 7], 2);
    check("softmax dim 1", &[("x", &x)], || contract(&softmax(x.as_tensor(), 1)?, &w1));
}

#[test]
fn softmax_agrees_with_candle_forward() {
    let x = var(&[4, 9], 3);
    let ours = softmax(x.as_tensor(), D::Minus1).unwrap();
    let theirs = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    assert_close(&ours, &theirs, 1e-12);
}

#[test]
fn log_softmax_matches_finite_differences() {
    let x = var(&[4, 6], 4);
    let w = weights(&[4, 6], 4);
    check("log_softmax", &[("x", &x)], || contract(&log_softmax(x.as_tensor(), D::Minus1)?, &w));
    let y = log_softmax(x.as_tensor(), D::Minus1).unwrap();
    let reference = softmax(x.as_tensor(), D::Minus1).unwrap().log().unwrap();
    assert_close(&y, &reference, 1e-12);
}

#[test]
fn layer_norm_matches_finite_differences() {
    let x = var(&[2, 3, 8], 5);
    let g = var(&[8], 6);
    let b = var(&[8], 7);
    let w = weights(&[2, 3, 8], 5);
    check("layer_norm affine", &[("x", &x), ("gamma", &g), ("beta", &b)], || {
        contract(&layer_norm(x.as_tensor(), Some(g.as_tensor()), Some(b.as_tensor()), 1e-5)?, &w)
    });
    check("layer_norm no affine", &[("x", &x)], || contract(&layer_norm(x.as_tensor(), None, None, 1e-6)?, &w));
    // Constant weight and bias: the closed-form backward (`fused.rs`).
    let (g_c, b_c) = (g.as_tensor().detach(), b.as_tensor().detach());
    check("layer_norm constant affine", &[("x", &x)], || {
        contract(&layer_norm(x.as_tensor(), Some(&g_c), Some(&b_c), 1e-5)?, &w)
    });
    // The fused kernels have no f64 path: compare forwards in f32.
    let (x, g, b) = (f32_of(&x), f32_of(&g), f32_of(&b));
    let fused = candle_nn::ops::layer_norm(&x, &g, &b, 1e-5).unwrap();
    let ours = layer_norm(&x, Some(&g), Some(&b), 1e-5).unwrap();
    assert_close(&ours, &fused, 1e-5);
}

#[test]
fn rms_norm_matches_finite_differences() {
    let x = var(&[2, 3, 8], 8);
    let g = var(&[8], 9);
    let w = weights(&[2, 3, 8], 8);
    check("rms_norm", &[("x", &x), ("gamma", &g)], || {
        contract(&rms_norm(x.as_tensor(), Some(g.as_tensor()), 1e-6)?, &w)
    });
    check("rms_norm no weight", &[("x", &x)], || contract(&rms_norm(x.as_tensor(), None, 1e-6)?, &w));
    let g_c = g.as_tensor().detach();
    check("rms_norm constant weight", &[("x", &x)], || contract(&rms_norm(x.as_tensor(), Some(&g_c), 1e-6)?, &w));
    let (x, g) = (f32_of(&x), f32_of(&g));
    let fused = candle_nn::ops::rms_norm(&x, &g, 1e-6).unwrap();
    let ours = rms_norm(&x, Some(&g), 1e-6).unwrap();
    assert_close(&ours, &fused, 1e-5);
}

fn rope_inputs(seed: u64) -> (Var, Tensor, Tensor, Tensor) {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = var(&[b, h, t, d], seed);
    let (cos, sin) = rope_tables_1d(t, d, 10_000.0, 1.0, DType::F64, &dev()).unwrap();
    (x, cos, sin, weights(&[b, h, t, d], seed))
}

#[test]
fn rope_interleaved_matches_finite_differences_and_candle() {
    let (x, cos, sin, w) = rope_inputs(10);
    check("rope_interleaved", &[("x", &x)], || contract(&rope_interleaved(x.as_tensor(), &cos, &sin)?, &w));
    let fused = candle_nn::rotary_emb::rope_i(x.as_tensor(), &cos, &sin).unwrap();
    assert_close(&rope_interleaved(x.as_tensor(), &cos, &sin).unwrap(), &fused, 1e-12);
}

#[test]
fn rope_half_matches_finite_differences_and_candle() {
    let (x, cos, sin, w) = rope_inputs(11);
    check("rope_half", &[("x", &x)], || contract(&rope_half(x.as_tensor(), &cos, &sin)?, &w));
    let fused = candle_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin).unwrap();
    assert_close(&rope_half(x.as_tensor(), &cos, &sin).unwrap(), &fused, 1e-12);
}

#[test]
fn rope_3d_tables_split_axes_and_are_differentiable() {
    let grid = (2, 3, 4);
    let dims = (4, 6, 6);
    let (cos, sin) = rope_tables_3d(grid, dims, (10_000.0, 10_000.0, 10_000.0), DType::F64, &dev()).unwrap();
    assert_eq!(cos.dims(), &[24, 8]);
    // Token (t=1, h=2, w=3): its t-part equals the 1D table at position 1, etc.
    let (ct, _) = rope_tables_1d(2, 4, 10_000.0, 1.0, DType::F64, &dev()).unwrap();
    let (cw, _) = rope_tables_1d(4, 6, 10_000.0, 1.0, DType::F64, &dev()).unwrap();
    let token = 3 * 4 + 2 * 4 + 3;
    let row = cos.get(token).unwrap();
    assert_close(&row.narrow(0, 0, 2).unwrap(), &ct.get(1).unwrap(), 1e-15);
    assert_close(&row.narrow(0, 5, 3).unwrap(), &cw.get(3).unwrap(), 1e-15);
    let x = var(&[1, 2, 24, 16], 12);
    let w = weights(&[1, 2, 24, 16], 12);
    check("rope 3d (half)", &[("x", &x)], || contract(&rope_half(x.as_tensor(), &cos, &sin)?, &w));
    check("rope 3d (interleaved)", &[("x", &x)], || contract(&rope_interleaved(x.as_tensor(), &cos, &sin)?, &w));
}

#[test]
fn sdpa_matches_finite_differences_with_and_without_mask() {
    let q = var(&[2, 2, 4, 8], 13);
    let k = var(&[2, 2, 6, 8], 14);
    let v = var(&[2, 2, 6, 8], 15);
    let w = weights(&[2, 2, 4, 8], 13);
    check("sdpa", &[("q", &q), ("k", &k), ("v", &v)], || {
        contract(&sdpa(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, None)?, &w)
    });
    let allowed: Vec<f64> = (0..4 * 6).map(|i| if (i % 6) <= (i / 6) + 1 { 1.0 } else { 0.0 }).collect();
    let allowed = Tensor::from_vec(allowed, (4, 6), &dev()).unwrap();
    let mask = additive_mask(&allowed, DType::F64).unwrap();
    check("sdpa masked", &[("q", &q), ("k", &k), ("v", &v)], || {
        contract(&sdpa(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), Some(0.3))?, &w)
    });
    // Blocked keys carry no weight: changing them leaves the output unchanged.
    let y = sdpa(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), None).unwrap();
    let v2 = (v.as_tensor()
        + v.as_tensor().ones_like().unwrap().narrow(2, 5, 1).unwrap().pad_with_zeros(2, 5, 0).unwrap())
    .unwrap();
    let y2 = sdpa(q.as_tensor(), k.as_tensor(), &v2, Some(&mask), None).unwrap();
    assert_close(&y.narrow(2, 0, 3).unwrap(), &y2.narrow(2, 0, 3).unwrap(), 1e-9);
}

#[test]
fn scale_shift_matches_finite_differences() {
    let x = var(&[2, 3, 8], 40);
    let a = var(&[3, 1], 41);
    let b = var(&[8], 42);
    let w = weights(&[2, 3, 8], 40);
    // Learned scale and shift: the composition, every input differentiated.
    check("scale_shift learned", &[("x", &x), ("scale", &a), ("shift", &b)], || {
        contract(&scale_shift(x.as_tensor(), Some(a.as_tensor()), Some(b.as_tensor()))?, &w)
    });
    // Constants: the fused op.
    let (a_c, b_c) = (a.as_tensor().detach(), b.as_tensor().detach());
    check("scale_shift constant", &[("x", &x)], || contract(&scale_shift(x.as_tensor(), Some(&a_c), Some(&b_c))?, &w));
    check("scale only", &[("x", &x)], || contract(&scale_shift(x.as_tensor(), Some(&a_c), None)?, &w));
}

#[test]
fn activations_match_finite_differences_and_candle() {
    let x = var(&[5, 7], 16);
    let w = weights(&[5, 7], 16);
    check("gelu_tanh", &[("x", &x)], || contract(&gelu_tanh(x.as_tensor())?, &w));
    check("gelu_erf", &[("x", &x)], || contract(&gelu_erf(x.as_tensor())?, &w));
    check("silu", &[("x", &x)], || contract(&silu(x.as_tensor())?, &w));
    check("sigmoid", &[("x", &x)], || contract(&sigmoid(x.as_tensor())?, &w));
    assert_close(&gelu_tanh(x.as_tensor()).unwrap(), &x.as_tensor().gelu().unwrap(), 1e-12);
    assert_close(&gelu_erf(x.as_tensor()).unwrap(), &x.as_tensor().gelu_erf().unwrap(), 1e-12);
    assert_close(&silu(x.as_tensor()).unwrap(), &x.as_tensor().silu().unwrap(), 1e-12);
}

#[test]
fn norm_modules_load_upstream_names() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev());
    let ln = LayerNorm::new(8, 1e-5, vb.pp("norm")).unwrap();
    let _rms = RmsNorm::new(8, 1e-6, vb.pp("q_norm")).unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["norm.bias", "norm.weight", "q_norm.weight"]);
    let x = var(&[2, 8], 17);
    let w = weights(&[2, 8], 17);
    check("LayerNorm module", &[("x", &x)], || contract(&ln.forward(x.as_tensor())?, &w));
}

// ---- The fused Candle ops still drop gradients (if one of these fails, Candle fixed it) ----

fn grad_is_dropped(x: &Var, y: candle_core::Result<Tensor>, w: &Tensor) -> bool {
    let loss = contract(&y.unwrap(), w).unwrap();
    let grads = loss.backward().unwrap();
    match grads.get(x.as_tensor()) {
        None => true,
        Some(g) => g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() == 0.0,
    }
}

#[test]
fn fused_softmax_last_dim_still_drops_gradient() {
    let x = var(&[3, 4], 20);
    let w = weights(&[3, 4], 20);
    assert!(grad_is_dropped(&x, candle_nn::ops::softmax_last_dim(x.as_tensor()), &w));
}

#[test]
fn fused_layer_norm_still_drops_gradient() {
    let x = var32(&[3, 8], 21);
    let w = weights(&[3, 8], 21).to_dtype(DType::F32).unwrap();
    let (g, b) = (Tensor::ones(8, DType::F32, &dev()).unwrap(), Tensor::zeros(8, DType::F32, &dev()).unwrap());
    assert!(grad_is_dropped(&x, candle_nn::ops::layer_norm(x.as_tensor(), &g, &b, 1e-5), &w));
    // The default `candle_nn::layer_norm` module takes the fused path too.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let ln = candle_nn::layer_norm(8, 1e-5, vb).unwrap();
    assert!(grad_is_dropped(&x, ln.forward(x.as_tensor()), &w));
}

#[test]
fn fused_rms_norm_still_drops_gradient() {
    let x = var32(&[3, 8], 22);
    let w = weights(&[3, 8], 22).to_dtype(DType::F32).unwrap();
    let g = Tensor::ones(8, DType::F32, &dev()).unwrap();
    assert!(grad_is_dropped(&x, candle_nn::ops::rms_norm(x.as_tensor(), &g, 1e-6), &w));
}

#[test]
fn fused_rope_variants_still_drop_gradient() {
    let (x, cos, sin, w) = rope_inputs(23);
    assert!(grad_is_dropped(&x, candle_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin), &w));
    assert!(grad_is_dropped(&x, candle_nn::rotary_emb::rope_i(x.as_tensor(), &cos, &sin), &w));
    let xt = Var::from_tensor(&x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
    let wt = w.transpose(1, 2).unwrap();
    assert!(grad_is_dropped(&xt, candle_nn::rotary_emb::rope_thd(xt.as_tensor(), &cos, &sin), &wt));
}

#[test]
fn fused_sdpa_has_no_cpu_kernel_at_all() {
    // candle_nn::ops::sdpa is a Metal-only custom op applied without backward; on CPU it cannot
    // even run a forward, so models must use `ops::sdpa` everywhere. (On the CPU by design.)
    let q = var_on(&[1, 1, 4, 8], 24, &Device::Cpu);
    let r = candle_nn::ops::sdpa(q.as_tensor(), q.as_tensor(), q.as_tensor(), None, false, 1.0, 1.0);
    assert!(r.is_err());
}

fn f32_of(v: &Var) -> Tensor {
    v.as_tensor().to_dtype(DType::F32).unwrap()
}

fn var32(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&f32_of(&var(shape, seed))).unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff <= tol, "max abs difference {diff:.3e} > {tol:.1e}");
}

#[test]
fn conv2d_matches_candle_forward_and_finite_differences() {
    // (channels in, out, kernel, stride, padding, side): ResNet's stem, strided and plain 3×3,
    // a 1×1 projection, and an odd side that leaves a remainder under stride 2.
    let cases = [(3, 4, 7, 2, 3, 11), (2, 3, 3, 2, 1, 9), (2, 3, 3, 1, 1, 6), (3, 2, 1, 2, 0, 7), (2, 2, 3, 2, 0, 8)];
    for (k, &(cin, cout, kernel, stride, padding, side)) in cases.iter().enumerate() {
        let seed = 100 + 10 * k as u64;
        let x = var(&[2, cin, side, side], seed);
        let w = var(&[cout, cin, kernel, kernel], seed + 1);
        let b = var(&[cout], seed + 2);
        let ours = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, padding).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(w.as_tensor(), padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), reference.dims());
        assert_close(&ours, &reference, 1e-12);
        let probe = weights(ours.dims(), seed + 3);
        check(&format!("conv2d case {k}"), &[("x", &x), ("weight", &w), ("bias", &b)], || {
            contract(&conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, padding)?, &probe)
        });
    }
}

#[test]
fn conv2d_module_uses_candle_names_and_rejects_bad_shapes() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let conv = Conv2d::new(9, 16, 3, 2, 1, true, vb.pp("conv1")).unwrap();
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names.contains(&"conv1.weight".to_string()) && names.contains(&"conv1.bias".to_string()), "{names:?}");
    let y = conv.forward(&Tensor::zeros((1, 9, 16, 16), DType::F32, &dev()).unwrap()).unwrap();
    assert_eq!(y.dims(), &[1, 16, 8, 8]);
    let err = conv.forward(&Tensor::zeros((1, 3, 16, 16), DType::F32, &dev()).unwrap()).unwrap_err();
    assert!(err.to_string().contains("3 channels"), "{err}");
}

#[test]
fn conv2d_cpu_columns_equal_the_device_generic_gather() {
    // The CPU im2col kernel and the gather path (used on CUDA/Metal) build identical columns:
    // on the CPU by design (the im2col kernel is the CPU's).
    for &(kernel, stride, padding, side) in &[(7, 2, 3, 11), (3, 2, 1, 9), (3, 1, 1, 6), (1, 2, 0, 7), (5, 3, 4, 8)] {
        // Non-square (side × side + 3) so rows and columns cannot be swapped unseen.
        let x = var_on(&[2, 3, side, side + 3], 7, &Device::Cpu).as_tensor().clone();
        let g = Im2Col { n: 2, c: 3, h: side, w: side + 3, kh: kernel, kw: kernel, stride, padding };
        let cpu = x.apply_op1(g).unwrap();
        let gathered = gathered_columns(&x, &g).unwrap();
        assert_eq!(cpu.dims(), gathered.dims());
        assert_close(&cpu, &gathered, 0.0);
    }
}

/// The gather path (CUDA/Metal) run on the CPU: its forward equals `Tensor::conv2d`, its
/// gradients match finite differences for each of input, weight and bias, and equal the CPU
/// im2col path's gradients. On the CPU by design (on a GPU both paths are the gather, which
/// `conv2d_matches_candle_forward_and_finite_differences` checks there).
#[test]
fn conv2d_gather_path_gradients_match_finite_differences_and_the_cpu_path() {
    let cases = [(3, 4, 7, 2, 3, 11), (2, 3, 3, 2, 1, 9), (2, 3, 3, 1, 1, 6), (3, 2, 1, 2, 0, 7), (2, 2, 3, 2, 0, 8)];
    let cpu = &Device::Cpu;
    for (k, &(cin, cout, kernel, stride, padding, side)) in cases.iter().enumerate() {
        let seed = 200 + 10 * k as u64;
        let x = var_on(&[2, cin, side, side], seed, cpu);
        let w = var_on(&[cout, cin, kernel, kernel], seed + 1, cpu);
        let b = var_on(&[cout], seed + 2, cpu);
        let run = |columns: ColumnsPath| {
            let paths = ConvPaths { columns, ..Default::default() };
            conv2d_with(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, padding, paths)
        };
        let gathered = run(ColumnsPath::Gather).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(w.as_tensor(), padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        assert_close(&gathered, &reference, 1e-12);
        let probe = weights_on(gathered.dims(), seed + 3, cpu);
        check(&format!("conv2d gather path case {k}"), &[("x", &x), ("weight", &w), ("bias", &b)], || {
            contract(&run(ColumnsPath::Gather)?, &probe)
        });
        // The columns are bit-identical (test above), so the weight and bias gradients (GEMMs of
        // the same operands) must be too. The input gradient is summed over overlapping taps in
        // another order (col2im vs index_select's backward): f64 round-off, measured ≤ 4.4e-15.
        let cpu_grads = contract(&run(ColumnsPath::ByDevice).unwrap(), &probe).unwrap().backward().unwrap();
        let gather_grads = contract(&run(ColumnsPath::Gather).unwrap(), &probe).unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let cpu = cpu_grads.get(v.as_tensor()).unwrap_or_else(|| panic!("case {k}: CPU path, no {name} gradient"));
            let gather =
                gather_grads.get(v.as_tensor()).unwrap_or_else(|| panic!("case {k}: gather path, no {name} gradient"));
            assert_eq!(cpu.dims(), gather.dims(), "case {k}: {name} gradient shape");
            assert_close(gather, cpu, if name == "x" { 1e-13 } else { 0.0 });
        }
    }
}

/// x / sqrt(mean(x²) + eps) · w over the last axis, written out on plain floats.
fn rms_norm_by_hand(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, g)| v * inv * g).collect::<Vec<_>>()
        })
        .collect()
}

/// (x − mean) / sqrt(var + eps) · w + b over the last axis (biased variance), on plain floats.
fn layer_norm_by_hand(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter().zip(w.iter().zip(b)).map(move |(v, (g, c))| (v - mean) * inv * g + c).collect::<Vec<_>>()
        })
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Puts random values into a VarMap's Var (the modules initialise weights to 1 and biases to 0,
/// under which a swapped or ignored parameter would go unnoticed) and returns that Var.
fn randomise(varmap: &candle_nn::VarMap, name: &str, seed: u64) -> Var {
    let data = varmap.data().lock().unwrap();
    let v = data.get(name).unwrap_or_else(|| panic!("varmap has no '{name}'")).clone();
    let noise = SplitMix64::new(seed).normal_tensor(v.dims(), DType::F64, &dev()).unwrap();
    v.set(&noise.affine(0.5, 1.0).unwrap()).unwrap();
    v
}

/// The `RmsNorm` module: output by value against the formula written out by hand and against
/// the functional `rms_norm`; gradients with respect to the input and to the VarMap weight.
#[test]
fn rms_norm_module_matches_formula_and_finite_differences() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev());
    // eps = 0.1 and a batch of rows scaled ×0.2 (mean x² ≈ 0.04): eps carries weight in the
    // denominator, so eps outside the square root or a missing eps changes the output by ≫ 1e-12.
    let eps = 0.1;
    let norm = RmsNorm::new(8, eps, vb.pp("q_norm")).unwrap();
    let weight = randomise(&varmap, "q_norm.weight", 30);
    let scale = Tensor::new(&[1.0f64, 0.2, 3.0], &dev()).unwrap().reshape((1, 3, 1)).unwrap();
    let x = Var::from_tensor(&var(&[2, 3, 8], 31).as_tensor().broadcast_mul(&scale).unwrap()).unwrap();

    let y = norm.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 3, 8]);
    let by_hand = rms_norm_by_hand(&values(x.as_tensor()), &values(weight.as_tensor()), eps);
    let by_hand = Tensor::from_vec(by_hand, (2, 3, 8), &dev()).unwrap();
    // The same arithmetic in another order: f64 round-off only (measured 2.2e-16).
    assert_close(&y, &by_hand, 1e-14);
    assert_close(&y, &rms_norm(x.as_tensor(), Some(weight.as_tensor()), eps).unwrap(), 0.0);

    let w = weights(&[2, 3, 8], 31);
    check("RmsNorm module", &[("x", &x), ("weight", &weight)], || contract(&norm.forward(x.as_tensor())?, &w));
}

/// The `LayerNorm` module: output by value against the formula written out by hand; gradients
/// with respect to the input and to its VarMap weight and bias, each on its own.
#[test]
fn layer_norm_module_matches_formula_and_finite_differences() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev());
    let eps = 0.1;
    let norm = LayerNorm::new(8, eps, vb.pp("norm")).unwrap();
    let weight = randomise(&varmap, "norm.weight", 32);
    let bias = randomise(&varmap, "norm.bias", 33);
    let scale = Tensor::new(&[1.0f64, 0.2, 3.0], &dev()).unwrap().reshape((1, 3, 1)).unwrap();
    let x = Var::from_tensor(&var(&[2, 3, 8], 34).as_tensor().broadcast_mul(&scale).unwrap()).unwrap();

    let y = norm.forward(x.as_tensor()).unwrap();
    let by_hand =
        layer_norm_by_hand(&values(x.as_tensor()), &values(weight.as_tensor()), &values(bias.as_tensor()), eps);
    // f64 round-off only (measured 4.4e-16).
    assert_close(&y, &Tensor::from_vec(by_hand, (2, 3, 8), &dev()).unwrap(), 1e-14);

    let w = weights(&[2, 3, 8], 34);
    check("LayerNorm module", &[("x", &x), ("weight", &weight), ("bias", &bias)], || {
        contract(&norm.forward(x.as_tensor())?, &w)
    });
}

// ---- conv3d, the frozen-weight path, half precision, l2_normalize, upsampling, padding ----

/// PyTorch numbers made by `fixtures/make_torch_reference.py` (its header has the versions).
const TORCH_REFERENCE: &str = include_str!("fixtures/torch_reference.json");

fn torch_reference() -> serde_json::Value {
    serde_json::from_str(TORCH_REFERENCE).expect("fixtures/torch_reference.json parses")
}

/// `{"shape": [...], "data": [...]}` → an f64 tensor.
fn fixture_tensor(v: &serde_json::Value) -> Tensor {
    let shape: Vec<usize> =
        v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
    let data: Vec<f64> = v["data"].as_array().expect("data").iter().map(|d| d.as_f64().expect("number")).collect();
    Tensor::from_vec(data, shape, &dev()).unwrap()
}

struct Conv3dCase {
    name: String,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    out: Tensor,
    stride: (usize, usize),
    padding: usize,
}

fn conv3d_cases() -> Vec<Conv3dCase> {
    let reference = torch_reference();
    let cases = reference["conv3d"].as_array().expect("conv3d cases").clone();
    cases
        .iter()
        .map(|c| Conv3dCase {
            name: c["name"].as_str().expect("name").to_string(),
            x: fixture_tensor(&c["x"]),
            weight: fixture_tensor(&c["weight"]),
            bias: fixture_tensor(&c["bias"]),
            out: fixture_tensor(&c["out"]),
            stride: (c["stride"][0].as_u64().unwrap() as usize, c["stride"][1].as_u64().unwrap() as usize),
            padding: c["padding"].as_u64().unwrap() as usize,
        })
        .collect()
}

fn as_var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// conv3d against PyTorch's `F.conv3d` (kt ∈ {1, 2, 3}, temporal stride 1 and 2, spatial stride
/// 1 and 2, 1×1, 1×3 and 3×3 kernels, padding 0 and 1, H ≠ W, batch 1 and 2), on both ways of
/// building the columns, and its gradients for x, weight and bias each by finite differences.
#[test]
fn conv3d_matches_torch_and_finite_differences_per_variable() {
    let cases = conv3d_cases();
    assert_eq!(cases.len(), 8);
    for (k, case) in cases.iter().enumerate() {
        let Conv3dCase { name, x, weight, bias, out, stride, padding } = case;
        let ours = conv3d(x, weight, Some(bias), *stride, *padding).unwrap();
        assert_eq!(ours.dims(), out.dims(), "{name}");
        // Sums of at most C·kt·kh·kw = 54 products of O(1) numbers in another order than torch:
        // f64 round-off (measured ≤ 3.6e-15 on the CPU columns, ≤ 8.9e-15 gathered).
        assert_close(&ours, out, 1e-13);
        let gather = ConvPaths { columns: ColumnsPath::Gather, ..Default::default() };
        assert_close(&conv3d_with(x, weight, Some(bias), *stride, *padding, gather).unwrap(), out, 1e-13);

        let (xv, wv, bv) = (as_var(x), as_var(weight), as_var(bias));
        let probe = weights(out.dims(), 300 + k as u64);
        check(&format!("conv3d {name}"), &[("x", &xv), ("weight", &wv), ("bias", &bv)], || {
            contract(&conv3d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), *stride, *padding)?, &probe)
        });
    }
}

/// The gradient of x alone under a conv with a trainable weight (weight and bias Vars).
fn trainable_input_grad(
    conv: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Var,
    weight: &Tensor,
    bias: &Tensor,
    probe: &Tensor,
) -> (Tensor, Tensor) {
    let (wv, bv) = (as_var(weight), as_var(bias));
    let y = conv(x.as_tensor(), wv.as_tensor(), bv.as_tensor()).unwrap();
    let grads = contract(&y, probe).unwrap().backward().unwrap();
    assert!(grads.get(wv.as_tensor()).is_some(), "the trainable path gives the weight a gradient");
    (y, grads.get(x.as_tensor()).expect("trainable path: x gradient").clone())
}

/// With the weight and bias frozen (plain tensors) and x a Var, conv3d takes the frozen path:
/// the same forward value bit for bit, the trainable path's input gradient, and finite
/// differences on x — for the CPU's col2im and for `conv_transpose2d` (the CUDA/Metal backward).
#[test]
fn conv3d_frozen_weight_path_equals_trainable_path_and_finite_differences() {
    for (k, case) in conv3d_cases().iter().enumerate() {
        let Conv3dCase { name, x, weight, bias, stride, padding, .. } = case;
        let (stride, padding) = (*stride, *padding);
        let xv = as_var(x);
        let probe = weights(case.out.dims(), 400 + k as u64);
        let (trainable_y, trainable_gx) =
            trainable_input_grad(|x, w, b| conv3d(x, w, Some(b), stride, padding), &xv, weight, bias, &probe);
        for input_grad in [InputGradPath::ByDevice, InputGradPath::ConvTranspose] {
            let paths = ConvPaths { frozen_input_grad: input_grad, ..Default::default() };
            let run = || conv3d_with(xv.as_tensor(), weight, Some(bias), stride, padding, paths);
            let y = run().unwrap();
            assert_close(&y, &trainable_y, 0.0);
            let grads = contract(&y, &probe).unwrap().backward().unwrap();
            let gx = grads.get(xv.as_tensor()).unwrap_or_else(|| panic!("{name} {input_grad:?}: no x gradient"));
            // Same products, summed over taps and overlapping windows in another order: f64
            // round-off (measured ≤ 3.6e-15 on gradients of magnitude ~10).
            assert_close(gx, &trainable_gx, 1e-13);
            check(&format!("frozen conv3d {name} {input_grad:?}"), &[("x", &xv)], || contract(&run()?, &probe));
        }
    }
}

/// The same for conv2d: bit-identical forward, the trainable path's input gradient, finite
/// differences on x; with and without bias, odd and non-square sides whose remainders under
/// stride 2 differ between H and W (where a single `output_padding` cannot serve both axes).
#[test]
fn conv2d_frozen_weight_path_equals_trainable_path_and_finite_differences() {
    // (in, out, kernel (kh, kw), stride, padding, (h, w), bias)
    let cases = [
        (3, 4, (7, 7), 2, 3, (11, 11), true),
        (2, 3, (3, 3), 2, 1, (9, 8), true),
        (2, 3, (3, 3), 1, 1, (6, 5), false),
        (3, 2, (1, 1), 2, 0, (7, 6), true),
        (2, 2, (3, 3), 2, 0, (8, 7), true),
        (2, 3, (1, 3), 1, 1, (4, 6), false),
    ];
    for (k, &(cin, cout, (kh, kw), stride, padding, (h, w), with_bias)) in cases.iter().enumerate() {
        let seed = 500 + 10 * k as u64;
        let xv = var(&[2, cin, h, w], seed);
        let weight = weights(&[cout, cin, kh, kw], seed + 1);
        let bias = weights(&[cout], seed + 2);
        let bias_arg = |b: &Tensor| if with_bias { Some(b.clone()) } else { None };
        let y0 = conv2d(xv.as_tensor(), &weight, bias_arg(&bias).as_ref(), stride, padding).unwrap();
        let probe = weights(y0.dims(), seed + 3);
        let (trainable_y, trainable_gx) = trainable_input_grad(
            |x, w, b| conv2d(x, w, bias_arg(b).as_ref(), stride, padding),
            &xv,
            &weight,
            &bias,
            &probe,
        );
        // Against Candle's own conv2d as an outside reference for the value (measured ≤ 2.2e-15).
        let mut reference = xv.as_tensor().conv2d(&weight, padding, stride, 1, 1).unwrap();
        if with_bias {
            reference = reference.broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
        }
        assert_close(&y0, &reference, 1e-12);
        for input_grad in [InputGradPath::ByDevice, InputGradPath::ConvTranspose] {
            let paths = ConvPaths { frozen_input_grad: input_grad, ..Default::default() };
            let run = || conv2d_with(xv.as_tensor(), &weight, bias_arg(&bias).as_ref(), stride, padding, paths);
            let y = run().unwrap();
            assert_close(&y, &trainable_y, 0.0);
            let grads = contract(&y, &probe).unwrap().backward().unwrap();
            let gx = grads.get(xv.as_tensor()).unwrap_or_else(|| panic!("case {k} {input_grad:?}: no x gradient"));
            // Round-off of sums in another order (measured ≤ 3.6e-15).
            assert_close(gx, &trainable_gx, 1e-13);
            check(&format!("frozen conv2d case {k} {input_grad:?}"), &[("x", &xv)], || contract(&run()?, &probe));
        }
    }
}

/// bf16 and f16 on the CPU: conv2d and conv3d forwards (untracked, trainable-weight and frozen
/// paths) and backwards against the same computation in f32 on the same half-rounded inputs, so
/// only the arithmetic's precision differs. On the CPU by design: the tolerances are the CPU
/// kernels' measured rounding (GPU GEMMs round half precision differently).
#[test]
fn conv2d_and_conv3d_run_in_bf16_and_f16_on_the_cpu() {
    let cpu = &Device::Cpu;
    let x2 = weights_on(&[2, 4, 9, 8], 600, cpu);
    let w2 = weights_on(&[5, 4, 3, 3], 601, cpu).affine(1.0 / 6.0, 0.0).unwrap();
    let x3 = weights_on(&[1, 4, 5, 7, 6], 602, cpu);
    let w3 = weights_on(&[3, 4, 3, 3, 3], 603, cpu).affine(1.0 / 10.0, 0.0).unwrap();
    let bias5 = weights_on(&[5], 604, cpu);
    let bias3 = weights_on(&[3], 605, cpu);
    type Conv = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let conv2: Conv = |x, w, b| conv2d(x, w, Some(b), 2, 1);
    let conv3: Conv = |x, w, b| conv3d(x, w, Some(b), (1, 1), 1);
    // Relative to the output's (or gradient's) largest magnitude: bf16 keeps 8 significant bits
    // (half an ulp is 2⁻⁹ ≈ 2e-3 relative), f16 11 (2⁻¹² ≈ 2.4e-4). The GEMM sums in f32 and
    // rounds once, the bias add and (conv3d) the f32 sum over taps round once more, col2im sums
    // in f32: ~2 roundings, so the tolerance is 3 half-ulps. Measured: bf16 forward ≤ 3.7e-3,
    // gradients ≤ 5.3e-3; f16 forward ≤ 4.7e-4, gradients ≤ 4.9e-4. A wrong tap, frame or
    // channel, or sums in bf16 (conv3d's x gradient was 1.2e-2 so), fail.
    for (dtype, tol) in [(DType::BF16, 6e-3), (DType::F16, 1e-3)] {
        for (what, conv, x, w, b) in [("conv2d", conv2, &x2, &w2, &bias5), ("conv3d", conv3, &x3, &w3, &bias3)] {
            let half = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let full = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (xh, wh, bh) = (half(x), half(w), half(b));
            let (xf, wf, bf) = (full(x), full(w), full(b));
            let reference = conv(&xf, &wf, &bf).unwrap();
            let scale = max_abs(&reference);
            let y = conv(&xh, &wh, &bh).unwrap();
            assert_eq!(y.dtype(), dtype);
            let forward_error = max_abs(&(y.to_dtype(DType::F32).unwrap() - &reference).unwrap()) / scale;
            assert!(forward_error <= tol, "{what} {dtype:?}: forward relative error {forward_error:.2e} > {tol:.0e}");

            // Backward, frozen weight (x a Var) and trainable weight (weight a Var).
            let probe = weights_on(reference.dims(), 606, cpu);
            let grad_of = |x: &Tensor, w: &Tensor, b: &Tensor, of_weight: bool| {
                let (xv, wv) = (as_var(x), as_var(w));
                let y = if of_weight { conv(x, wv.as_tensor(), b) } else { conv(xv.as_tensor(), w, b) }.unwrap();
                let loss = (y.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap()).unwrap().sum_all();
                let grads = loss.unwrap().backward().unwrap();
                let g = grads.get(if of_weight { wv.as_tensor() } else { xv.as_tensor() }).expect("gradient");
                (y, g.to_dtype(DType::F32).unwrap())
            };
            for of_weight in [false, true] {
                let (yh, gh) = grad_of(&xh, &wh, &bh, of_weight);
                let (_, gf) = grad_of(&xf, &wf, &bf, of_weight);
                assert_close(&yh, &y, 0.0);
                let grad_error = max_abs(&(&gh - &gf).unwrap()) / max_abs(&gf);
                let which = if of_weight { "weight" } else { "x (frozen path)" };
                eprintln!("{what} {dtype:?}: forward {forward_error:.2e}, {which} gradient {grad_error:.2e}");
                assert!(grad_error <= tol, "{what} {dtype:?} {which} gradient: {grad_error:.2e} > {tol:.0e}");
            }
        }
    }
}

#[test]
fn conv3d_rejects_bad_shapes() {
    let x = weights(&[1, 2, 2, 5, 5], 700);
    let w = weights(&[3, 2, 3, 3, 3], 701);
    let err = conv3d(&x, &w, None, (1, 1), 1).unwrap_err().to_string();
    assert!(err.contains("2 frames, 3 temporal taps"), "{err}");
    let w1 = weights(&[3, 4, 1, 3, 3], 702);
    let err = conv3d(&x, &w1, None, (1, 1), 1).unwrap_err().to_string();
    assert!(err.contains("2 channels, weight expects 4"), "{err}");
    let w2 = weights(&[3, 2, 1, 3, 3], 703);
    let err = conv3d(&x, &w2, Some(&weights(&[2], 704)), (1, 1), 1).unwrap_err().to_string();
    assert!(err.contains("bias of shape [2], expected [3]"), "{err}");
    let err = conv3d(&x, &w2, None, (0, 1), 1).unwrap_err().to_string();
    assert!(err.contains("temporal stride 0"), "{err}");
}

/// x / max(‖x‖, eps) along `dim`, written out on plain floats for a contiguous tensor.
fn l2_normalize_by_hand(x: &[f64], dims: &[usize], dim: usize, eps: f64) -> Vec<f64> {
    let len = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    let outer: usize = dims[..dim].iter().product();
    let mut out = vec![0.0; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            let norm = (0..len).map(|k| x[at(k)] * x[at(k)]).sum::<f64>().sqrt();
            for k in 0..len {
                out[at(k)] = x[at(k)] / norm.max(eps);
            }
        }
    }
    out
}

/// l2_normalize against PyTorch's `F.normalize` (values and the gradient of ⟨y, probe⟩), the
/// formula by hand, and finite differences — including a zero row and a row with ‖x‖ < eps.
#[test]
fn l2_normalize_matches_torch_formula_and_finite_differences() {
    let reference = torch_reference();
    for case in reference["l2_normalize"].as_array().expect("l2 cases") {
        let name = case["name"].as_str().unwrap();
        let dim = case["dim"].as_u64().unwrap() as usize;
        let eps = case["eps"].as_f64().unwrap();
        let x = fixture_tensor(&case["x"]);
        let (torch_out, probe, torch_grad) =
            (fixture_tensor(&case["out"]), fixture_tensor(&case["probe"]), fixture_tensor(&case["x_grad"]));
        let xv = as_var(&x);
        let y = l2_normalize(xv.as_tensor(), dim, eps).unwrap();
        // One division by a norm of ≤ 6 terms in f64: round-off (measured ≤ 1.1e-16).
        assert_close(&y, &torch_out, 1e-15);
        let by_hand = l2_normalize_by_hand(&values(&x), x.dims(), dim, eps);
        assert_close(&y, &Tensor::from_vec(by_hand, x.dims(), &dev()).unwrap(), 1e-15);
        let grads = contract(&y, &probe).unwrap().backward().unwrap();
        // Gradients of size ~1–5: round-off (measured ≤ 2.2e-16).
        assert_close(grads.get(xv.as_tensor()).expect("x gradient"), &torch_grad, 1e-14);
        check(&format!("l2_normalize {name}"), &[("x", &xv)], || {
            contract(&l2_normalize(xv.as_tensor(), dim, eps)?, &probe)
        });
    }
    // The zero row's gradient is finite: probe / eps (torch agrees above); in f16 too.
    let zeros = Tensor::zeros((2, 3), DType::F16, &dev()).unwrap();
    let y = l2_normalize(&zeros, 1, 1e-12).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    assert_eq!(max_abs(&y), 0.0);
    assert!(l2_normalize(&zeros, 2, 1e-12).is_err());
}

/// upsample_nearest2x equals PyTorch's `nearest-exact` and `nearest` at factor 2 (exactly: it
/// copies), and its gradient sums each 2×2 block even when x is also used elsewhere.
#[test]
fn upsample_nearest2x_matches_torch_and_accumulates_its_gradient() {
    let reference = torch_reference();
    let case = &reference["upsample_nearest2x"];
    let x = fixture_tensor(&case["x"]);
    let y = upsample_nearest2x(&x).unwrap();
    assert_close(&y, &fixture_tensor(&case["nearest_exact"]), 0.0);
    assert_close(&y, &fixture_tensor(&case["nearest"]), 0.0);

    let xv = as_var(&x);
    let (w_same, w_up) = (weights(x.dims(), 800), weights(y.dims(), 801));
    // ⟨3x, w_same⟩ + ⟨up(x), w_up⟩, summed in either order: the order decides whether the
    // upsampling's backward runs before or after x already holds the other term's gradient.
    let used_twice = |up: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>, up_first: bool| {
        let x = xv.as_tensor();
        let (same, upsampled) = (contract(&(x * 3.0)?, &w_same)?, contract(&up(x)?, &w_up)?);
        if up_first {
            upsampled + same
        } else {
            same + upsampled
        }
    };
    check("upsample_nearest2x", &[("x", &xv)], || contract(&upsample_nearest2x(xv.as_tensor())?, &w_up));
    // The block sums by hand: grad = 3·w_same + Σ over each 2×2 block of w_up.
    let (n, c, h, w) = x.dims4().unwrap();
    let blocks = w_up.reshape((n, c, h, 2, w, 2)).unwrap().sum(5).unwrap().sum(3).unwrap();
    let by_hand = ((&w_same * 3.0).unwrap() + blocks).unwrap();
    let mut candle_errors = Vec::new();
    for up_first in [false, true] {
        check(&format!("3x + upsample_nearest2x(x), up first: {up_first}"), &[("x", &xv)], || {
            used_twice(&|x| upsample_nearest2x(x), up_first)
        });
        let grads = used_twice(&|x| upsample_nearest2x(x), up_first).unwrap().backward().unwrap();
        // Five terms summed in another order: round-off (measured ≤ 8.9e-16).
        assert_close(grads.get(xv.as_tensor()).unwrap(), &by_hand, 1e-14);
        let candle = used_twice(&|x| x.upsample_nearest2d(2 * h, 2 * w), up_first).unwrap().backward().unwrap();
        candle_errors.push(max_abs(&(candle.get(xv.as_tensor()).unwrap() - &by_hand).unwrap()));
    }
    // Candle's own nearest upsampling overwrites x's gradient in one of the two orders (if this
    // fails, Candle fixed it).
    eprintln!("Candle upsample_nearest2d gradient errors (up last, up first): {candle_errors:?}");
    assert!(candle_errors.iter().any(|&e| e > 0.1), "Candle's upsample_nearest2d gradient is now right");
}

/// Candle's `pad_with_zeros` has a correct gradient for asymmetric padding, 0 on either side,
/// and an input also used elsewhere: so no `pad_zeros` of ours is needed.
#[test]
fn pad_with_zeros_asymmetric_matches_finite_differences() {
    let xv = var(&[2, 3, 4, 5], 900);
    for (k, &(dim, before, after)) in [(3, 0, 1), (2, 0, 1), (3, 2, 0), (1, 1, 2), (0, 0, 3)].iter().enumerate() {
        let padded = xv.as_tensor().pad_with_zeros(dim, before, after).unwrap();
        let mut expected = xv.dims().to_vec();
        expected[dim] += before + after;
        assert_eq!(padded.dims(), expected.as_slice());
        // The original values sit at offset `before`, zeros around them.
        assert_close(&padded.narrow(dim, before, xv.dims()[dim]).unwrap(), xv.as_tensor(), 0.0);
        let kept = xv.dims()[dim];
        for (start, len) in [(0, before), (before + kept, after)] {
            if len > 0 {
                assert_eq!(max_abs(&padded.narrow(dim, start, len).unwrap()), 0.0);
            }
        }
        let (w_pad, w_same) = (weights(padded.dims(), 910 + k as u64), weights(xv.dims(), 920 + k as u64));
        check(&format!("pad_with_zeros dim {dim} ({before}, {after})"), &[("x", &xv)], || {
            let x = xv.as_tensor();
            contract(&x.pad_with_zeros(dim, before, after)?, &w_pad)? + contract(&(x * 3.0)?, &w_same)?
        });
    }
}

/// Half-precision inputs are normalised in f32 and rounded once (as upstream's Wan RMS norm and
/// PyTorch's fused norms do): exactly the f32 result of the same (rounded) inputs, rounded.
#[test]
fn l2_normalize_computes_half_precision_in_f32() {
    for dtype in [DType::BF16, DType::F16] {
        let x = (var(&[2, 6, 3, 4], 40).as_tensor() * 3.0).unwrap().to_dtype(dtype).unwrap();
        let ours = l2_normalize(&x, 1, 1e-12).unwrap();
        assert_eq!(ours.dtype(), dtype);
        let reference = l2_normalize(&x.to_dtype(DType::F32).unwrap(), 1, 1e-12).unwrap().to_dtype(dtype).unwrap();
        assert_close(&ours, &reference, 0.0);
        // Not what normalising in the half type itself gives.
        let naive = x.broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()).unwrap();
        let differs = (naive.to_dtype(DType::F64).unwrap() - ours.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(differs > 0.0, "{dtype:?}: the half-precision computation should round differently");
    }
}

/// `causal_pad` is `cat([zeros, prefix, x])`, and its injected adjoint gives exactly the gradient
/// of the extra loss term ⟨out[−n:], adjoint⟩ — for a prefix or none, front zeros or none, and an
/// adjoint that reaches back into the prefix (n > frames of x) or into the zeros (dropped).
#[test]
fn causal_pad_injects_the_tail_adjoint_exactly() {
    let cases =
        [(Some(2), 0, 2, 4), (Some(2), 0, 2, 1), (None, 2, 2, 1), (None, 2, 1, 1), (Some(1), 1, 2, 4), (None, 0, 2, 3)];
    for (k, &(prefix_len, front, n, x_len)) in cases.iter().enumerate() {
        let seed = 300 + 10 * k as u64;
        let x = var(&[2, 3, x_len, 2, 2], seed);
        let prefix = prefix_len.map(|p| var(&[2, 3, p, 2, 2], seed + 1));
        let total = front + prefix_len.unwrap_or(0) + x_len;
        let g = weights(&[2, 3, total, 2, 2], seed + 2);
        let adjoint = weights(&[2, 3, n, 2, 2], seed + 3);
        let injected =
            causal_pad(x.as_tensor(), prefix.as_ref().map(|p| p.as_tensor()), front, 2, Some(&adjoint)).unwrap();
        let plain = causal_pad(x.as_tensor(), prefix.as_ref().map(|p| p.as_tensor()), front, 2, None).unwrap();
        assert_eq!(injected.dims(), &[2, 3, total, 2, 2]);
        assert_close(&injected, &plain, 0.0);
        if front > 0 {
            assert_close(
                &plain.narrow(2, 0, front).unwrap(),
                &plain.narrow(2, 0, front).unwrap().zeros_like().unwrap(),
                0.0,
            );
        }
        let grads_injected = contract(&injected, &g).unwrap().backward().unwrap();
        let reference_loss = (contract(&plain, &g).unwrap()
            + contract(&plain.narrow(2, total - n, n).unwrap(), &adjoint).unwrap())
        .unwrap();
        let grads_reference = reference_loss.backward().unwrap();
        let mut vars = vec![&x];
        vars.extend(prefix.iter());
        for v in vars {
            let a = grads_injected.get(v.as_tensor()).expect("gradient reached");
            let b = grads_reference.get(v.as_tensor()).expect("gradient reached");
            assert_close(a, b, 1e-15);
        }
    }
}
