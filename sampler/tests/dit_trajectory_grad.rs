//! Finite-difference checks of ∇z0 through whole denoising trajectories whose denoiser is the
//! Cosmos DiT (the tiny random-weight parity fixture, in f64), for every solver.
//!
//! The DiT is wrapped exactly as a world model uses it: a raw `Network` (per-frame timesteps,
//! condition-mask channel, context tokens) → `Preconditioned` (EDM or rectified flow) →
//! `FrameReplace` (first frame is the clean condition). The gradient under test is the
//! default per-step recomputation backward, compared with central differences of the loss.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel, MemoryMode};
use sampler::denoiser::{Conditioning, FrameReplace, Network, Preconditioned};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::TargetMse;
use sampler::optimize::verify_gradient;
use sampler::param::Parameterization;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::device::test_device;
use shared::gradcheck::GradCheckOptions;
use shared::rng::SplitMix64;

const GRAD_TOL: f64 = 1e-4;
/// (B, C, T, H, W) of the latent: 4 channels + the condition-mask channel = the fixture's 5.
const SHAPE: [usize; 5] = [1, 4, 3, 8, 8];

/// The fixture DiT as a raw network: the timestep is `c_noise` per frame, the condition mask
/// comes from the conditioning, the padding mask is all zeros.
struct DitNetwork {
    model: CosmosTransformer3DModel,
}

impl Network for DitNetwork {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let (b, _c, t, h, w) = x_in.dims5()?;
        let mask = match &cond.mask {
            Some(m) => m.broadcast_as((b, 1, t, h, w))?.contiguous()?,
            None => Tensor::zeros((b, 1, t, h, w), x_in.dtype(), x_in.device())?,
        };
        let context = cond.context.as_ref().ok_or_else(|| candle_core::Error::Msg("no context".into()))?;
        let padding = Tensor::zeros((1, 1, h, w), x_in.dtype(), x_in.device())?;
        self.model.forward(x_in, c_noise, context, Some(&mask), Some(&padding))
    }

    fn describe(&self) -> String {
        "tiny Cosmos DiT (parity fixture)".into()
    }
}

fn fixture_dit() -> Result<CosmosTransformer3DModel> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cfg = Config::from_json_file(&dir.join("cosmos_tiny_config.json"))?;
    let path = dir.join("cosmos_tiny.safetensors");
    let tensors = shared::weights::read_safetensors(&path, &test_device())
        .with_context(|| format!("loading fixture {}", path.display()))?;
    let weights = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("case_"))
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F64)?)))
        .collect::<Result<_>>()?;
    Ok(CosmosTransformer3DModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F64, &test_device()))?)
}

/// Runs the directional check of ∇z0 (and of the learned step noises, in `sde-learnable`) and
/// returns the largest relative error.
fn check(solver: SolverKind, param: Parameterization, schedule: Schedule, mode: NoiseMode, seed: u64) -> Result<f64> {
    check_with(solver, param, schedule, mode, seed, MemoryMode::default())
}

/// The problem [`check`] sets up: the wrapped DiT (in `memory` mode), conditioning, objective,
/// noise state.
struct Problem {
    denoiser: FrameReplace<Preconditioned<DitNetwork>>,
    cond: Conditioning,
    objective: TargetMse,
    noise: NoiseState,
    plan: sampler::noise::ChurnPlan,
}

fn problem(
    param: Parameterization,
    schedule: &Schedule,
    mode: NoiseMode,
    seed: u64,
    memory: MemoryMode,
) -> Result<Problem> {
    let dev = test_device();
    let mut model = fixture_dit()?;
    model.set_memory_mode(memory)?;
    let denoiser = FrameReplace { inner: Preconditioned { net: DitNetwork { model }, param }, condition_sigma: None };
    let mut rng = SplitMix64::new(seed);
    let frames = (rng.normal_tensor(&SHAPE[..], DType::F64, &dev)? * 0.5)?;
    let context = rng.normal_tensor((1, 2, 16), DType::F64, &dev)?;
    let cond = Conditioning { context: Some(context), ..Conditioning::frame_replace(&frames, 1)? };
    let target = (rng.normal_tensor(&SHAPE[..], DType::F64, &dev)? * 0.5)?;
    let objective = TargetMse { target, label: "random target".into() };
    let churn = Churn { s_churn: 0.4, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 };
    let plan = churn.plan(&schedule.sigmas, mode.injects());
    let noise = NoiseState::draw(seed ^ 0xA5, &SHAPE, &plan, mode, true, DType::F64, &dev)?;
    Ok(Problem { denoiser, cond, objective, noise, plan })
}

