//! Batch norm and max pooling: values against references outside the code under test (an
//! explicit per-channel formula, `candle_nn::BatchNorm`, Candle's unpadded `max_pool2d`) and
//! gradients against central finite differences in f64, per variable. On the CPU: the one-op
//! paths are CPU kernels, and the composed paths other devices take are checked here too.

use super::norm::batch_norm_train_composed;
use super::pool::max_pool2d_composed;
use super::*;
use crate::rng::SplitMix64;
use candle_core::{DType, Device, ModuleT, Tensor, Var};

fn normal(shape: &[usize], seed: u64) -> Tensor {
    SplitMix64::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Each variable on its own and jointly, ⟨f, probe⟩ against central differences, to 1e-6.
fn check(name: &str, vars: &[(&str, &Var)], f: impl Fn() -> candle_core::Result<Tensor>) {
    super::tests::check_within(name, vars, f, 1e-6)
}

/// Per-channel mean and biased variance by explicit loops over (N, C, S) data.
fn loop_stats(x: &[f64], (n, c, s): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let values: Vec<f64> = (0..n).flat_map(|i| x[(i * c + ch) * s..(i * c + ch + 1) * s].to_vec()).collect();
        mean[ch] = values.iter().sum::<f64>() / values.len() as f64;
        var[ch] = values.iter().map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / values.len() as f64;
    }
    (mean, var)
}

#[test]
fn batch_norm_train_equals_the_formula_on_both_paths() {
    // Shifted and scaled so a missing mean subtraction or a wrong variance cannot hide.
    let (n, c, h, w) = (3, 4, 5, 2);
    let x = ((normal(&[n, c, h, w], 1) * 3.0).unwrap() + 2.0).unwrap();
    let weight = normal(&[c], 2);
    let bias = normal(&[c], 3);
    let eps = 1e-5;
    let data = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (mean, var) = loop_stats(&data, (n, c, h * w));
    let (wv, bv) = (weight.to_vec1::<f64>().unwrap(), bias.to_vec1::<f64>().unwrap());
    let expected: Vec<f64> = data
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = (i / (h * w)) % c;
            (v - mean[ch]) / (var[ch] + eps).sqrt() * wv[ch] + bv[ch]
        })
        .collect();
    let expected = Tensor::from_vec(expected, (n, c, h, w), &Device::Cpu).unwrap();
    for (path, (y, m, v)) in [
        ("fused", batch_norm_train(&x, &weight, &bias, eps).unwrap()),
        ("composed", batch_norm_train_composed(&x, &weight, &bias, eps).unwrap()),
    ] {
        assert!(max_abs_diff(&y, &expected) < 1e-12, "{path}: y");
        assert!(max_abs_diff(&m, &Tensor::new(mean.as_slice(), &Device::Cpu).unwrap()) < 1e-12, "{path}: mean");
        assert!(max_abs_diff(&v, &Tensor::new(var.as_slice(), &Device::Cpu).unwrap()) < 1e-12, "{path}: variance");
    }
    // f32 through the fused op agrees with the f64 formula to f32 rounding.
    let y32 = batch_norm_train(
        &x.to_dtype(DType::F32).unwrap(),
        &weight.to_dtype(DType::F32).unwrap(),
        &bias.to_dtype(DType::F32).unwrap(),
        eps,
    )
    .unwrap()
    .0;
    assert_eq!(y32.dtype(), DType::F32);
    assert!(max_abs_diff(&y32, &expected) < 1e-5);
}

