//! The policy stress test: generate the world's next frames with the embedded world model,
//! feed them to the exported LAPO policy, and optimise z0 so the policy's actions deviate as
//! much as possible (ascent) — or as little as possible (descent) — from the reference actions.
//!
//! Per seed: the environment is reset with that seed and the scripted expert acts for
//! `start_frame` frames; the next `frames` frames (with the expert's actions and the joint
//! states) form the real clip. The world model is conditioned on its first frame and the
//! expert's actions; the policy sees each generated frame (frames 1…T−1) with the real joint
//! state at that frame, and its action is compared with the expert's action there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use rl::policy::ExportedPolicy;
use rl::trainer::Actor;
use serde_json::json;
use shared::params::OptimizerConfig;

use crate::noise::{Churn, NoiseMode, NoiseState};
use crate::objective::{FramePolicy, Objective, PolicyObjective};
use crate::optimize::{optimize, Direction, GradStats, OptimizeSettings};
use crate::schedule::Schedule;
use crate::solver::SolverKind;
use crate::trajectory::{GradMode, Trajectory};
use crate::world_model::{collect_clips, Clips, DataSpec, WorldModel};

/// Bilinear resize matrix (out, in) with half-pixel centres (align_corners = false, no
/// antialiasing: PyTorch's `interpolate(mode="bilinear", align_corners=False)`), so
/// `R_h · X · R_wᵀ` resizes an image differentiably. Weights in f64; callers cast to their dtype.
pub fn bilinear_matrix(out: usize, inp: usize) -> Vec<f64> {
    let mut m = vec![0f64; out * inp];
    for i in 0..out {
        let src = ((i as f64 + 0.5) * inp as f64 / out as f64 - 0.5).clamp(0.0, (inp - 1) as f64);
        let i0 = src.floor() as usize;
        let i1 = (i0 + 1).min(inp - 1);
        let w = src - i0 as f64;
        m[i * inp + i0] += 1.0 - w;
        m[i * inp + i1] += w;
    }
    m
}

/// A LAPO policy as a [`FramePolicy`] over world-model clips (B, 3, T, H, 3H): the generated
/// frames 1…T−1 are split back into the three camera views, mapped to [0, 1], bilinearly resized
/// to the policy's input size and stacked camera-major (9 channels), and fed with the real joint
/// states. Returns de-normalised actions (B, T−1, A) in the frames' dtype.
///
/// The stress test runs it over an [`ExportedPolicy`] (f32). Any [`Actor`] works, and everything
/// is computed in the actor's dtype: over an f64 actor (a `Lapo` built in f64) the whole
/// objective runs in f64, which is what its finite-difference gradient test needs.
pub struct LapoFramePolicy<P = ExportedPolicy> {
    pub policy: P,
    /// (h, w) of the policy's camera images.
    image_hw: (usize, usize),
    /// For [`FramePolicy::describe`].
    label: String,
    /// z-scored joint states (B·(T−1), S), row-major over (clip, frame).
    states_z: Tensor,
    resize_h: Tensor,
    resize_w_t: Tensor,
    action_mean: Tensor,
    action_std: Tensor,
}

impl LapoFramePolicy<ExportedPolicy> {
    /// `states`: real joint states (B, T, S) of the clip (frame 0's is unused).
    pub fn new(policy: ExportedPolicy, states: &Tensor, view_size: usize, device: &Device) -> anyhow::Result<Self> {
        let h = &policy.header;
        let s = states.dim(2)?;
        anyhow::ensure!(s == h.state_dim, "policy expects {} state values, clips carry {s}", h.state_dim);
        anyhow::ensure!(policy.device().same_device(device), "the policy was loaded on another device");
        let label = format!(
            "exported LAPO policy ({:?} encoder, {}×{} images, iteration {})",
            h.encoder, h.image_hw.0, h.image_hw.1, h.iteration
        );
        let image_hw = h.image_hw;
        Self::from_actor(policy, image_hw, label, states, view_size)
    }
}

