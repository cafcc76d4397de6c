//! The world model as a sampler denoiser, `FrameReplace(ResidualToFirstFrame(Preconditioned(
//! WorldModelNet)))` with the action context (`WorldModel::denoiser()` +
//! `WorldModel::conditioning(clips, actions)`):
//!
//! * `ResidualToFirstFrame` is D(x) = f₀ + D_Δ(x − f₀) by value, against an inner denoiser whose
//!   output is written in the test;
//! * the whole stack is, by value, the EDM preconditioning (Karras et al. 2022, table 1, written
//!   out here) of the raw network on the changes from the first frame, with frame 0 replaced by
//!   the condition and presented at the condition σ;
//! * ∇z0 (and the learned step noises) through short trajectories over the stack, against
//!   central finite differences in f64, per variable.

use std::cell::RefCell;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl::env::ACTION_DIM;
use sampler::denoiser::{per_frame, Conditioning, Denoiser, Network};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::TargetMse;
use sampler::optimize::verify_gradient;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use sampler::world_model::{trainable_vars, ResidualToFirstFrame, WorldModel, WorldModelConfig, WorldModelNet};
use shared::gradcheck::GradCheckOptions;
use shared::rng::SplitMix64;

/// A frozen tiny world model in `dtype` with every weight random and non-zero (biases and
/// positional tables included, norm gains ≠ 1, the output projection at full scale), so no path
/// through the network is switched off.
fn random_world_model(cfg: &WorldModelConfig, seed: u64, dtype: DType) -> Result<WorldModel> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    WorldModel::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut rng = SplitMix64::new(seed);
    let mut tensors = std::collections::HashMap::new();
    for (name, var) in trainable_vars(&varmap)? {
        let shape = var.shape().clone();
        let noise = rng.normal_tensor(&shape, DType::F64, &dev)?;
        let value = if name.ends_with("bias") || name.contains("pos") {
            (noise * 0.1)?
        } else if shape.rank() == 1 {
            ((noise * 0.1)? + 1.0)?
        } else {
            let fan_in = shape.dims().last().copied().unwrap_or(1) as f64;
            (noise * (1.0 / fan_in.sqrt()))?
        };
        tensors.insert(name, value.to_dtype(dtype)?);
    }
    WorldModel::new(cfg, VarBuilder::from_tensors(tensors, dtype, &dev))
}