#[test]
fn batch_norm_train_gradients_match_finite_differences_per_variable() {
    // Rank 4 (a conv map) and rank 2 (features), fused and composed.
    for (k, shape) in [vec![3, 4, 3, 5], vec![6, 3]].into_iter().enumerate() {
        let c = shape[1];
        let seed = 10 + 10 * k as u64;
        let x = Var::from_tensor(&((normal(&shape, seed) * 2.0).unwrap() - 1.0).unwrap()).unwrap();
        let weight = Var::from_tensor(&normal(&[c], seed + 1)).unwrap();
        let bias = Var::from_tensor(&normal(&[c], seed + 2)).unwrap();
        let probe = normal(&shape, seed + 3);
        let vars = [("x", &x), ("weight", &weight), ("bias", &bias)];
        check(&format!("batch norm fused, shape {shape:?}"), &vars, || {
            let (y, _, _) = batch_norm_train(x.as_tensor(), weight.as_tensor(), bias.as_tensor(), 1e-5)?;
            (y * &probe)?.sum_all()
        });
        check(&format!("batch norm composed, shape {shape:?}"), &vars, || {
            let (y, _, _) = batch_norm_train_composed(x.as_tensor(), weight.as_tensor(), bias.as_tensor(), 1e-5)?;
            (y * &probe)?.sum_all()
        });
    }
}

#[test]
fn batch_norm_module_matches_candle_nn_in_both_modes() {
    // candle_nn::BatchNorm is the implementation this module replaces: same names, same outputs,
    // same running statistics after two training steps (f32; the fused op sums in f64, so the
    // values differ by rounding only), and bit for bit the same evaluation-mode output.
    let (n, c, h, w) = (4, 3, 6, 5);
    let mut init = SplitMix64::new(7);
    let varmap_ours = candle_nn::VarMap::new();
    let varmap_candle = candle_nn::VarMap::new();
    let vb_ours = candle_nn::VarBuilder::from_varmap(&varmap_ours, DType::F32, &Device::Cpu);
    let vb_candle = candle_nn::VarBuilder::from_varmap(&varmap_candle, DType::F32, &Device::Cpu);
    let ours = BatchNorm2d::new(c, 1e-5, 0.1, vb_ours.pp("bn")).unwrap();
    let config = candle_nn::BatchNormConfig { eps: 1e-5, remove_mean: true, affine: true, momentum: 0.1 };
    let theirs = candle_nn::batch_norm(c, config, vb_candle.pp("bn")).unwrap();
    let mut names: Vec<String> = varmap_ours.data().lock().unwrap().keys().cloned().collect();
    let mut theirs_names: Vec<String> = varmap_candle.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    theirs_names.sort();
    assert_eq!(names, theirs_names);
    // Non-trivial affine parameters in both.
    for name in ["bn.weight", "bn.bias"] {
        let value = init.normal_tensor(c, DType::F32, &Device::Cpu).unwrap();
        varmap_ours.data().lock().unwrap()[name].set(&value).unwrap();
        varmap_candle.data().lock().unwrap()[name].set(&value).unwrap();
    }
    for step in 0..2 {
        let x = ((init.normal_tensor((n, c, h, w), DType::F32, &Device::Cpu).unwrap() * 2.0).unwrap() + 0.5).unwrap();
        let ours_y = ours.forward_t(&x, true).unwrap();
        let theirs_y = theirs.forward_t(&x, true).unwrap();
        assert!(max_abs_diff(&ours_y, &theirs_y) < 2e-5, "step {step}: training output");
        assert!(max_abs_diff(ours.running_mean(), theirs.running_mean()) < 1e-6, "step {step}: running mean");
        assert!(max_abs_diff(ours.running_var(), theirs.running_var()) < 1e-5, "step {step}: running variance");
    }
    // Evaluation with identical running statistics: the same tensor ops in the same order.
    let x = init.normal_tensor((n, c, h, w), DType::F32, &Device::Cpu).unwrap();
    let stats_equal = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) == 0.0;
    varmap_candle.data().lock().unwrap()["bn.running_mean"].set(ours.running_mean()).unwrap();
    varmap_candle.data().lock().unwrap()["bn.running_var"].set(ours.running_var()).unwrap();
    let theirs = candle_nn::batch_norm(c, config, vb_candle.pp("bn")).unwrap();
    assert!(stats_equal(ours.running_mean(), theirs.running_mean()));
    assert_eq!(max_abs_diff(&ours.forward_t(&x, false).unwrap(), &theirs.forward_t(&x, false).unwrap()), 0.0);
    // One value per channel cannot be normalised in training mode (PyTorch refuses it too).
    let err = ours.forward_t(&Tensor::zeros((1, c, 1, 1), DType::F32, &Device::Cpu).unwrap(), true).unwrap_err();
    assert!(err.to_string().contains("more than one value"), "{err}");
}

