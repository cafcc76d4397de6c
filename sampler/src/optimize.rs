//! The z0 (and step-noise) optimisation loop, and the finite-difference check of its gradient.

use std::time::Instant;

use candle_core::{DType, Result, Tensor, Var};
use shared::gradcheck::{check_gradients, GradCheckOptions, GradCheckReport};
use shared::params::{GroupOptimizer, OptimizerConfig};

use crate::noise::NoiseState;
use crate::objective::Objective;
use crate::trajectory::{GradMode, Trajectory};

/// Maximise (ascent) or minimise (descent) the objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ascent,
    Descent,
}

impl Direction {
    pub const ALLOWED: &'static [&'static str] = &["ascent", "descent"];

    /// The factor that turns the objective into the quantity minimised.
    pub fn sign(self) -> f64 {
        match self {
            Self::Ascent => -1.0,
            Self::Descent => 1.0,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct OptimizeSettings {
    pub iterations: usize,
    pub optimizer: OptimizerConfig,
    pub direction: Direction,
    /// Clip the global gradient norm (over all learned tensors) to this; `None`: no clipping.
    pub grad_clip: Option<f64>,
    /// λ of the χ-norm regulariser λ(½‖z‖² − (d−1)·ln‖z‖) applied to every learned noise tensor
    /// (ReNO); 0 disables it.
    pub chi_reg: f64,
    pub grad_mode: GradMode,
    /// Where the learned tensors may go (projections after every update).
    #[serde(default)]
    pub constraint: NoiseConstraint,
}

/// Keeps learned noise where the model's training distribution is, by projecting every learned
/// tensor after each update:
/// * `trust_region` r: onto the ball ‖v − v₀‖ ≤ r·√d around its initial value v₀ (r is the RMS
///   displacement per element);
/// * `renormalise`: back to its initial norm ‖v₀‖ (DOODL): a standard normal's norm
///   concentrates at √d, so this keeps v in the Gaussian typical set whatever direction it
///   moves in.
///
/// The trust region is applied first, the renormalisation last (so the norm is exact; the
/// distance may then exceed r·√d slightly — by at most the norm change the region allowed).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseConstraint {
    pub renormalise: bool,
    pub trust_region: Option<f64>,
}

impl NoiseConstraint {
    pub fn is_none(&self) -> bool {
        !self.renormalise && self.trust_region.is_none()
    }

    /// `v` projected for its initial value `v0` (both the same shape).
    pub fn project(&self, v: &Tensor, v0: &Tensor) -> Result<Tensor> {
        let norm =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
        let mut v = v.clone();
        if let Some(r) = self.trust_region {
            let delta = (&v - v0)?;
            let (dist, bound) = (norm(&delta)?, r * (v.elem_count() as f64).sqrt());
            if dist > bound {
                v = (v0 + (delta * (bound / dist))?)?;
            }
        }
        if self.renormalise {
            let (now, initial) = (norm(&v)?, norm(v0)?);
            if now > 0.0 {
                v = (v * (initial / now))?;
            }
        }
        Ok(v)
    }

    /// One line for logs and reports.
    pub fn describe(&self) -> String {
        match (self.renormalise, self.trust_region) {
            (false, None) => "none".into(),
            (true, None) => "renormalise to the initial norm".into(),
            (false, Some(r)) => format!("trust region ‖z − z_init‖ ≤ {r}·√d"),
            (true, Some(r)) => format!("trust region ‖z − z_init‖ ≤ {r}·√d, then renormalise"),
        }
    }
}

/// |∇| statistics of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradStats {
    pub mean_abs: f64,
    pub max_abs: f64,
    pub norm: f64,
}

impl GradStats {
    pub fn of(g: &Tensor) -> Result<Self> {
        let g = g.to_dtype(DType::F64)?;
        let abs = g.abs()?;
        Ok(Self {
            mean_abs: abs.mean_all()?.to_scalar()?,
            max_abs: abs.max_all()?.to_scalar()?,
            norm: g.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt(),
        })
    }

    /// Finite and non-zero: the gradient actually reached the tensor.
    pub fn reached(&self) -> bool {
        self.norm.is_finite() && self.norm > 0.0
    }
}

/// One iteration's measured figures (at the parameters before its update).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IterationRecord {
    pub iteration: usize,
    pub loss: f64,
    /// χ-norm regulariser value (0 when off).
    pub regulariser: f64,
    /// direction·loss + regulariser: what the optimiser minimises.
    pub minimised: f64,
    /// ∂loss/∂z0 (raw objective gradient, before direction, regulariser and clipping).
    pub grad_z0: GradStats,
    /// Norm of ∂loss/∂ξ over all learned step noises, if any.
    pub grad_step_noise_norm: Option<f64>,
    /// Norm of the update's gradient (direction + regulariser) before clipping.
    pub grad_norm_total: f64,
    pub clipped: bool,
    pub seconds: f64,
}

