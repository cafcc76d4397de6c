use super::*;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};

fn map_with(names: &[(&str, &[usize])]) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    for (i, (name, shape)) in names.iter().enumerate() {
        vb.get_with_hints(shape.to_vec(), name, Init::Const(i as f64 + 1.0)).unwrap();
    }
    varmap
}

#[test]
fn groups_are_sorted_and_prefixes_are_exact() {
    let vm = map_with(&[
        ("critic.q1.w", &[2]),
        ("critic.a.w", &[2]),
        ("target.critic.q1.w", &[2]),
        ("target.critic.a.w", &[2]),
    ]);
    let p = Partitions::new(&vm)
        .optimised("critic", &["critic."])
        .unwrap()
        .target("critic_target", &["target.critic."])
        .unwrap();
    p.validate().unwrap();
    let names: Vec<String> = p.vars("critic").unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["critic.a.w", "critic.q1.w"]);
    assert_eq!(p.group_of("target.critic.q1.w").unwrap().name, "critic_target");
}

#[test]
fn ambiguous_prefix_is_rejected() {
    let vm = map_with(&[("critic.w", &[1])]);
    let err = Partitions::new(&vm).optimised("critic", &["critic"]).err().unwrap();
    assert!(matches!(err, PartitionError::AmbiguousPrefix { .. }));
    assert!(err.to_string().contains("end with '.'"), "{err}");
    assert!(Partitions::new(&vm).optimised("x", &[""]).is_err());
}

#[test]
fn overlapping_groups_are_rejected() {
    let vm = map_with(&[("actor.w", &[1]), ("actor.vae.w", &[1])]);
    let err =
        Partitions::new(&vm).optimised("actor", &["actor."]).unwrap().optimised("vae", &["actor.vae."]).err().unwrap();
    assert!(matches!(err, PartitionError::OverlappingPrefixes { .. }), "{err}");
    assert!(err.to_string().contains("actor.vae."), "{err}");
    let err = Partitions::new(&vm).optimised("a", &["actor."]).unwrap().optimised("a", &["b."]).err().unwrap();
    assert!(matches!(err, PartitionError::DuplicateGroup(_)));
}

#[test]
fn a_var_left_out_is_named() {
    let vm = map_with(&[("actor.w", &[1]), ("critic.w", &[1]), ("encoder.conv1.weight", &[1])]);
    let p = Partitions::new(&vm).optimised("actor", &["actor."]).unwrap().optimised("critic", &["critic."]).unwrap();
    let err = p.validate().unwrap_err();
    assert!(
        matches!(&err, PartitionError::Unassigned { vars } if vars == &["encoder.conv1.weight".to_string()]),
        "{err}"
    );
    assert!(err.to_string().contains("encoder.conv1.weight"));
}

#[test]
fn an_empty_group_is_an_error() {
    let vm = map_with(&[("actor.w", &[1])]);
    let p = Partitions::new(&vm).optimised("actor", &["actor."]).unwrap().optimised("critic", &["critic."]).unwrap();
    assert!(matches!(p.validate().unwrap_err(), PartitionError::EmptyGroup(g) if g == "critic"));
}

#[test]
fn batch_norm_statistics_are_not_trainable() {
    let vm = map_with(&[
        ("enc.bn.weight", &[3]),
        ("enc.bn.bias", &[3]),
        ("enc.bn.running_mean", &[3]),
        ("enc.bn.running_var", &[3]),
    ]);
    let p = Partitions::new(&vm).optimised("enc", &["enc."]).unwrap();
    p.validate().unwrap();
    let trainable: Vec<String> = p.vars("enc").unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(trainable, ["enc.bn.bias", "enc.bn.weight"]);
    assert_eq!(p.all_vars("enc").unwrap().len(), 4);
}

