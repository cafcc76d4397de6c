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

#[test]
fn polyak_pairs_by_name_not_position() {
    // Names whose sorted order differs between online and target, to catch positional pairing.
    let vm = map_with(&[("net.a", &[2]), ("net.b", &[2]), ("tgt.a", &[2]), ("tgt.b", &[2])]);
    let p = Partitions::new(&vm).optimised("net", &["net."]).unwrap().target("tgt", &["tgt."]).unwrap();
    let get = |n: &str| vm.data().lock().unwrap()[n].as_tensor().to_vec1::<f64>().unwrap();
    let (na, nb, ta, tb) = (get("net.a")[0], get("net.b")[0], get("tgt.a")[0], get("tgt.b")[0]);
    p.polyak("net", "tgt", 0.25).unwrap();
    assert!((get("tgt.a")[0] - (0.75 * ta + 0.25 * na)).abs() < 1e-15);
    assert!((get("tgt.b")[0] - (0.75 * tb + 0.25 * nb)).abs() < 1e-15);
    assert_eq!(get("net.a")[0], na);
    p.polyak("net", "tgt", 1.0).unwrap();
    assert_eq!(get("tgt.b")[0], nb);
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