pub struct OptimizeOutcome {
    pub records: Vec<IterationRecord>,
    pub initial_output: Tensor,
    pub final_output: Tensor,
    pub initial_loss: f64,
    pub final_loss: f64,
}

/// χ_d negative log-likelihood (up to a constant) of a d-dimensional standard normal's norm,
/// ½‖z‖² − (d−1)·ln‖z‖, and its gradient z − (d−1)·z/‖z‖².
pub fn chi_regulariser(z: &Tensor) -> Result<(f64, Tensor)> {
    let d = z.elem_count() as f64;
    let sq: f64 = z.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar()?;
    let value = 0.5 * sq - (d - 1.0) * 0.5 * sq.ln();
    let grad = (z * (1.0 - (d - 1.0) / sq))?;
    Ok((value, grad))
}

/// The learned tensors' current values and their gradients of `loss` (missing = zeros). In
/// `sde-from-z0` only z0 is learned and `grad_z0` already holds the paths through every ξ_i.
fn learned_gradients(noise: &NoiseState, vg: &crate::trajectory::ValueAndGrad) -> Vec<(Var, Tensor)> {
    let mut out = Vec::new();
    if let Some(v) = noise.z0.var() {
        out.push((v.clone(), vg.grad_z0.clone()));
    }
    for (s, g) in noise.steps.iter().zip(&vg.grad_steps) {
        if let (Some(v), Some(g)) = (s.as_ref().and_then(|s| s.var()), g) {
            out.push((v.clone(), g.clone()));
        }
    }
    out
}

/// Bytes the history of `iterations` updates holds (one [`IterationRecord`] each, kept for the
/// report): what makes an absurd iteration count impossible before it is slow.
pub fn history_bytes(iterations: usize) -> u128 {
    (iterations as u128).saturating_mul(std::mem::size_of::<IterationRecord>() as u128)
}

/// Runs `settings.iterations` updates of the learnable tensors in `noise`, calling `on_iter`
/// after each. The final loss is measured at the final parameters.
pub fn optimize(
    traj: &Trajectory,
    noise: &NoiseState,
    objective: &dyn Objective,
    settings: &OptimizeSettings,
    mut on_iter: impl FnMut(&IterationRecord),
) -> anyhow::Result<OptimizeOutcome> {
    let learnable = noise.learnable();
    anyhow::ensure!(!learnable.is_empty(), "nothing to optimise: z0 is fixed and no step noise is learnable");
    let mut opt = GroupOptimizer::new("noise", learnable.clone(), settings.optimizer.clone())?;
    let sign = settings.direction.sign();
    shared::checks::ensure_fits(
        &candle_core::Device::Cpu,
        history_bytes(settings.iterations),
        &format!("{} optimisation iterations (a record each)", settings.iterations),
    )?;
    let mut records = Vec::with_capacity(settings.iterations);
    let mut initial = None;
    // The learned tensors' initial values, for the constraint's projections.
    let starts: Vec<(Var, Tensor)> = if settings.constraint.is_none() {
        Vec::new()
    } else {
        // Copies: `Var::set` writes the storage a detached view would share.
        learnable.iter().map(|(_, v)| Ok((v.clone(), v.as_tensor().copy()?))).collect::<Result<Vec<_>>>()?
    };
    for iteration in 0..settings.iterations {
        let started = Instant::now();
        let vg = traj.value_and_grad_state(noise, objective, settings.grad_mode)?;
        if initial.is_none() {
            initial = Some((vg.output.clone(), vg.loss));
        }
        let grad_z0 = GradStats::of(&vg.grad_z0)?;
        let step_sq: Vec<f64> =
            vg.grad_steps.iter().flatten().map(|g| GradStats::of(g).map(|s| s.norm * s.norm)).collect::<Result<_>>()?;
        let grad_step_noise_norm = (!step_sq.is_empty()).then(|| step_sq.iter().sum::<f64>().sqrt());

        // The gradient of direction·loss + λ·χ-regulariser for every learned tensor.
        let mut regulariser = 0.0;
        let mut total: Vec<(Var, Tensor)> = Vec::new();
        for (var, g) in learned_gradients(noise, &vg) {
            let mut g = (g * sign)?;
            if settings.chi_reg > 0.0 {
                let (r, rg) = chi_regulariser(var.as_tensor())?;
                regulariser += settings.chi_reg * r;
                g = (g + (rg * settings.chi_reg)?)?;
            }
            total.push((var, g));
        }
        let sq: f64 = total.iter().map(|(_, g)| GradStats::of(g).map(|s| s.norm * s.norm)).sum::<Result<f64>>()?;
        let grad_norm_total = sq.sqrt();
        anyhow::ensure!(
            grad_norm_total.is_finite(),
            "iteration {iteration}: gradient is not finite (norm {grad_norm_total})"
        );
        let clipped = matches!(settings.grad_clip, Some(c) if grad_norm_total > c);
        let factor = match settings.grad_clip {
            Some(c) if grad_norm_total > c => c / grad_norm_total,
            _ => 1.0,
        };
        let scaled: Vec<(candle_core::TensorId, Tensor)> =
            total.iter().map(|(var, g)| Ok((var.as_tensor().id(), (g * factor)?))).collect::<Result<_>>()?;
        opt.step_with(|var| scaled.iter().find(|(id, _)| *id == var.as_tensor().id()).map(|(_, g)| g.clone()))?;
        for (var, start) in &starts {
            // A copy: the projection may be the variable's own storage (inside the bounds).
            var.set(&settings.constraint.project(var.as_tensor(), start)?.copy()?)?;
        }
        let record = IterationRecord {
            iteration,
            loss: vg.loss,
            regulariser,
            minimised: sign * vg.loss + regulariser,
            grad_z0,
            grad_step_noise_norm,
            grad_norm_total,
            clipped,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_iter(&record);
        records.push(record);
    }
    let final_output = traj.sample_state(noise)?;
    let final_loss = shared::gradcheck::scalar_f64(&objective.loss(&final_output)?)?;
    let (initial_output, initial_loss) = match initial {
        Some(i) => i,
        None => (final_output.clone(), final_loss),
    };
    Ok(OptimizeOutcome { records, initial_output, final_output, initial_loss, final_loss })
}

/// Finite-difference check of the gradient that `mode` computes (the recomputation backward
/// by default), along random directions of each learnable tensor on its own (by name: `z0`,
/// `xi.003`, …) and of all together, via [`shared::gradcheck::check_gradients`]. The function
/// handed to it has the loss's value and `mode`'s gradient: loss + Σ⟨v − stopgrad(v), g(v)⟩.
/// In `sde-from-z0` moving z0 moves every ξ_i = Q_i z0 with it, so the check covers the paths
/// through the step noises.
pub fn verify_gradient(
    traj: &Trajectory,
    noise: &NoiseState,
    objective: &dyn Objective,
    mode: GradMode,
    opts: &GradCheckOptions,
) -> Result<GradCheckReport> {
    let vars = noise.learnable();
    let f = || -> Result<Tensor> {
        let vg = traj.value_and_grad_state(noise, objective, mode)?;
        let z0 = noise.z0.tensor();
        let mut out = Tensor::new(vg.loss, z0.device())?.to_dtype(z0.dtype())?;
        for (var, g) in learned_gradients(noise, &vg) {
            let t = var.as_tensor();
            out = (out + ((t - t.detach())? * g)?.sum_all()?)?;
        }
        Ok(out)
    };
    check_gradients(&vars, f, opts)
}

/// The finite-difference step that suits a dtype.
pub fn gradcheck_eps(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-6,
        _ => 1e-2,
    }
}