/// A VarMap of f64 vars holding exactly the given values.
fn map_with_values(vars: &[(&str, &[f64])]) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    for (name, values) in vars {
        vb.get_with_hints(values.len(), name, Init::Const(0.0)).unwrap();
        varmap.data().lock().unwrap()[*name].set(&Tensor::new(*values, &Device::Cpu).unwrap()).unwrap();
    }
    varmap
}

fn values_of(vm: &VarMap, name: &str) -> Vec<f64> {
    vm.data().lock().unwrap()[name].as_tensor().to_vec1::<f64>().unwrap()
}

#[test]
fn polyak_pairs_by_name_not_position() {
    // The online group's prefixes [a., b.] correspond to the target's [y., x.] in that order:
    // a.* ↔ y.* and b.* ↔ x.*. Sorted by name the targets come as x.w, y.bias, y.w while the
    // online vars come as a.bias, a.w, b.w, so pairing the two sorted lists by position would
    // mix every pair (a.bias → x.w, a.w → y.bias, b.w → y.w) — same shapes, so only the values
    // tell. All values are dyadic, so the expected results below are exact.
    let vm = map_with_values(&[
        ("a.bias", &[1.0, 2.0]),
        ("a.w", &[3.0, 4.0]),
        ("b.w", &[5.0, 6.0]),
        ("y.bias", &[10.0, 20.0]),
        ("y.w", &[30.0, 40.0]),
        ("x.w", &[50.0, 60.0]),
    ]);
    let p = Partitions::new(&vm).optimised("net", &["a.", "b."]).unwrap().target("tgt", &["y.", "x."]).unwrap();
    p.validate().unwrap();
    p.polyak("net", "tgt", 0.25).unwrap();
    // target ← 0.75·target + 0.25·online, by name:
    assert_eq!(values_of(&vm, "y.bias"), [0.75 * 10.0 + 0.25 * 1.0, 0.75 * 20.0 + 0.25 * 2.0]); // 7.75, 15.5
    assert_eq!(values_of(&vm, "y.w"), [0.75 * 30.0 + 0.25 * 3.0, 0.75 * 40.0 + 0.25 * 4.0]); // 23.25, 31
    assert_eq!(values_of(&vm, "x.w"), [0.75 * 50.0 + 0.25 * 5.0, 0.75 * 60.0 + 0.25 * 6.0]); // 38.75, 46.5
                                                                                             // Positional pairing would have given x.w = 0.75·[50, 60] + 0.25·a.bias = [37.75, 45.5].
    assert_ne!(values_of(&vm, "x.w"), [37.75, 45.5]);
    // The online group is only read.
    assert_eq!(values_of(&vm, "a.bias"), [1.0, 2.0]);
    assert_eq!(values_of(&vm, "a.w"), [3.0, 4.0]);
    assert_eq!(values_of(&vm, "b.w"), [5.0, 6.0]);
    // τ = 1 is a hard copy, again by name.
    p.polyak("net", "tgt", 1.0).unwrap();
    assert_eq!(values_of(&vm, "y.bias"), [1.0, 2.0]);
    assert_eq!(values_of(&vm, "y.w"), [3.0, 4.0]);
    assert_eq!(values_of(&vm, "x.w"), [5.0, 6.0]);
}

#[test]
fn polyak_shape_mismatch_and_missing_counterpart_are_named() {
    let vm = map_with(&[("net.a", &[2]), ("tgt.a", &[3])]);
    let p = Partitions::new(&vm).optimised("net", &["net."]).unwrap().target("tgt", &["tgt."]).unwrap();
    let err = p.polyak("net", "tgt", 0.5).unwrap_err().to_string();
    assert!(err.contains("shape mismatch") && err.contains("net.a") && err.contains("tgt.a"), "{err}");
    let vm = map_with(&[("net.a", &[2]), ("net.b", &[2]), ("tgt.a", &[2])]);
    let p = Partitions::new(&vm).optimised("net", &["net."]).unwrap().target("tgt", &["tgt."]).unwrap();
    let err = p.polyak("net", "tgt", 0.5).unwrap_err().to_string();
    assert!(err.contains("'net.b' has no counterpart 'tgt.b'"), "{err}");
    let vm = map_with(&[("net.a", &[2]), ("tgt.a", &[2]), ("tgt.z", &[2])]);
    let p = Partitions::new(&vm).optimised("net", &["net."]).unwrap().target("tgt", &["tgt."]).unwrap();
    let err = p.polyak("net", "tgt", 0.5).unwrap_err().to_string();
    assert!(err.contains("'tgt.z' has no online counterpart"), "{err}");
}

