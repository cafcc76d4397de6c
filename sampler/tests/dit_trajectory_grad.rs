//! Finite-difference checks of ∇z0 through whole denoising trajectories whose denoiser is the
//! Cosmos DiT (the tiny random-weight parity fixture, in f64), for every solver.
//!
//! The DiT is wrapped exactly as a world model uses it: a raw `Network` (per-frame timesteps,
//! condition-mask channel, context tokens) → `Preconditioned` (EDM or rectified flow) →
//! `FrameReplace` (first frame is the clean condition). The gradient under test is the
//! default per-step recomputation backward, compared with central differences of the loss.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel};
use sampler::denoiser::{Conditioning, FrameReplace, Network, Preconditioned};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::TargetMse;
use sampler::optimize::verify_gradient;
use sampler::param::Parameterization;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
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
    let tensors = shared::weights::read_safetensors(&path, &Device::Cpu)
        .with_context(|| format!("loading fixture {}", path.display()))?;
    let weights = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("case_"))
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F64)?)))
        .collect::<Result<_>>()?;
    Ok(CosmosTransformer3DModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F64, &Device::Cpu))?)
}

/// Runs the directional check of ∇z0 (and of the learned step noises, in `sde-learnable`) and
/// returns the largest relative error.
fn check(solver: SolverKind, param: Parameterization, schedule: Schedule, mode: NoiseMode, seed: u64) -> Result<f64> {
    let dev = Device::Cpu;
    let denoiser = FrameReplace {
        inner: Preconditioned { net: DitNetwork { model: fixture_dit()? }, param },
        condition_sigma: None,
    };
    let mut rng = SplitMix64::new(seed);
    let frames = (rng.normal_tensor(&SHAPE[..], DType::F64, &dev)? * 0.5)?;
    let context = rng.normal_tensor((1, 2, 16), DType::F64, &dev)?;
    let cond = Conditioning { context: Some(context), ..Conditioning::frame_replace(&frames, 1)? };
    let target = (rng.normal_tensor(&SHAPE[..], DType::F64, &dev)? * 0.5)?;
    let objective = TargetMse { target, label: "random target".into() };
    let churn = Churn { s_churn: 0.4, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 };
    let plan = churn.plan(&schedule.sigmas, mode.injects());
    let noise = NoiseState::draw(seed ^ 0xA5, &SHAPE, &plan, mode, true, DType::F64, &dev)?;
    let solver = solver.build();
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let opts = GradCheckOptions { eps: 1e-6, directions: 3, seed, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{} {:?} {:?}:\n{}", solver.name(), param, mode, report.table());
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