#[cfg(test)]
mod constraint_tests {
    use super::*;
    use candle_core::Device;

    fn norm(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f64>()).map(f64::sqrt).unwrap_or(f64::NAN)
    }

    /// The projections against their definitions, computed here by hand on explicit vectors.
    #[test]
    fn projections_are_the_trust_ball_and_the_initial_norm() -> Result<()> {
        let dev = Device::Cpu;
        let v0 = Tensor::new(&[1.0f64, 0.0, 0.0, 0.0], &dev)?;
        let far = Tensor::new(&[1.0f64, 2.0, 0.0, 0.0], &dev)?; // ‖v − v0‖ = 2
                                                                // Trust region r = 0.5: radius 0.5·√4 = 1 → v0 + (0, 1, 0, 0).
        let t = NoiseConstraint { renormalise: false, trust_region: Some(0.5) };
        assert_eq!(t.project(&far, &v0)?.to_vec1::<f64>()?, vec![1.0, 1.0, 0.0, 0.0]);
        let near = Tensor::new(&[1.0f64, 0.5, 0.0, 0.0], &dev)?;
        assert_eq!(t.project(&near, &v0)?.to_vec1::<f64>()?, near.to_vec1::<f64>()?);
        // Renormalise: (1, 2, 0, 0) to norm 1 → (1, 2)/√5.
        let r = NoiseConstraint { renormalise: true, trust_region: None };
        let p = r.project(&far, &v0)?.to_vec1::<f64>()?;
        let s5 = 5f64.sqrt();
        assert!((p[0] - 1.0 / s5).abs() < 1e-15 && (p[1] - 2.0 / s5).abs() < 1e-15, "{p:?}");
        // Both: the ball first, (1, 1)/√2 after.
        let both = NoiseConstraint { renormalise: true, trust_region: Some(0.5) };
        let p = both.project(&far, &v0)?;
        assert!((norm(&p) - 1.0).abs() < 1e-15);
        assert!((p.to_vec1::<f64>()?[1] - 0.5f64.sqrt()).abs() < 1e-15);
        assert!(NoiseConstraint::default().is_none());
        Ok(())
    }
}