fn quadratic_loss(vm: &VarMap, target: &Tensor) -> Tensor {
    let w = vm.data().lock().unwrap()["m.w"].as_tensor().clone();
    ((w - target).unwrap().sqr().unwrap() * 3.0).unwrap().sum_all().unwrap()
}

#[test]
fn adam_matches_candle_adamw_without_weight_decay() {
    use candle_nn::Optimizer;
    let target = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
    let ours_vm = map_with(&[("m.w", &[3])]);
    let theirs_vm = map_with(&[("m.w", &[3])]);
    let p = Partitions::new(&ours_vm).optimised("m", &["m."]).unwrap();
    let mut ours = p.optimizer("m", &OptimizerConfig::adam(0.05)).unwrap();
    let theirs_vars = theirs_vm.all_vars();
    let mut theirs = candle_nn::AdamW::new(
        theirs_vars,
        candle_nn::ParamsAdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() },
    )
    .unwrap();
    for _ in 0..20 {
        ours.step(&quadratic_loss(&ours_vm, &target).backward().unwrap()).unwrap();
        theirs.backward_step(&quadratic_loss(&theirs_vm, &target)).unwrap();
    }
    let a = ours_vm.data().lock().unwrap()["m.w"].as_tensor().to_vec1::<f64>().unwrap();
    let b = theirs_vm.data().lock().unwrap()["m.w"].as_tensor().to_vec1::<f64>().unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-12, "ours {a:?} candle {b:?}");
    }
    assert_eq!(ours.steps_taken(), 20);
}