impl<P: Actor> LapoFramePolicy<P> {
    /// Any actor whose images are `image_hw` (h, w); computes in `policy.dtype()` on
    /// `policy.device()`. `states`: real joint states (B, T, S) of the clip (frame 0's is unused).
    pub fn from_actor(
        policy: P,
        image_hw: (usize, usize),
        label: String,
        states: &Tensor,
        view_size: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            policy.encoder().uses_images(),
            "the policy is state-only (encoder 'none'): generated images cannot change its actions; export a policy trained with --encoder conv or resnet18"
        );
        let (b, t, s) = states.dims3()?;
        let (dtype, device) = (policy.dtype(), policy.device().clone());
        let norm = policy.normalization();
        anyhow::ensure!(
            s == norm.state_mean.len(),
            "policy expects {} state values, clips carry {s}",
            norm.state_mean.len()
        );
        let row = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, v.len()), &device)?.to_dtype(dtype);
        let states_z = states
            .narrow(1, 1, t - 1)?
            .reshape((b * (t - 1), s))?
            .to_device(&device)?
            .to_dtype(dtype)?
            .broadcast_sub(&row(&norm.state_mean)?)?
            .broadcast_div(&row(&norm.state_std)?)?;
        let (ph, pw) = image_hw;
        let resize_h = Tensor::from_vec(bilinear_matrix(ph, view_size), (ph, view_size), &device)?.to_dtype(dtype)?;
        let resize_w_t = Tensor::from_vec(bilinear_matrix(pw, view_size), (pw, view_size), &device)?
            .to_dtype(dtype)?
            .t()?
            .contiguous()?;
        Ok(Self {
            action_mean: row(&norm.action_mean)?,
            action_std: row(&norm.action_std)?,
            policy,
            image_hw,
            label,
            states_z,
            resize_h,
            resize_w_t,
        })
    }

    /// Clips (B, 3, T, H, 3H) in [−1, 1] → the policy's camera stack (B·(T−1), 9, h, w) in
    /// [0, 1], in the policy's dtype.
    pub fn camera_stack(&self, frames: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w3) = frames.dims5()?;
        let v = w3 / 3;
        let n = b * (t - 1);
        let x = frames
            .narrow(2, 1, t - 1)?
            .permute((0, 2, 1, 3, 4))?
            .reshape((n, c, h, 3, v))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((n, 3 * c, h, v))?
            .to_dtype(self.policy.dtype())?
            .affine(0.5, 0.5)?;
        let (ph, pw) = self.image_hw;
        let x = x.reshape((n * 3 * c * h, v))?.matmul(&self.resize_w_t)?.reshape((n * 3 * c, h, pw))?;
        let rh = self.resize_h.unsqueeze(0)?.broadcast_as((n * 3 * c, ph, h))?;
        rh.matmul(&x)?.reshape((n, 3 * c, ph, pw))
    }
}

impl<P: Actor> FramePolicy for LapoFramePolicy<P> {
    fn actions(&self, frames: &Tensor) -> Result<Tensor> {
        let (b, _c, t, _h, _w) = frames.dims5()?;
        let images = self.camera_stack(frames)?;
        let z = self.policy.act_batch(Some(&images), &self.states_z)?;
        let a = z.broadcast_mul(&self.action_std)?.broadcast_add(&self.action_mean)?;
        a.reshape((b, t - 1, ()))?.to_dtype(frames.dtype())
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// What the stress test runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StressSettings {
    pub seeds: Vec<u64>,
    /// Expert frames before the clip starts (so the arms are moving).
    pub start_frame: usize,
    pub iterations: usize,
    pub lr: f64,
    pub direction: Direction,
    pub solver: SolverKind,
    pub num_steps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
}

impl Default for StressSettings {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            start_frame: 4,
            iterations: 12,
            lr: 0.05,
            direction: Direction::Ascent,
            solver: SolverKind::Res,
            // The world model's evaluated setting (weights/README.md): 2 RES steps from σ = 80
            // to 3, then the clean pass.
            num_steps: 2,
            sigma_min: 3.0,
            sigma_max: 80.0,
        }
    }
}

impl StressSettings {
    /// Every setting's range, named by the `sampler` flag that sets it (all problems at once).
    pub fn checks(&self) -> shared::checks::ArgChecks {
        let mut c = shared::checks::ArgChecks::new();
        c.count("--seeds (the number of seeds)", self.seeds.len() as u64)
            .count("--iterations", self.iterations as u64)
            .count("--num-steps", self.num_steps as u64)
            .positive("--lr", self.lr)
            .positive("sigma_min", self.sigma_min)
            .positive("sigma_max", self.sigma_max);
        c.require(self.sigma_min < self.sigma_max, || {
            format!("sigma_min ({}) must be below sigma_max ({})", self.sigma_min, self.sigma_max)
        });
        // Each seed's files are named after it: a repeated seed would overwrite its own outputs.
        let mut seen = std::collections::BTreeSet::new();
        let repeated: Vec<String> = self.seeds.iter().filter(|s| !seen.insert(**s)).map(|s| s.to_string()).collect();
        c.require(repeated.is_empty(), || format!("--seeds repeats {} (each seed runs once)", repeated.join(", ")));
        c
    }

    /// A lower bound of one gradient evaluation's stored tensors on `model`'s clips
    /// ([`crate::config::stored_trajectory_bytes`]; one clip, f32, ODE).
    pub fn working_set_bytes(&self, model: &crate::world_model::WorldModelConfig) -> u128 {
        let elems = model.clip_shape().iter().fold(1u128, |acc, &d| acc.saturating_mul(d as u128));
        crate::config::stored_trajectory_bytes(self.num_steps as u128, elems, 4, self.solver, false)
    }

