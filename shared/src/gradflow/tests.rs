use super::*;
use crate::ops;
use crate::params::Partitions;
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

/// Two partitions, `left.` and `right.`, each a linear layer followed by a softmax; `left`'s
/// softmax is Candle's fused one, `right`'s ours.
fn toy(fused_left: bool) -> (VarMap, Partitions, Tensor) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let left = candle_nn::linear(4, 3, vb.pp("left")).unwrap();
    let right = candle_nn::linear(4, 3, vb.pp("right")).unwrap();
    let x = SplitMix64::new(1).normal_tensor((5, 4), DType::F64, &Device::Cpu).unwrap();
    let w = SplitMix64::new(2).normal_tensor((5, 3), DType::F64, &Device::Cpu).unwrap();
    let lh = left.forward(&x).unwrap();
    let lo =
        if fused_left { candle_nn::ops::softmax_last_dim(&lh).unwrap() } else { ops::softmax(&lh, D::Minus1).unwrap() };
    let ro = ops::softmax(&right.forward(&x).unwrap(), D::Minus1).unwrap();
    let loss = ((lo + ro).unwrap() * w).unwrap().sum_all().unwrap();
    let parts =
        Partitions::new(&varmap).optimised("left", &["left."]).unwrap().optimised("right", &["right."]).unwrap();
    parts.validate().unwrap();
    (varmap, parts, loss)
}

#[test]
fn audit_reports_exactly_the_partition_behind_a_fused_op() {
    let (_vm, parts, loss) = toy(true);
    let grads = loss.backward().unwrap();
    let report = audit(&grads, &parts, &Expectation::new("toy").reaches(&["left", "right"])).unwrap();
    let left = report.groups.iter().find(|g| g.group == "left").unwrap();
    let right = report.groups.iter().find(|g| g.group == "right").unwrap();
    assert_eq!((left.vars, left.vars_with_grad), (2, 0));
    assert_eq!((right.vars, right.vars_with_grad), (2, 2));
    assert!(right.l2 > 0.0);
    assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
    assert!(report.violations.iter().all(|v| v.starts_with("left: ") && v.contains("got no gradient")));
    let err = report.strict().unwrap_err().to_string();
    assert!(err.contains("left.weight") && err.contains("left.bias") && !err.contains("right: "), "{err}");
    print!("{}", report.table());
}

#[test]
fn audit_passes_when_every_path_is_differentiable() {
    let (_vm, parts, loss) = toy(false);
    let grads = loss.backward().unwrap();
    let report = audit(&grads, &parts, &Expectation::new("toy").reaches(&["left", "right"])).unwrap();
    report.strict().unwrap();
    assert!(report.table().contains("audit: OK"));
    let json = report.to_json();
    assert_eq!(json["groups"][0]["vars_with_grad"], 2);
}

#[test]
fn audit_flags_gradient_into_a_frozen_group_and_non_finite() {
    let (_vm, parts, loss) = toy(false);
    let grads = loss.backward().unwrap();
    let report = audit(&grads, &parts, &Expectation::new("toy").reaches(&["right"]).not(&["left"])).unwrap();
    assert_eq!(report.violations.len(), 2);
    assert!(report.violations.iter().all(|v| v.contains("must not receive gradient")));

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let w = vb.get_with_hints(3, "p.w", candle_nn::Init::Const(0.0)).unwrap();
    let loss = (w.sqrt().unwrap() * -1.0).unwrap().sum_all().unwrap(); // zero-initialised: d√w/dw = ∞
    let parts = Partitions::new(&varmap).optimised("p", &["p."]).unwrap();
    let report = audit(&loss.backward().unwrap(), &parts, &Expectation::new("sqrt").reaches(&["p"])).unwrap();
    assert!(report.violations.iter().any(|v| v.contains("NaN/Inf")), "{:?}", report.violations);
    assert!(audit(&loss.backward().unwrap(), &parts, &Expectation::new("x").reaches(&["nope"])).is_err());
}