#[test]
fn optimizer_state_round_trip_continues_exactly() {
    let target = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
    let run = |split: bool| -> Vec<f64> {
        let vm = map_with(&[("m.w", &[3])]);
        let p = Partitions::new(&vm).optimised("m", &["m."]).unwrap();
        let mut opt = p.optimizer("m", &OptimizerConfig::adam(0.05)).unwrap();
        for i in 0..10 {
            if split && i == 5 {
                let (state, step) = opt.state_tensors();
                opt = p.optimizer("m", &OptimizerConfig::adam(0.05)).unwrap();
                opt.load_state(&state, step).unwrap();
            }
            opt.step(&quadratic_loss(&vm, &target).backward().unwrap()).unwrap();
        }
        let w = vm.data().lock().unwrap()["m.w"].as_tensor().to_vec1::<f64>().unwrap();
        w
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn sgd_steps_only_vars_with_gradients() {
    let vm = map_with(&[("m.w", &[3]), ("m.unused", &[3])]);
    let p = Partitions::new(&vm).optimised("m", &["m."]).unwrap();
    let mut opt = p.optimizer("m", &OptimizerConfig::sgd(0.1)).unwrap();
    let target = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let before = vm.data().lock().unwrap()["m.unused"].as_tensor().to_vec1::<f64>().unwrap();
    let w0 = vm.data().lock().unwrap()["m.w"].as_tensor().to_vec1::<f64>().unwrap();
    opt.step(&quadratic_loss(&vm, &target).backward().unwrap()).unwrap();
    let w1 = vm.data().lock().unwrap()["m.w"].as_tensor().to_vec1::<f64>().unwrap();
    // d/dw 3(w−0)² = 6w  →  w − 0.1·6w = 0.4w
    for (a, b) in w0.iter().zip(&w1) {
        assert!((0.4 * a - b).abs() < 1e-12);
    }
    assert_eq!(vm.data().lock().unwrap()["m.unused"].as_tensor().to_vec1::<f64>().unwrap(), before);
    assert!(p.optimizer("nope", &OptimizerConfig::sgd(0.1)).is_err());
}

/// Runs `grads.len()` optimiser steps on one f64 var `m.w` starting at `theta0`, the i-th step
/// with the fixed gradient `grads[i]` (no autograd: the update rule alone is under test).
fn steps_with_fixed_gradients(config: &OptimizerConfig, theta0: &[f64], grads: &[[f64; 3]]) -> Vec<f64> {
    let vm = map_with_values(&[("m.w", theta0)]);
    let p = Partitions::new(&vm).optimised("m", &["m."]).unwrap();
    let mut opt = p.optimizer("m", config).unwrap();
    for g in grads {
        let g = Tensor::new(g, &Device::Cpu).unwrap();
        opt.step_with(|_| Some(g.clone())).unwrap();
    }
    values_of(&vm, "m.w")
}

/// Adam from its definition (Kingma & Ba, Algorithm 1; ε added to √v̂ as PyTorch does), with
/// weight decay either decoupled (AdamW, Loshchilov & Hutter 2019; PyTorch's `AdamW`:
/// θ ← θ − lr·λ·θ − lr·m̂/(√v̂ + ε), both terms on the old θ) or as an L2 term added to the
/// gradient (PyTorch's `Adam(weight_decay=λ)`: g ← g + λθ). Scalar f64, element by element.
fn adam_reference(c: &OptimizerConfig, theta0: &[f64], grads: &[[f64; 3]], decoupled: bool) -> Vec<f64> {
    let mut theta = theta0.to_vec();
    let (mut m, mut v) = (vec![0.0; theta.len()], vec![0.0; theta.len()]);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..theta.len() {
            let gi = if decoupled { g[i] } else { g[i] + c.weight_decay * theta[i] };
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
            let m_hat = m[i] / (1.0 - c.beta1.powi(t));
            let v_hat = v[i] / (1.0 - c.beta2.powi(t));
            let decay = if decoupled { c.lr * c.weight_decay * theta[i] } else { 0.0 };
            theta[i] = theta[i] - decay - c.lr * m_hat / (v_hat.sqrt() + c.eps);
        }
    }
    theta
}

// Two steps; the third element's gradient is zero at both, so only weight decay moves it.
const THETA0: [f64; 3] = [0.5, -1.5, 2.0];
const GRADS: [[f64; 3]; 2] = [[0.3, -0.2, 0.0], [-0.1, 0.4, 0.0]];

#[test]
fn adam_weight_decay_is_decoupled_as_documented() {
    // OptimizerKind::Adam's doc: "AdamW with decoupled weight decay when weight_decay > 0".
    let config = OptimizerConfig { weight_decay: 0.05, ..OptimizerConfig::adam(0.1) };
    let ours = steps_with_fixed_gradients(&config, &THETA0, &GRADS);
    let adamw = adam_reference(&config, &THETA0, &GRADS, true);
    // Same formula in f64, different operation order: agreement to an ulp (measured max |diff|
    // 5.6e-17); the L2 variant below is off by up to 0.18, the no-decay one by 0.02.
    for (a, b) in ours.iter().zip(&adamw) {
        assert!((a - b).abs() < 1e-14, "ours {ours:?} AdamW {adamw:?}");
    }
    // The zero-gradient element decays by exactly (1 − lr·λ) per step: 2·0.995².
    assert!((ours[2] - 2.0 * 0.995f64.powi(2)).abs() < 1e-15, "{}", ours[2]);
    // The test can tell: L2-style decay and no decay give different numbers.
    let l2 = adam_reference(&config, &THETA0, &GRADS, false);
    let none = adam_reference(&OptimizerConfig { weight_decay: 0.0, ..config.clone() }, &THETA0, &GRADS, true);
    for other in [&l2, &none] {
        let gap = ours.iter().zip(other.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(gap > 1e-4, "weight decay variants should differ: ours {ours:?} other {other:?}");
    }
}

#[test]
fn sgd_weight_decay_shrinks_theta_by_lr_lambda() {
    // Plain SGD with weight decay λ (PyTorch's SGD without momentum: g ← g + λθ, θ ← θ − lr·g;
    // for SGD the decoupled and L2 forms are the same update).
    let config = OptimizerConfig { weight_decay: 0.05, ..OptimizerConfig::sgd(0.1) };
    let ours = steps_with_fixed_gradients(&config, &THETA0, &GRADS);
    let mut theta = THETA0.to_vec();
    for g in &GRADS {
        for i in 0..3 {
            theta[i] -= config.lr * (g[i] + config.weight_decay * theta[i]);
        }
    }
    // Operation order only (measured max |diff| 5.6e-17).
    for (a, b) in ours.iter().zip(&theta) {
        assert!((a - b).abs() < 1e-14, "ours {ours:?} reference {theta:?}");
    }
    assert!((ours[2] - 2.0 * 0.995f64.powi(2)).abs() < 1e-15, "{}", ours[2]);
    let without = steps_with_fixed_gradients(&OptimizerConfig::sgd(0.1), &THETA0, &GRADS);
    assert!((without[2] - 2.0).abs() < 1e-15 && (ours[0] - without[0]).abs() > 1e-3);
}

/// The in-place Adam and Polyak kernels (`shared::ops::adam_step_inplace`, `polyak_inplace`)
/// give the tensor-op path's numbers bit for bit, in f32 and f64, with and without weight decay,
/// over steps whose bias corrections differ.
#[test]
fn fused_adam_and_polyak_equal_the_tensor_path_bit_for_bit() {
    use candle_core::{DType, Device};
    for dtype in [DType::F32, DType::F64] {
        for weight_decay in [0.0, 0.01] {
            let run = |fused: bool| {
                let vm = VarMap::new();
                let mut rng = crate::rng::SplitMix64::new(5);
                let init = rng.normal_tensor((7, 13), dtype, &Device::Cpu).unwrap();
                let w = vm.get((7, 13), "m.w", candle_nn::Init::Const(0.0), dtype, &Device::Cpu).unwrap();
                vm.data().lock().unwrap()["m.w"].set(&init).unwrap();
                // The in-place kernels apply to this var: the flag chooses the path.
                assert!(crate::ops::inplace_applicable(&[&w, &init]));
                let p = Partitions::new(&vm).optimised("m", &["m."]).unwrap();
                let config = OptimizerConfig { weight_decay, ..OptimizerConfig::adam(0.01) };
                let mut opt = p.optimizer("m", &config).unwrap();
                opt.fused = fused;
                for _ in 0..5 {
                    // Gradients with signs, zeros and a spread of magnitudes.
                    let g = (rng.normal_tensor((7, 13), dtype, &Device::Cpu).unwrap() * 3.0).unwrap();
                    let g = g.relu().unwrap().sub(&(g.neg().unwrap().relu().unwrap() * 1e-3).unwrap()).unwrap();
                    opt.step_with(|_| Some(g.clone())).unwrap();
                }
                let target = rng.normal_tensor((7, 13), dtype, &Device::Cpu).unwrap();
                let online = w.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                (online, target, w)
            };
            let (fused, _, _) = run(true);
            let (reference, target, w) = run(false);
            assert_eq!(
                fused.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "Adam {dtype:?} weight decay {weight_decay}"
            );
            // Polyak: in place against the tensor formula.
            let expected = ((target.clone() * (1.0 - 0.005)).unwrap() + (w.clone() * 0.005).unwrap()).unwrap();
            let mixed = target.copy().unwrap();
            crate::ops::polyak_inplace(&mixed, &w, 0.005).unwrap();
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&mixed), bits(&expected), "Polyak {dtype:?}");
        }
    }
}
