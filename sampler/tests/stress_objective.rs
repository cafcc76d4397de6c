//! The policy stress test's objective (`sampler::stress`), proved piece by piece:
//!
//! * the camera split: the world model's tiled frame (`observation_frame`, `collect_clips`) cut
//!   back into cameras by `LapoFramePolicy::camera_stack` is exactly the 9-channel image the
//!   policy was trained on (`rl::trainer::cameras_to_chw` of the environment's cameras);
//! * the resize: `bilinear_matrix` and `camera_stack`'s 2-D resize against PyTorch's
//!   `interpolate(align_corners=False)` (fixture `fixtures/bilinear_resize.json`, made by
//!   `fixtures/make_bilinear_fixture.py`);
//! * the exported policy and the `Lapo` it was exported from give the same objective, so the
//!   f64 gradient check below (on an f64 `Lapo`) is a check of the exported policy's function;
//! * ∇z0 (and the learned step noises) through a tiny world model's trajectory and the LAPO frame
//!   policy, against central finite differences in f64, per variable.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl::encoders::{EncoderKind, FeatureLayout};
use rl::env::{Env, EnvConfig, Observation, ACTION_DIM, NUM_CAMERAS, STATE_DIM};
use rl::lapo::{Dims, Lapo, LapoConfig, ValueBounds};
use rl::trainer::{cameras_to_chw, Normalization};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::{FramePolicy, Objective, PolicyObjective};
use sampler::optimize::verify_gradient;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::stress::{bilinear_matrix, LapoFramePolicy};
use sampler::trajectory::{GradMode, Trajectory};
use sampler::world_model::{
    collect_clips, observation_frame, trainable_vars, DataSpec, WorldModel, WorldModelConfig, COLLECTION_POLICIES,
};
use shared::gradcheck::GradCheckOptions;
use shared::rng::SplitMix64;

/// The privileged-head width of the embedded image policy (`weights/policy.safetensors`).
const PRIVILEGED_DIM: usize = 16;

/// An untrained LAPO with the embedded image policy's architecture (conv encoder, privileged
/// head inside the encoder, `fused-state` feature) on `image_hw` cameras, in `dtype`.
fn image_lapo(image_hw: (usize, usize), dtype: DType, seed: u64) -> Result<Lapo> {
    let config = LapoConfig {
        encoder: EncoderKind::Conv,
        aux_state_weight: 1000.0,
        aux_state_input: true,
        feature_layout: FeatureLayout::FusedState,
        max_latent_action: 0.5,
        seed,
        // The embedded policy's depth (it predates --hidden-layers).
        hidden_layers: 2,
        ..LapoConfig::reference()
    };
    let dims = Dims {
        state_dim: STATE_DIM,
        action_dim: ACTION_DIM,
        image_hw,
        privileged_dim: PRIVILEGED_DIM,
        supersample: 1,
        ..Default::default()
    };
    Ok(Lapo::new(config, dims, ValueBounds { min_v: 0.0, max_v: 100.0 }, dtype, &Device::Cpu)?)
}

