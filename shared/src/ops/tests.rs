//! Every op against central finite differences in f64, and every fused Candle op shown to
//! still drop its gradient.

use super::*;
use crate::gradcheck::{check_gradients, GradCheckOptions};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};

const TOL: f64 = 1e-5;

fn var(shape: &[usize], seed: u64) -> Var {
    let t = SplitMix64::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap();
    Var::from_tensor(&t).unwrap()
}

fn weights(shape: &[usize], seed: u64) -> Tensor {
    SplitMix64::new(seed ^ 0xABCD).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap()
}

/// ⟨op(x), w⟩ with fixed random w: a scalar whose gradient exercises every output element
/// (a plain sum would be constant for softmax). Each input is checked on its own and jointly.
fn check(name: &str, vars: &[(&str, &Var)], f: impl Fn() -> candle_core::Result<Tensor>) {
    let vars: Vec<(&str, Var)> = vars.iter().map(|(n, v)| (*n, (*v).clone())).collect();
    let report =
        check_gradients(&vars, f, &GradCheckOptions { eps: 1e-6, directions: 4, ..Default::default() }).unwrap();
    assert!(report.vars_without_grad().is_empty(), "{name}: vars without gradient {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-8, name).unwrap();
    report.assert_close(TOL, name).unwrap();
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
    let (x, g) = (f32_of(&x), f32_of(&g));
    let fused = candle_nn::ops::rms_norm(&x, &g, 1e-6).unwrap();
    let ours = rms_norm(&x, Some(&g), 1e-6).unwrap();
    assert_close(&ours, &fused, 1e-5);
}

fn rope_inputs(seed: u64) -> (Var, Tensor, Tensor, Tensor) {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = var(&[b, h, t, d], seed);
    let (cos, sin) = rope_tables_1d(t, d, 10_000.0, 1.0, DType::F64, &Device::Cpu).unwrap();
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
    let (cos, sin) = rope_tables_3d(grid, dims, (10_000.0, 10_000.0, 10_000.0), DType::F64, &Device::Cpu).unwrap();
    assert_eq!(cos.dims(), &[24, 8]);
    // Token (t=1, h=2, w=3): its t-part equals the 1D table at position 1, etc.
    let (ct, _) = rope_tables_1d(2, 4, 10_000.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let (cw, _) = rope_tables_1d(4, 6, 10_000.0, 1.0, DType::F64, &Device::Cpu).unwrap();
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
    let allowed = Tensor::from_vec(allowed, (4, 6), &Device::Cpu).unwrap();
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
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
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
    let (g, b) =
        (Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(), Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap());
    assert!(grad_is_dropped(&x, candle_nn::ops::layer_norm(x.as_tensor(), &g, &b, 1e-5), &w));
    // The default `candle_nn::layer_norm` module takes the fused path too.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let ln = candle_nn::layer_norm(8, 1e-5, vb).unwrap();
    assert!(grad_is_dropped(&x, ln.forward(x.as_tensor()), &w));
}

#[test]
fn fused_rms_norm_still_drops_gradient() {
    let x = var32(&[3, 8], 22);
    let w = weights(&[3, 8], 22).to_dtype(DType::F32).unwrap();
    let g = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
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
    // even run a forward, so models must use `ops::sdpa` everywhere.
    let q = var(&[1, 1, 4, 8], 24);
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
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let conv = Conv2d::new(9, 16, 3, 2, 1, true, vb.pp("conv1")).unwrap();
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names.contains(&"conv1.weight".to_string()) && names.contains(&"conv1.bias".to_string()), "{names:?}");
    let y = conv.forward(&Tensor::zeros((1, 9, 16, 16), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(y.dims(), &[1, 16, 8, 8]);
    let err = conv.forward(&Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert!(err.to_string().contains("3 channels"), "{err}");
}

#[test]
fn conv2d_cpu_columns_equal_the_device_generic_gather() {
    // The CPU im2col kernel and the gather path (used on CUDA/Metal) build identical columns.
    for &(kernel, stride, padding, side) in &[(7, 2, 3, 11), (3, 2, 1, 9), (3, 1, 1, 6), (1, 2, 0, 7)] {
        let x = var(&[2, 3, side, side], 7).as_tensor().clone();
        let g = Im2Col { n: 2, c: 3, h: side, w: side, kh: kernel, kw: kernel, stride, padding };
        let cpu = x.apply_op1(g).unwrap();
        let gathered = gathered_columns(&x, &g).unwrap();
        assert_eq!(cpu.dims(), gathered.dims());
        assert_close(&cpu, &gathered, 0.0);
    }
}

/// The gather path (CUDA/Metal) run on the CPU: its forward equals `Tensor::conv2d`, its
/// gradients match finite differences for each of input, weight and bias, and equal the CPU
/// im2col path's gradients.
#[test]
fn conv2d_gather_path_gradients_match_finite_differences_and_the_cpu_path() {
    let cases = [(3, 4, 7, 2, 3, 11), (2, 3, 3, 2, 1, 9), (2, 3, 3, 1, 1, 6), (3, 2, 1, 2, 0, 7), (2, 2, 3, 2, 0, 8)];
    for (k, &(cin, cout, kernel, stride, padding, side)) in cases.iter().enumerate() {
        let seed = 200 + 10 * k as u64;
        let x = var(&[2, cin, side, side], seed);
        let w = var(&[cout, cin, kernel, kernel], seed + 1);
        let b = var(&[cout], seed + 2);
        let run = |path: ColumnsPath| {
            conv2d_with_columns(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, padding, path)
        };
        let gathered = run(ColumnsPath::Gather).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(w.as_tensor(), padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        assert_close(&gathered, &reference, 1e-12);
        let probe = weights(gathered.dims(), seed + 3);
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
    let noise = SplitMix64::new(seed).normal_tensor(v.dims(), DType::F64, &Device::Cpu).unwrap();
    v.set(&noise.affine(0.5, 1.0).unwrap()).unwrap();
    v
}

/// The `RmsNorm` module: output by value against the formula written out by hand and against
/// the functional `rms_norm`; gradients with respect to the input and to the VarMap weight.
#[test]
fn rms_norm_module_matches_formula_and_finite_differences() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    // eps = 0.1 and a batch of rows scaled ×0.2 (mean x² ≈ 0.04): eps carries weight in the
    // denominator, so eps outside the square root or a missing eps changes the output by ≫ 1e-12.
    let eps = 0.1;
    let norm = RmsNorm::new(8, eps, vb.pp("q_norm")).unwrap();
    let weight = randomise(&varmap, "q_norm.weight", 30);
    let scale = Tensor::new(&[1.0f64, 0.2, 3.0], &Device::Cpu).unwrap().reshape((1, 3, 1)).unwrap();
    let x = Var::from_tensor(&var(&[2, 3, 8], 31).as_tensor().broadcast_mul(&scale).unwrap()).unwrap();

    let y = norm.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 3, 8]);
    let by_hand = rms_norm_by_hand(&values(x.as_tensor()), &values(weight.as_tensor()), eps);
    let by_hand = Tensor::from_vec(by_hand, (2, 3, 8), &Device::Cpu).unwrap();
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
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let eps = 0.1;
    let norm = LayerNorm::new(8, eps, vb.pp("norm")).unwrap();
    let weight = randomise(&varmap, "norm.weight", 32);
    let bias = randomise(&varmap, "norm.bias", 33);
    let scale = Tensor::new(&[1.0f64, 0.2, 3.0], &Device::Cpu).unwrap().reshape((1, 3, 1)).unwrap();
    let x = Var::from_tensor(&var(&[2, 3, 8], 34).as_tensor().broadcast_mul(&scale).unwrap()).unwrap();

    let y = norm.forward(x.as_tensor()).unwrap();
    let by_hand =
        layer_norm_by_hand(&values(x.as_tensor()), &values(weight.as_tensor()), &values(bias.as_tensor()), eps);
    // f64 round-off only (measured 4.4e-16).
    assert_close(&y, &Tensor::from_vec(by_hand, (2, 3, 8), &Device::Cpu).unwrap(), 1e-14);

    let w = weights(&[2, 3, 8], 34);
    check("LayerNorm module", &[("x", &x), ("weight", &weight), ("bias", &bias)], || {
        contract(&norm.forward(x.as_tensor())?, &w)
    });
}