    /// Checks the settings, and that the trajectory's stored tensors fit on `device`.
    pub fn check(&self, model: &crate::world_model::WorldModelConfig, device: &Device) -> anyhow::Result<()> {
        self.checks().finish()?;
        shared::checks::ensure_fits(
            &Device::Cpu,
            crate::optimize::history_bytes(self.iterations),
            &format!("--iterations {} (a record per iteration)", self.iterations),
        )?;
        shared::checks::ensure_fits(
            device,
            self.working_set_bytes(model),
            &format!(
                "--num-steps {} over {:?} clips (at least {} such f32 tensors stored per step)",
                self.num_steps,
                model.clip_shape(),
                crate::config::stored_tensors_per_step(self.solver, false)
            ),
        )
    }
}

/// Loads the policy at `path` and checks the stress test can use it: it sees images (a
/// state-only policy's actions cannot change with the generated frames) and takes the
/// environment's joint state.
pub fn load_policy(path: &Path, device: &Device) -> anyhow::Result<ExportedPolicy> {
    let policy =
        ExportedPolicy::load(path, device).with_context(|| format!("loading the policy {}", path.display()))?;
    let h = &policy.header;
    h.check_environment().with_context(|| format!("the policy {}", path.display()))?;
    anyhow::ensure!(
        h.encoder.uses_images(),
        "the policy {} is state-only (encoder 'none'): generated images cannot change its actions; export a policy trained with --encoder conv or resnet18",
        path.display()
    );
    anyhow::ensure!(
        h.state_dim == rl::env::STATE_DIM,
        "the policy {} expects {} state values, the environment has {}",
        path.display(),
        h.state_dim,
        rl::env::STATE_DIM
    );
    Ok(policy)
}

/// One seed's measured result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SeedResult {
    pub seed: u64,
    /// Policy action MSE to the expert on the real frames (reference point).
    pub error_on_real_frames: f64,
    pub error_before: f64,
    pub error_after: f64,
    pub grad_z0_norm_initial: f64,
    pub seconds: f64,
    pub iterations: Vec<crate::optimize::IterationRecord>,
}

pub struct StressSummary {
    pub results: Vec<SeedResult>,
    pub files: Vec<String>,
    pub seconds: f64,
}

/// The expert clip for `seed` starting at `start_frame` (one episode).
pub fn expert_clip(model: &WorldModel, seed: u64, start_frame: usize, device: &Device) -> anyhow::Result<Clips> {
    let spec = DataSpec {
        episodes: 1,
        first_seed: seed,
        frames_per_episode: start_frame + model.cfg.frames,
        clip_spacing: start_frame.max(1),
    };
    // Episode 0 of a collection is the scripted expert's.
    let clips = collect_clips(&model.cfg, &spec, device)?;
    let last = clips.len() - 1;
    anyhow::ensure!(clips.origin[last].1 == start_frame, "episode {seed} ended before frame {start_frame}");
    Ok(clips.select(&[last])?)
}

/// Runs the stress test for every seed on the CPU, writing `report.json`, `metrics.jsonl`, and per
/// seed `seed<k>_before_after.png` (rows: real, before, after) and `seed<k>_{before,after}.gif`.
pub fn run(
    model: &WorldModel,
    policy_path: &Path,
    settings: &StressSettings,
    out_dir: &Path,
    log: impl FnMut(&str),
) -> anyhow::Result<StressSummary> {
    run_on(model, policy_path, settings, &Device::Cpu, out_dir, log)
}