/// Candle's unpadded `max_pool2d_with_stride` on an input padded with −10⁹ (below every value).
fn reference_pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let fill =
        |shape: (usize, usize, usize, usize)| (Tensor::ones(shape, x.dtype(), x.device()).unwrap() * -1e9).unwrap();
    let x = if padding > 0 {
        let rows = Tensor::cat(&[fill((n, c, padding, w)), x.clone(), fill((n, c, padding, w))], 2).unwrap();
        let hp = h + 2 * padding;
        Tensor::cat(&[fill((n, c, hp, padding)), rows, fill((n, c, hp, padding))], 3).unwrap()
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride((kernel, kernel), (stride, stride)).unwrap()
}

const POOL_CASES: [(usize, usize, usize, usize, usize); 4] =
    [(3, 2, 1, 9, 8), (3, 2, 1, 10, 7), (2, 2, 0, 6, 8), (3, 1, 1, 5, 6)];

#[test]
fn max_pool2d_equals_candle_on_padded_input_on_both_paths() {
    for (k, &(kernel, stride, padding, h, w)) in POOL_CASES.iter().enumerate() {
        let x = normal(&[2, 3, h, w], 40 + k as u64);
        let expected = reference_pool(&x, kernel, stride, padding);
        for (path, y) in [
            ("cpu op", max_pool2d(&x, kernel, stride, padding).unwrap()),
            ("composed", max_pool2d_composed(&x, kernel, stride, padding).unwrap()),
        ] {
            assert_eq!(max_abs_diff(&y, &expected), 0.0, "case {k} {path}");
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let low = x.to_dtype(dtype).unwrap();
            let y = max_pool2d(&low, kernel, stride, padding).unwrap();
            assert_eq!(y.dtype(), dtype);
            assert_eq!(max_abs_diff(&y, &reference_pool(&low, kernel, stride, padding)), 0.0, "case {k} {dtype:?}");
        }
    }
    let x = normal(&[1, 1, 4, 4], 1);
    for (kernel, stride, padding) in [(3, 2, 2), (0, 1, 0), (2, 0, 0), (5, 1, 0)] {
        assert!(max_pool2d(&x, kernel, stride, padding).is_err(), "kernel {kernel} stride {stride} padding {padding}");
    }
}

#[test]
fn max_pool2d_gradients_match_finite_differences_on_both_paths() {
    for (k, &(kernel, stride, padding, h, w)) in POOL_CASES.iter().enumerate() {
        let x = Var::from_tensor(&normal(&[2, 3, h, w], 60 + k as u64)).unwrap();
        let y = max_pool2d(x.as_tensor(), kernel, stride, padding).unwrap();
        let probe = normal(y.dims(), 70 + k as u64);
        check(&format!("max_pool2d cpu op, case {k}"), &[("x", &x)], || {
            (max_pool2d(x.as_tensor(), kernel, stride, padding)? * &probe)?.sum_all()
        });
        check(&format!("max_pool2d composed, case {k}"), &[("x", &x)], || {
            (max_pool2d_composed(x.as_tensor(), kernel, stride, padding)? * &probe)?.sum_all()
        });
    }
}

#[test]
fn max_pool2d_gives_a_tied_window_gradient_to_its_first_maximum() {
    // PyTorch's rule: on a constant input each 2×2 window's gradient goes to its top-left element.
    let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let grad = max_pool2d(x.as_tensor(), 2, 2, 0).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = grad.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let top_left = |i: usize| (i / 4).is_multiple_of(2) && (i % 4).is_multiple_of(2);
    for (i, g) in grad.iter().enumerate() {
        assert_eq!(*g, if top_left(i) { 1.0 } else { 0.0 }, "element {i}");
    }
}
