//! The checker itself: it must catch what a joint check misses, name what it catches, and leave
//! the variables as it found them.

use super::*;
use candle_core::{Device, D};

const TOL: f64 = 1e-4;

fn normal(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    (SplitMix64::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap() * scale).unwrap()
}

/// A first layer on raw pixel values (0..255) — the case where a bias's gradient is tiny next to
/// its weight's, since ∂L/∂W = ∂L/∂y ⊗ x grows with the input scale and ∂L/∂b does not.
struct PixelLayer {
    x: Tensor,
    readout: Tensor,
    w: Var,
    b: Var,
}

const BATCH: usize = 10;
const IN: usize = 768; // a 16 × 16 RGB image, flattened
const OUT: usize = 64;

impl PixelLayer {
    fn new() -> Self {
        let x = SplitMix64::new(1).uniform_tensor((BATCH, IN), 0.0, 255.0, DType::F64, &Device::Cpu).unwrap();
        // Initialised for its input's scale, so tanh is not saturated.
        let w = Var::from_tensor(&normal(&[OUT, IN], 2, 1.0 / (150.0 * (IN as f64).sqrt()))).unwrap();
        let b = Var::from_tensor(&normal(&[OUT], 3, 0.5)).unwrap();
        Self { x, readout: normal(&[BATCH, OUT], 4, 1.0), w, b }
    }

    fn pre_activation(&self) -> candle_core::Result<Tensor> {
        self.x.matmul(&self.w.as_tensor().t()?)?.broadcast_add(self.b.as_tensor())
    }

    /// Σ r ⊙ tanh(x Wᵀ + b), with the exact gradient.
    fn loss(&self) -> candle_core::Result<Tensor> {
        (self.pre_activation()?.tanh()? * &self.readout)?.sum_all()
    }

    /// The same value, but the bias's gradient sums ∂L/∂y over the first BATCH − 1 rows only
    /// (an off-by-one in a reduction): loss + ⟨b − stopgrad(b), −stopgrad(∂L/∂y of the last row)⟩.
    fn loss_with_wrong_bias_gradient(&self) -> candle_core::Result<Tensor> {
        let y = self.pre_activation()?;
        let t = y.tanh()?;
        let dl_dy = ((t.sqr()?.neg()? + 1.0)? * &self.readout)?.detach();
        let last_row = dl_dy.narrow(0, BATCH - 1, 1)?.squeeze(0)?;
        let b = self.b.as_tensor();
        let wrong = ((b - b.detach())? * last_row.neg()?)?.sum_all()?;
        (t * &self.readout)?.sum_all()? + wrong
    }