/// [`run`] on `device`, the device `model` was loaded on (`sampler --device`).
pub fn run_on(
    model: &WorldModel,
    policy_path: &Path,
    settings: &StressSettings,
    device: &Device,
    out_dir: &Path,
    mut log: impl FnMut(&str),
) -> anyhow::Result<StressSummary> {
    let started = Instant::now();
    let device = device.clone();
    // Everything checked before the first write.
    settings.check(&model.cfg, &device)?;
    let mut first_policy = Some(load_policy(policy_path, &device)?);
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    log(&format!("world model: {}", model.describe()));
    let mut metrics = shared::metrics::JsonlWriter::create(&out_dir.join("metrics.jsonl"))?;
    let mut results = Vec::new();
    let mut files = Vec::new();
    for &seed in &settings.seeds {
        let t0 = Instant::now();
        let clip = expert_clip(model, seed, settings.start_frame, &device)?;
        let policy = match first_policy.take() {
            Some(p) => p,
            None => load_policy(policy_path, &device)?,
        };
        let frame_policy = LapoFramePolicy::new(policy, &clip.states, model.cfg.view_size, &device)?;
        if seed == settings.seeds[0] {
            log(&format!("policy: {}", frame_policy.describe()));
        }
        let t = model.cfg.frames;
        let objective = PolicyObjective {
            policy: frame_policy,
            reference_actions: clip.actions.narrow(1, 1, t - 1)?.contiguous()?,
        };
        let error_on_real_frames = shared::gradcheck::scalar_f64(&objective.loss(&clip.frames)?)?;

        let cond = model.conditioning(&clip.frames, &clip.actions)?;
        let denoiser = model.denoiser();
        let solver = settings.solver.build();
        let schedule = Schedule::karras(settings.num_steps, settings.sigma_min, settings.sigma_max, 7.0)?;
        let plan = Churn::default().plan(&schedule.sigmas, false);
        let noise = NoiseState::draw(seed, clip.frames.dims(), &plan, NoiseMode::Ode, true, DType::F32, &device)?;
        let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
        let opt = OptimizeSettings {
            iterations: settings.iterations,
            optimizer: OptimizerConfig::adam(settings.lr),
            direction: settings.direction,
            grad_clip: None,
            chi_reg: 0.0,
            grad_mode: GradMode::Recompute,
        };
        let mut write_err = None;
        let outcome = optimize(&traj, &noise, &objective, &opt, |r| {
            log(&format!(
                "seed {seed} step {}/{}: policy action MSE {:.5}, |∇z0| mean {:.3e} norm {:.3e}, {:.2} s",
                r.iteration + 1,
                settings.iterations,
                r.loss,
                r.grad_z0.mean_abs,
                r.grad_z0.norm,
                r.seconds
            ));
            let rec = json!({"seed": seed, "record": r});
            if let Err(e) = metrics.write(&rec) {
                write_err.get_or_insert(e);
            }
        })?;
        if let Some(e) = write_err {
            return Err(e.context("writing metrics.jsonl"));
        }
        let grad0 =
            outcome.records.first().map(|r| r.grad_z0).unwrap_or(GradStats { mean_abs: 0.0, max_abs: 0.0, norm: 0.0 });
        log(&format!(
            "seed {seed}: policy action MSE to the expert — real frames {error_on_real_frames:.5}, generated before {:.5}, after {:.5} ({:+.5}, {:.1} s)",
            outcome.initial_loss,
            outcome.final_loss,
            outcome.final_loss - outcome.initial_loss,
            t0.elapsed().as_secs_f64()
        ));
        files.extend(write_seed_outputs(out_dir, seed, &clip.frames, &outcome.initial_output, &outcome.final_output)?);
        results.push(SeedResult {
            seed,
            error_on_real_frames,
            error_before: outcome.initial_loss,
            error_after: outcome.final_loss,
            grad_z0_norm_initial: grad0.norm,
            seconds: t0.elapsed().as_secs_f64(),
            iterations: outcome.records,
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    files.push("metrics.jsonl".into());
    files.push("report.json".into());
    let report = json!({
        "job": "policy stress test",
        "world_model": model.describe(),
        "world_model_config": model.cfg,
        "denoiser_is_analytic": false,
        "policy": policy_path.display().to_string(),
        "objective": "mean squared deviation of the policy's actions on generated frames 1..T-1 from the expert's actions (action units)",
        "settings": settings,
        "results": results,
        "all_seeds_increased": results.iter().all(|r| r.error_after > r.error_before),
        "seconds_total": seconds,
        "files": files,
    });
    shared::io::write_json_atomic(&out_dir.join("report.json"), &report)?;
    log(&format!("wrote {} to {} ({seconds:.1} s)", files.join(", "), out_dir.display()));
    Ok(StressSummary { results, files, seconds })
}

fn write_seed_outputs(
    dir: &Path,
    seed: u64,
    real: &Tensor,
    before: &Tensor,
    after: &Tensor,
) -> anyhow::Result<Vec<String>> {
    use crate::report::{frames_to_images, gif_bytes, grid, png_bytes};
    let scale = 4;
    let rows = vec![
        frames_to_images(real, 0, scale)?,
        frames_to_images(before, 0, scale)?,
        frames_to_images(after, 0, scale)?,
    ];
    let png = format!("seed{seed}_before_after.png");
    shared::io::write_atomic(&dir.join(&png), &png_bytes(&grid(&rows))?)?;
    let mut out = vec![png];
    for (stem, row) in [("before", &rows[1]), ("after", &rows[2])] {
        let gif = format!("seed{seed}_{stem}.gif");
        shared::io::write_atomic(&dir.join(&gif), &gif_bytes(row, 400)?)?;
        out.push(gif);
    }
    Ok(out)
}

/// Where the embedded weights live: `weights/` under the working directory, else the
/// workspace's (so `cargo run` works from any directory of a clone).
pub fn weights_dir() -> PathBuf {
    let local = PathBuf::from("weights");
    if local.join("world_model.safetensors").exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("weights")
}