fn check_with(
    solver: SolverKind,
    param: Parameterization,
    schedule: Schedule,
    mode: NoiseMode,
    seed: u64,
    memory: MemoryMode,
) -> Result<f64> {
    let Problem { denoiser, cond, objective, noise, plan } = problem(param, &schedule, mode, seed, memory)?;
    let solver = solver.build();
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let opts = GradCheckOptions { eps: 1e-6, directions: 3, seed, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{} {:?} {:?} {:?}:\n{}", solver.name(), param, mode, memory, report.table());
    anyhow::ensure!(report.vars_without_grad().is_empty(), "no gradient reached {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-8, "∇ through the DiT trajectory")?;
    report.assert_close(GRAD_TOL, &format!("∇z0 through the DiT, {} solver", solver.name()))?;
    Ok(report.max_rel_error())
}

fn karras() -> Result<Schedule> {
    Ok(Schedule::karras(3, 0.002, 80.0, 7.0)?)
}

#[test]
fn euler_gradient_through_dit_matches_finite_differences() -> Result<()> {
    let err = check(SolverKind::Euler, Parameterization::Edm { sigma_data: 0.5 }, karras()?, NoiseMode::Ode, 1)?;
    println!("euler max rel error {err:.3e}");
    Ok(())
}

#[test]
fn res_gradient_through_dit_matches_finite_differences() -> Result<()> {
    let err = check(SolverKind::Res, Parameterization::Edm { sigma_data: 0.5 }, karras()?, NoiseMode::Ode, 2)?;
    println!("res max rel error {err:.3e}");
    Ok(())
}

#[test]
fn unipc_gradient_through_dit_matches_finite_differences() -> Result<()> {
    let err = check(SolverKind::Unipc, Parameterization::Edm { sigma_data: 0.5 }, karras()?, NoiseMode::Ode, 3)?;
    println!("unipc max rel error {err:.3e}");
    Ok(())
}

/// Rectified-flow parameterisation on Cosmos Predict2.5's shift schedule (ends at σ = 0), with
/// learnable churn noises: the gradient reaches z0 and every ξ_i correctly.
#[test]
fn rectified_flow_sde_gradient_through_dit_matches_finite_differences() -> Result<()> {
    for (i, solver) in [SolverKind::Euler, SolverKind::Res, SolverKind::Unipc].into_iter().enumerate() {
        let schedule = Schedule::flow_shift(3, 5.0)?;
        let err = check(solver, Parameterization::RectifiedFlow, schedule, NoiseMode::SdeLearnable, 10 + i as u64)?;
        println!("{solver:?} rectified flow, sde-learnable: max rel error {err:.3e}");
    }
    Ok(())
}

/// With block, sub-layer and segment checkpointing and tiled attention in the DiT, ∇z0 through the trajectory (per-step
/// recomputation, each step's VJP backpropagating through the checkpointed blocks) equals the
/// plain DiT's to round-off, and matches finite differences. Rectified flow with learnable step
/// noises: the gradient reaches the step noises too.
#[test]
fn low_memory_dit_gradient_equals_plain_and_matches_finite_differences() -> Result<()> {
    let low = MemoryMode { attention_tile: Some(7), ..MemoryMode::low_memory() };
    let schedule = Schedule::flow_shift(3, 5.0)?;
    let param = Parameterization::RectifiedFlow;
    let mode = NoiseMode::SdeLearnable;
    let mut grads = Vec::new();
    for memory in [MemoryMode::default(), low] {
        let Problem { denoiser, cond, objective, noise, plan } = problem(param, &schedule, mode, 20, memory)?;
        let solver = SolverKind::Euler.build();
        let traj =
            Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule: schedule.clone(), plan };
        let vg = traj.value_and_grad_state(&noise, &objective, GradMode::Recompute)?;
        let steps: Vec<Tensor> = vg.grad_steps.into_iter().flatten().collect();
        anyhow::ensure!(!steps.is_empty(), "no step noise was learned");
        grads.push((vg.loss, vg.grad_z0, steps));
    }
    let max_abs = |t: &Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?) };
    let (plain, low_grads) = (&grads[0], &grads[1]);
    let mut worst = (plain.0 - low_grads.0).abs();
    worst = worst.max(max_abs(&(&plain.1 - &low_grads.1)?)?);
    for (a, b) in plain.2.iter().zip(&low_grads.2) {
        worst = worst.max(max_abs(&(a - b)?)?);
    }
    println!(
        "low-memory vs plain DiT: loss, ∇z0 and ∇ξ max difference {worst:.1e} (∇z0 max {:.2e})",
        max_abs(&plain.1)?
    );
    // Tiled softmax in another order, through 3 steps: round-off of f64 (measured in the report).
    anyhow::ensure!(worst <= 1e-12, "low-memory DiT changed the trajectory gradient by {worst:.2e}");
    let err = check_with(SolverKind::Euler, param, schedule, mode, 20, low)?;
    println!("euler rectified flow, low-memory DiT: max rel error {err:.3e}");
    Ok(())
}