    fn vars(&self) -> [(&'static str, Var); 2] {
        [("layer.weight", self.w.clone()), ("layer.bias", self.b.clone())]
    }
}

fn opts() -> GradCheckOptions {
    GradCheckOptions { eps: 1e-7, directions: 3, seed: 7, floor: 1e-12 }
}

#[test]
fn a_correct_gradient_passes_per_variable_and_jointly() {
    let layer = PixelLayer::new();
    let report = check_gradients(&layer.vars(), || layer.loss(), &opts()).unwrap();
    assert!(report.vars_without_grad().is_empty());
    assert_eq!(report.per_var.len(), 2);
    assert_eq!(report.per_var[0].name, "layer.weight");
    assert_eq!(report.per_var[1].elements, OUT);
    assert!(report.per_var.iter().all(|v| v.checks.len() == 3) && report.joint.len() == 3);
    report.assert_nondegenerate(1e-6, "pixel layer").unwrap();
    report.assert_close(1e-5, "pixel layer").unwrap();
}

#[test]
fn a_wrong_bias_gradient_hides_from_the_joint_check_only() {
    let layer = PixelLayer::new();
    let report = check_gradients(&layer.vars(), || layer.loss_with_wrong_bias_gradient(), &opts()).unwrap();
    eprintln!("{}", report.table());
    // Joint: the bias moves the value ~4000× less than the weight does (√768 inputs of rms ~150),
    // so its error is a few 1e-5 of the total — under the tolerance.
    let joint = report.joint_max_rel_error();
    assert!(joint < TOL, "the joint check was meant to miss this error, but saw {joint:.3e}");
    // Per variable: the weight is right, the bias is off by one row's share (tens of per cent).
    let weight = report.per_var[0].max_rel_error();
    let bias = report.per_var[1].max_rel_error();
    assert!(weight < 1e-5, "weight's gradient is exact, got {weight:.3e}");
    assert!(bias > 1e-2, "the bias's own check must see its error, got {bias:.3e}");
    assert_eq!(report.worst_var().map(|(n, _)| n), Some("layer.bias"));
    let err = report.assert_close(TOL, "pixel layer").unwrap_err().to_string();
    assert!(err.contains("layer.bias"), "the failure must name the variable: {err}");
}

#[test]
fn a_dropped_gradient_is_named_and_fails() {
    // Candle's fused softmax drops the gradient of its input with no error.
    let x = Var::from_tensor(&normal(&[3, 5], 11, 1.0)).unwrap();
    let y = Var::from_tensor(&normal(&[3, 5], 12, 1.0)).unwrap();
    let r = normal(&[3, 5], 13, 1.0);
    let f = || {
        let fused = candle_nn::ops::softmax_last_dim(y.as_tensor())?;
        ((x.as_tensor().tanh()? + fused)? * &r)?.sum_all()
    };
    let report = check_gradients(&[("x", x.clone()), ("y", y.clone())], f, &opts()).unwrap();
    assert_eq!(report.vars_without_grad(), vec!["y"]);
    assert!(report.per_var[0].max_rel_error() < 1e-6);
    assert!((report.per_var[1].max_rel_error() - 1.0).abs() < 1e-9, "no analytic gradient: relative error 1");
    let err = report.assert_close(TOL, "fused softmax").unwrap_err().to_string();
    assert!(err.contains("y (no gradient)"), "{err}");
    // The differentiable softmax passes.
    let g = || {
        let soft = crate::ops::softmax(y.as_tensor(), D::Minus1)?;
        ((x.as_tensor().tanh()? + soft)? * &r)?.sum_all()
    };
    check_gradients(&[("x", x.clone()), ("y", y.clone())], g, &opts()).unwrap().assert_close(1e-6, "softmax").unwrap();
}

#[test]
fn a_variable_the_value_does_not_depend_on_is_not_an_error_but_is_degenerate() {
    let x = Var::from_tensor(&normal(&[4], 21, 1.0)).unwrap();
    let unused = Var::from_tensor(&normal(&[2], 22, 1.0)).unwrap();
    let f = || x.as_tensor().sqr()?.sum_all();
    let report = check_gradients(&[("x", x.clone()), ("unused", unused)], f, &opts()).unwrap();
    assert_eq!(report.vars_without_grad(), vec!["unused"]);
    report.assert_close(1e-8, "unused var").unwrap();
    let err = report.assert_nondegenerate(1e-6, "unused var").unwrap_err().to_string();
    assert!(err.contains("'unused'"), "{err}");
}

#[test]
fn variables_are_restored_and_directions_are_seeded() {
    let layer = PixelLayer::new();
    let (w0, b0) = (layer.w.as_tensor().copy().unwrap(), layer.b.as_tensor().copy().unwrap());
    let a = check_gradients(&layer.vars(), || layer.loss(), &opts()).unwrap();
    let same = |x: &Tensor, y: &Tensor| {
        (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() == 0.0
    };
    assert!(same(layer.w.as_tensor(), &w0) && same(layer.b.as_tensor(), &b0));
    let b = check_gradients(&layer.vars(), || layer.loss(), &opts()).unwrap();
    let analytic = |r: &GradCheckReport| r.joint.iter().map(|c| c.analytic).collect::<Vec<_>>();
    assert_eq!(analytic(&a), analytic(&b));
    let other = check_gradients(&layer.vars(), || layer.loss(), &GradCheckOptions { seed: 8, ..opts() }).unwrap();
    assert_ne!(analytic(&a), analytic(&other));
}