/// Clips (B, 3, T, H, 3H) in [−1, 1) and actions (B, T, A), random.
fn random_clips(cfg: &WorldModelConfig, b: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let [c, t, h, w] = cfg.clip_shape();
    let mut rng = SplitMix64::new(seed);
    let clips = rng.uniform_tensor((b, c, t, h, w), -1.0, 1.0, DType::F64, &Device::Cpu)?;
    let actions = rng.normal_tensor((b, t, ACTION_DIM), DType::F64, &Device::Cpu)?;
    Ok((clips, actions))
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// An inner denoiser whose output is known: D_Δ(y, σ) = 0.5·y + 0.01·σ (σ per clip and frame);
/// it records the input it was given.
#[derive(Default)]
struct KnownInner {
    seen: RefCell<Option<Tensor>>,
}

impl Denoiser for KnownInner {
    fn denoise(&self, y: &Tensor, sigma: &Tensor, _cond: &Conditioning) -> candle_core::Result<Tensor> {
        *self.seen.borrow_mut() = Some(y.clone());
        (y * 0.5)?.broadcast_add(&(per_frame(sigma)? * 0.01)?)
    }

    fn describe(&self) -> String {
        "known inner denoiser".into()
    }
}

/// D(x) = f₀ + D_Δ(x − f₀), element by element, with f₀ each clip's own frame 0 (broadcast over
/// time, not over clips) and the other condition frames ignored. Both sides are the same IEEE
/// operations on the same numbers (x − f₀, ·0.5, + 0.01σ, + f₀), so they agree exactly.
#[test]
fn residual_to_first_frame_is_the_first_frame_plus_the_inner_denoiser_on_the_changes() -> Result<()> {
    let (b, c, t, h, w) = (2, 3, 3, 2, 4);
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(1);
    let x = rng.normal_tensor((b, c, t, h, w), DType::F64, &dev)?;
    let cond_frames = rng.normal_tensor((b, c, t, h, w), DType::F64, &dev)?;
    let sigma_v: Vec<f64> = (0..b * t).map(|i| 0.3 + i as f64).collect();
    let sigma = Tensor::from_vec(sigma_v.clone(), (b, t), &dev)?;
    let cond = Conditioning::frame_replace(&cond_frames, 1)?;
    let residual = ResidualToFirstFrame(KnownInner::default());
    let d = values(&residual.denoise(&x, &sigma, &cond)?)?;
    let seen = values(residual.0.seen.borrow().as_ref().expect("the inner denoiser was called"))?;

    let (xv, fv) = (values(&x)?, values(&cond_frames)?);
    let idx = |bi: usize, ci: usize, ti: usize, yi: usize, xi: usize| (((bi * c + ci) * t + ti) * h + yi) * w + xi;
    for bi in 0..b {
        for ci in 0..c {
            for ti in 0..t {
                for yi in 0..h {
                    for xi in 0..w {
                        let i = idx(bi, ci, ti, yi, xi);
                        let f0 = fv[idx(bi, ci, 0, yi, xi)];
                        let change = xv[i] - f0;
                        assert_eq!(seen[i], change, "inner input at {:?}", (bi, ci, ti, yi, xi));
                        let expected = (change * 0.5 + sigma_v[bi * t + ti] * 0.01) + f0;
                        assert_eq!(d[i], expected, "output at {:?}", (bi, ci, ti, yi, xi));
                    }
                }
            }
        }
    }
    // It is a residual, not an identity: the output moves with f₀ at fixed x.
    let shifted = Conditioning::frame_replace(&(cond_frames + 1.0)?, 1)?;
    let d_shifted = values(&residual.denoise(&x, &sigma, &shifted)?)?;
    for (a, s) in d.iter().zip(&d_shifted) {
        // f₀ + 0.5(x − f₀) moves by 0.5 when f₀ moves by 1.
        assert!((s - a - 0.5).abs() < 1e-12, "shifting f₀ by 1 moved D by {}", s - a);
    }
    Ok(())
}

#[test]
fn residual_to_first_frame_without_a_condition_frame_is_an_error() -> Result<()> {
    let x = Tensor::zeros((1, 3, 2, 2, 2), DType::F64, &Device::Cpu)?;
    let sigma = Tensor::ones((1, 2), DType::F64, &Device::Cpu)?;
    let err = match ResidualToFirstFrame(KnownInner::default()).denoise(&x, &sigma, &Conditioning::default()) {
        Ok(_) => anyhow::bail!("denoising without a condition frame succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("condition frame"), "unexpected error: {err}");
    Ok(())
}

/// The real stack by value. With f₀ the clip's frame 0, σ_d the model's σ_data, and per frame
/// σ_t = σ (frames ≥ 1) or the condition σ (frame 0, replaced by the condition): the network is
/// fed y_t·c_in(σ_t) with y = x − f₀ (0 at frame 0), c_noise = ln(σ_t)/4, and
/// D_t = f₀ + c_skip(σ)·y_t + c_out(σ)·F_t for t ≥ 1, D_0 = f₀, with EDM's
/// c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²) (Karras et al.
/// 2022, table 1), F the raw `WorldModelNet` (which also sees the condition frame and the
/// actions). Tolerance 1e-12: the same f64 values combined in another order (measured below).
#[test]
fn world_model_denoiser_is_edm_on_the_changes_from_the_first_frame() -> Result<()> {
    let cfg = WorldModelConfig::tiny();
    let model = random_world_model(&cfg, 2, DType::F64)?;
    let (b, [c, t, h, w]) = (2, cfg.clip_shape());
    let (clips, actions) = random_clips(&cfg, b, 3)?;
    let x = SplitMix64::new(4).normal_tensor((b, c, t, h, w), DType::F64, &Device::Cpu)?;
    let sigmas = [0.7, 6.0];
    let sigma = Tensor::from_vec(sigmas.iter().flat_map(|&s| vec![s; t]).collect::<Vec<f64>>(), (b, t), &Device::Cpu)?;
    let cond = model.conditioning(&clips, &actions)?;
    let d = values(&model.denoiser().denoise(&x, &sigma, &cond)?)?;

    // The network's input and noise levels, written out.
    let (sd, cs) = (cfg.sigma_data, cfg.condition_sigma);
    let level = |bi: usize, ti: usize| if ti == 0 { cs } else { sigmas[bi] };
    let (xv, fv) = (values(&x)?, values(&clips)?);
    let idx = |bi: usize, ci: usize, ti: usize, p: usize| ((bi * c + ci) * t + ti) * h * w + p;
    let change = |bi: usize, ci: usize, ti: usize, p: usize| {
        if ti == 0 {
            0.0
        } else {
            xv[idx(bi, ci, ti, p)] - fv[idx(bi, ci, 0, p)]
        }
    };
    let mut net_in = vec![0f64; xv.len()];
    for bi in 0..b {
        for ci in 0..c {
            for ti in 0..t {
                let s = level(bi, ti);
                for p in 0..h * w {
                    net_in[idx(bi, ci, ti, p)] = change(bi, ci, ti, p) / (s * s + sd * sd).sqrt();
                }
            }
        }
    }
    let c_noise: Vec<f64> =
        (0..b).flat_map(|bi| (0..t).map(move |ti| (bi, ti))).map(|(bi, ti)| level(bi, ti).ln() / 4.0).collect();
    let net_in = Tensor::from_vec(net_in, (b, c, t, h, w), &Device::Cpu)?;
    let c_noise = Tensor::from_vec(c_noise, (b, t), &Device::Cpu)?;
    let f = values(&WorldModelNet(&model).forward(&net_in, &c_noise, &cond)?)?;

    let mut worst = 0f64;
    let mut moved = 0f64;
    for bi in 0..b {
        for ci in 0..c {
            for ti in 0..t {
                let s = sigmas[bi];
                let var = s * s + sd * sd;
                for p in 0..h * w {
                    let i = idx(bi, ci, ti, p);
                    let f0 = fv[idx(bi, ci, 0, p)];
                    let expected = if ti == 0 {
                        f0
                    } else {
                        f0 + sd * sd / var * change(bi, ci, ti, p) + s * sd / var.sqrt() * f[i]
                    };
                    worst = worst.max((d[i] - expected).abs());
                    moved = moved.max((expected - f0).abs());
                }
            }
        }
    }
    println!("world-model denoiser vs the EDM formula on the changes: max |error| {worst:.3e}");
    assert!(worst <= 1e-12, "the denoiser differs from f₀ + EDM(changes) by {worst:.3e}");
    // Non-degenerate: the prediction is not just the first frame.
    assert!(moved > 1e-2, "the prediction barely leaves the first frame ({moved:.3e})");
    Ok(())
}

/// ∇z0 (and ξ_i) through a trajectory over the stack, per variable, in f64.
fn check_trajectory_gradient(solver: SolverKind, schedule: Schedule, mode: NoiseMode, seed: u64) -> Result<f64> {
    let dev = Device::Cpu;
    let cfg = WorldModelConfig::tiny();
    let model = random_world_model(&cfg, seed, DType::F64)?;
    let (clips, actions) = random_clips(&cfg, 2, seed ^ 0x77)?;
    let target = SplitMix64::new(seed ^ 0x78).uniform_tensor(clips.dims(), -1.0, 1.0, DType::F64, &dev)?;
    let objective = TargetMse { target, label: "random target".into() };
    let cond = model.conditioning(&clips, &actions)?;
    let denoiser = model.denoiser();
    let churn = Churn { s_churn: 0.4, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 };
    let plan = churn.plan(&schedule.sigmas, mode.injects());
    let noise = NoiseState::draw(seed, clips.dims(), &plan, mode, true, DType::F64, &dev)?;
    let solver = solver.build();
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let opts = GradCheckOptions { eps: FD_EPS, directions: 3, seed, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{} {mode:?}:\n{}", solver.name(), report.table());
    anyhow::ensure!(report.vars_without_grad().is_empty(), "no gradient reached {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-6, "∇ through the world-model trajectory")?;
    report.assert_close(TRAJECTORY_GRAD_TOL, &format!("∇ through the world model, {} solver", solver.name()))?;
    Ok(report.max_rel_error())
}

/// The finite-difference step along a unit-variance direction of z0 / ξ. Measured (f64, both
/// tests, first 2 directions): the worst relative error is 4.5e-7 at ε = 1e-6 and 4.0e-8 at
/// 1e-5, falling as 1/ε (round-off of the O(1) objective over 2ε), 6.6e-9 at 1e-4, and 5.6e-7 at
/// 1e-3, rising as ε² (truncation): 1e-4 is the sweet spot.
const FD_EPS: f64 = 1e-4;

/// 13× the worst measured error at [`FD_EPS`] with 3 directions (7.7e-9, ξ_0). A wrong factor
/// or a dropped path (the frame replacement's mask, a preconditioning coefficient, the solver's
/// use of D) is off by ≥ 1e-2, and a variable the backward does not reach by 1.
const TRAJECTORY_GRAD_TOL: f64 = 1e-7;

/// The default job's sampler: RES, 2 Karras steps from σ = 80 to 3, then the clean pass (ODE).
#[test]
fn world_model_trajectory_gradient_matches_finite_differences() -> Result<()> {
    let err = check_trajectory_gradient(SolverKind::Res, Schedule::karras(2, 3.0, 80.0, 7.0)?, NoiseMode::Ode, 21)?;
    println!("max rel error {err:.3e}");
    Ok(())
}

/// Learned churn noises: z0, ξ_0, ξ_1, ξ_2 each checked on its own (UniPC, 3 steps to σ = 0.002).
#[test]
fn world_model_trajectory_gradient_reaches_each_learned_step_noise() -> Result<()> {
    let err = check_trajectory_gradient(
        SolverKind::Unipc,
        Schedule::karras(3, 0.002, 80.0, 7.0)?,
        NoiseMode::SdeLearnable,
        22,
    )?;
    println!("max rel error {err:.3e}");
    Ok(())
}