/// A non-trivial z-scoring (means ≠ 0, stds ≠ 1) so the normalisation path is exercised.
fn random_normalization(seed: u64) -> Normalization {
    let mut rng = SplitMix64::new(seed);
    let mut v = |n: usize, lo: f64, hi: f64| (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect();
    Normalization {
        state_mean: v(STATE_DIM, -0.5, 0.5),
        state_std: v(STATE_DIM, 0.5, 1.5),
        action_mean: v(ACTION_DIM, -0.3, 0.3),
        action_std: v(ACTION_DIM, 0.5, 1.5),
        reward_scale: 1.0,
        privileged_mean: Vec::new(),
        privileged_std: Vec::new(),
    }
}

/// Random joint states (B, T, S).
fn random_states(b: usize, t: usize, seed: u64, dtype: DType) -> Result<Tensor> {
    Ok(SplitMix64::new(seed).normal_tensor((b, t, STATE_DIM), dtype, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// `cameras_to_chw` of one observation: the policy's training-time image (9, h, w) in [0, 1].
fn policy_view(images: &[Vec<u8>; NUM_CAMERAS], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; 3 * NUM_CAMERAS * h * w];
    cameras_to_chw(&[&images[0], &images[1], &images[2]], h, w, &mut out);
    out
}

/// `(u/127.5 − 1)/2 + 1/2` (tiling, then `camera_stack`) against `u/255` (the trainer), both in
/// f32: measured to differ by at most 1.5e-8 over u = 0…255 (one rounding; one ulp of 0.5…1 is
/// 6e-8). A camera, frame or clip out of place differs by up to 1.
const PIXEL_TOL: f64 = 6e-8;

/// Synthetic observations with distinct random pixels (B = 2 clips × T = 3 frames, 16 px
/// cameras, no downsampling): tiled into world-model frames by `observation_frame`, stacked into
/// clips (B, 3, T, H, 3H), cut back by `camera_stack`: row (clip b, frame t) is the trainer's
/// image of that observation, for t = 1…T−1.
#[test]
fn camera_stack_of_tiled_frames_is_the_policys_camera_image() -> Result<()> {
    let (b, t, v) = (2, 3, 16);
    let lapo = image_lapo((v, v), DType::F32, 1)?;
    let norm = random_normalization(2);
    let policy =
        LapoFramePolicy::from_actor((&lapo, &norm), (v, v), "test".into(), &random_states(b, t, 3, DType::F32)?, v)?;
    let mut rng = SplitMix64::new(4);
    let mut observations = Vec::new();
    let mut clips = Vec::new();
    for _ in 0..b {
        let mut frames = Vec::new();
        let mut clip_obs = Vec::new();
        for _ in 0..t {
            let images: [Vec<u8>; NUM_CAMERAS] =
                std::array::from_fn(|_| (0..v * v * 3).map(|_| (rng.next_u64() % 256) as u8).collect());
            let obs =
                Observation { images, state: vec![0.0; STATE_DIM], environment_state: Vec::new(), height: v, width: v };
            frames.push(Tensor::from_vec(observation_frame(&obs, v)?, (3, v, 3 * v), &Device::Cpu)?);
            clip_obs.push(obs);
        }
        // (3, T, H, 3H): frames along the time axis.
        clips.push(Tensor::stack(&frames, 1)?);
        observations.push(clip_obs);
    }
    let clips = Tensor::stack(&clips, 0)?;
    let stack = policy.camera_stack(&clips)?;
    assert_eq!(stack.dims(), &[b * (t - 1), 9, v, v]);
    for (bi, clip_obs) in observations.iter().enumerate() {
        // Frame 0 is the condition: the policy sees frames 1…T−1.
        for (ti, obs) in clip_obs.iter().enumerate().skip(1) {
            let row = stack.get(bi * (t - 1) + ti - 1)?;
            let expected = Tensor::from_vec(policy_view(&obs.images, v, v), (9, v, v), &Device::Cpu)?;
            let err = max_abs_diff(&row, &expected)?;
            assert!(
                err <= PIXEL_TOL,
                "clip {bi} frame {ti}: camera stack differs from the policy's image by {err:.3e}"
            );
        }
    }
    Ok(())
}

/// The same through the real pipeline: `collect_clips` renders the environment (16 px cameras,
/// render size = view size, so no downsampling) and cuts clips; the environment replayed with the
/// same seed and the same (expert) policy gives the observations, whose trainer images must be
/// what `camera_stack` cuts out of the clips.
#[test]
fn camera_stack_of_collected_clips_is_the_policys_view_of_the_environment() -> Result<()> {
    let mut cfg = WorldModelConfig::tiny();
    (cfg.view_size, cfg.render_size, cfg.frame_stride) = (16, 16, 2);
    let (seed, frames_per_episode) = (7, 5);
    let spec = DataSpec { episodes: 1, first_seed: seed, frames_per_episode, clip_spacing: 1 };
    let clips = collect_clips(&cfg, &spec, &Device::Cpu)?;
    let t = cfg.frames;
    assert_eq!(clips.len(), frames_per_episode - t + 1);

    // The environment, replayed: the observation at every recorded frame.
    let env_cfg = EnvConfig { render: true, ..EnvConfig::default().with_image_size(16, 16) };
    let mut env = Env::new(env_cfg)?;
    let mut policy = COLLECTION_POLICIES[0].build(seed);
    let mut obs = env.reset(seed);
    let mut recorded = Vec::new();
    for _ in 0..frames_per_episode {
        recorded.push(obs.clone());
        let action = policy.act(&env);
        for _ in 0..cfg.frame_stride {
            obs = env.step(&action).obs;
        }
    }

    let lapo = image_lapo((16, 16), DType::F32, 1)?;
    let norm = random_normalization(2);
    let frame_policy =
        LapoFramePolicy::from_actor((&lapo, &norm), (16, 16), "test".into(), &clips.states, cfg.view_size)?;
    let stack = frame_policy.camera_stack(&clips.frames)?;
    for (ci, (_, start, _)) in clips.origin.iter().enumerate() {
        for ti in 1..t {
            let row = stack.get(ci * (t - 1) + ti - 1)?;
            let o = &recorded[start + ti];
            let expected = Tensor::from_vec(policy_view(&o.images, 16, 16), (9, 16, 16), &Device::Cpu)?;
            let err = max_abs_diff(&row, &expected)?;
            assert!(err <= PIXEL_TOL, "clip {ci} frame {ti}: camera stack differs from the environment by {err:.3e}");
            // The clip's joint states are the environment's too (what the policy is fed with).
            let states: Vec<f32> = clips.states.get(ci)?.get(ti)?.to_vec1()?;
            assert_eq!(states, o.state, "clip {ci} frame {ti}: joint state");
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct ResizeFixture {
    matrices: Vec<MatrixCase>,
    images: Vec<ImageCase>,
}

#[derive(serde::Deserialize)]
struct MatrixCase {
    out: usize,
    #[serde(rename = "in")]
    inp: usize,
    values: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct ImageCase {
    out: usize,
    #[serde(rename = "in")]
    inp: usize,
    input: Vec<f64>,
    output: Vec<f64>,
}

fn resize_fixture() -> Result<ResizeFixture> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bilinear_resize.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Both computed in f64 from the same half-pixel formula, in a different order
/// ((i + ½)·in/out vs (in/out)·(i + ½)): they agree to rounding (measured: see the test's
/// output). A wrong convention (align_corners = true, no clamping at the borders, a swapped
/// weight) is off by ≥ 1e-2 somewhere in these sizes.
const RESIZE_TOL: f64 = 1e-12;

#[test]
fn bilinear_matrix_rows_sum_to_one_and_match_pytorch() -> Result<()> {
    let fixture = resize_fixture()?;
    let mut worst = 0f64;
    for case in &fixture.matrices {
        let m = bilinear_matrix(case.out, case.inp);
        assert_eq!(m.len(), case.out * case.inp);
        for (i, row) in m.chunks(case.inp).enumerate() {
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() <= 1e-15, "{}←{}: row {i} sums to {sum}", case.out, case.inp);
            assert!(row.iter().all(|&w| w >= 0.0), "{}←{}: row {i} has a negative weight", case.out, case.inp);
        }
        let err = m.iter().zip(&case.values).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        worst = worst.max(err);
        assert!(err <= RESIZE_TOL, "{}←{}: differs from PyTorch by {err:.3e}", case.out, case.inp);
    }
    println!("bilinear_matrix vs PyTorch: max |error| {worst:.3e}");
    Ok(())
}

/// `camera_stack`'s 2-D resize (R_h · X · R_wᵀ, over all nine channels) of an 8 px and a 16 px
/// view to the policy's 12 px against PyTorch's bilinear `interpolate`, in f64 (an f64 policy).
#[test]
fn camera_stack_resize_matches_pytorch_bilinear_interpolate() -> Result<()> {
    let fixture = resize_fixture()?;
    let dev = Device::Cpu;
    let norm = random_normalization(2);
    for case in &fixture.images {
        let (o, v) = (case.out, case.inp);
        let lapo = image_lapo((o, o), DType::F64, 1)?;
        let policy = LapoFramePolicy::from_actor(
            (&lapo, &norm),
            (o, o),
            "test".into(),
            &random_states(1, 2, 3, DType::F64)?,
            v,
        )?;
        // The 9 channels (camera, RGB) as the world model tiles them: frame 1 of a 2-frame clip
        // (frame 0 is the condition and not fed to the policy), pixels in [−1, 1].
        let img = Tensor::from_vec(case.input.clone(), (3, 3, v, v), &dev)?;
        let tiled = img.permute((1, 2, 0, 3))?.reshape((3, v, 3 * v))?.affine(2.0, -1.0)?;
        let clip = Tensor::stack(&[&tiled.zeros_like()?, &tiled], 1)?.unsqueeze(0)?;
        let stack = policy.camera_stack(&clip)?;
        let expected = Tensor::from_vec(case.output.clone(), (1, 9, o, o), &dev)?;
        let err = max_abs_diff(&stack, &expected)?;
        println!("camera_stack {v}→{o} vs PyTorch: max |error| {err:.3e}");
        assert!(err <= RESIZE_TOL, "{v}→{o}: camera_stack differs from PyTorch by {err:.3e}");
    }
    Ok(())
}

/// The exported policy file (what the stress test loads) and the `Lapo` it was exported from,
/// each as a `LapoFramePolicy` in f32, give bitwise the same actions on the same clip: the same
/// weights (f32 in both) through the same modules. So the f64 gradient check, which needs an f64
/// `Lapo` (an exported policy always loads in f32), checks the exported policy's function.
#[test]
fn exported_policy_and_its_lapo_give_the_same_actions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (b, t, v) = (2, 3, 8);
    let lapo = image_lapo((12, 12), DType::F32, 5)?;
    let norm = random_normalization(6);
    let path = dir.path().join("policy.safetensors");
    rl::policy::export(&lapo, &norm, &path)?;
    let exported = rl::policy::ExportedPolicy::load(&path, &Device::Cpu)?;
    let states = random_states(b, t, 7, DType::F32)?;
    let from_file = LapoFramePolicy::new(exported, &states, v, &Device::Cpu)?;
    let from_lapo = LapoFramePolicy::from_actor((&lapo, &norm), (12, 12), "lapo".into(), &states, v)?;
    let frames = SplitMix64::new(8).uniform_tensor((b, 3, t, v, 3 * v), -1.0, 1.0, DType::F32, &Device::Cpu)?;
    let a_file: Vec<f32> = from_file.actions(&frames)?.flatten_all()?.to_vec1()?;
    let a_lapo: Vec<f32> = from_lapo.actions(&frames)?.flatten_all()?.to_vec1()?;
    assert_eq!(a_file.len(), b * (t - 1) * ACTION_DIM);
    assert_eq!(a_file, a_lapo, "exported policy and Lapo disagree");
    // Non-degenerate: the actions depend on the frames.
    let other = from_lapo.actions(&(frames * 0.5)?)?.flatten_all()?.to_vec1::<f32>()?;
    assert_ne!(other, a_lapo, "the actions do not depend on the frames");
    Ok(())
}

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

/// ∇z0 (and ξ_i) through the tiny world model's trajectory and the LAPO frame policy objective,
/// all in f64, against central differences, per variable.
fn check_policy_gradient(solver: SolverKind, schedule: Schedule, mode: NoiseMode, seed: u64) -> Result<f64> {
    let dev = Device::Cpu;
    let cfg = WorldModelConfig::tiny();
    let model = random_world_model(&cfg, seed, DType::F64)?;
    let (b, t, v) = (2, cfg.frames, cfg.view_size);
    let mut rng = SplitMix64::new(seed ^ 0x51);
    let clips = rng.uniform_tensor((b, 3, t, v, 3 * v), -1.0, 1.0, DType::F64, &dev)?;
    let actions = rng.normal_tensor((b, t, ACTION_DIM), DType::F64, &dev)?;
    let states = rng.normal_tensor((b, t, STATE_DIM), DType::F64, &dev)?;
    // 8 px views upsampled to 12 px: the resize is not the identity.
    let lapo = image_lapo((12, 12), DType::F64, seed)?;
    let norm = random_normalization(seed);
    let policy = LapoFramePolicy::from_actor((&lapo, &norm), (12, 12), "f64 lapo".into(), &states, v)?;
    let objective = PolicyObjective { policy, reference_actions: actions.narrow(1, 1, t - 1)?.contiguous()? };

    let cond = model.conditioning(&clips, &actions)?;
    let denoiser = model.denoiser();
    let churn = Churn { s_churn: 0.4, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 };
    let plan = churn.plan(&schedule.sigmas, mode.injects());
    let noise = NoiseState::draw(seed, clips.dims(), &plan, mode, true, DType::F64, &dev)?;
    let solver = solver.build();
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let opts = GradCheckOptions { eps: FD_EPS, directions: 3, seed, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &objective, GradMode::Recompute, &opts)?;
    println!("{} {mode:?}, {}:\n{}", solver.name(), objective.describe(), report.table());
    anyhow::ensure!(report.vars_without_grad().is_empty(), "no gradient reached {:?}", report.vars_without_grad());
    report.assert_nondegenerate(1e-6, "∇ of the policy objective")?;
    report.assert_close(POLICY_GRAD_TOL, &format!("∇ of the policy objective, {} solver", solver.name()))?;
    Ok(report.max_rel_error())
}

/// The finite-difference step along a unit-variance direction of z0 / ξ. Measured (f64, both
/// tests, first 2 directions): the worst relative error is 4.6e-6 at ε = 1e-6 and 4.7e-7 at
/// 1e-5, falling as 1/ε (round-off of the O(1) objective over 2ε against directional
/// derivatives of ~1e-4), 4.0e-8 at 1e-4, and 5.8e-7 at 1e-3, rising as ε² (truncation): 1e-4
/// is the sweet spot.
const FD_EPS: f64 = 1e-4;

/// 11× the worst measured error at [`FD_EPS`] with 3 directions (4.4e-8, ξ_0 in the
/// learned-noise test; 1.6e-8 in the ODE test). A wrong factor or a dropped term on the path
/// (the resize, the [0, 1] mapping, the action de-normalisation, the policy's network) is off by
/// ≥ 1e-2, and a path that detaches the frames (no gradient) by 1. The conv encoder's ReLUs are
/// kinks: one crossed within ±ε would show as a ~1e-3 error; with these fixed seeds none is.
const POLICY_GRAD_TOL: f64 = 5e-7;

/// The default job's sampler (RES, 2 Karras steps σ = 80 → 3 and the clean pass, ODE: z0 alone).
#[test]
fn policy_objective_gradient_through_world_model_matches_finite_differences() -> Result<()> {
    let err = check_policy_gradient(SolverKind::Res, Schedule::karras(2, 3.0, 80.0, 7.0)?, NoiseMode::Ode, 11)?;
    println!("max rel error {err:.3e}");
    Ok(())
}

/// Learned churn noises (ξ_0, ξ_1 by name) with z0, Euler over 2 steps to σ = 0.5.
#[test]
fn policy_objective_gradient_reaches_each_learned_step_noise() -> Result<()> {
    let err =
        check_policy_gradient(SolverKind::Euler, Schedule::karras(2, 0.5, 80.0, 7.0)?, NoiseMode::SdeLearnable, 12)?;
    println!("max rel error {err:.3e}");
    Ok(())
}
