//! The policy stress test: generate the world's next frames with a world model, feed them to
//! the exported LAPO policy, and optimise z0 so the policy's actions deviate as much as possible
//! (ascent) — or as little as possible (descent) — from the reference actions; over many
//! scenarios, with the noise kept where the world model's training distribution is.
//!
//! * [`scenario`]: what a scenario is, where they come from (20 held-out episodes by default, a
//!   JSONL file, seeds) and `--shard i/n`.
//! * Per scenario: the environment is reset with its episode seed and the scripted expert acts
//!   for `start_frame` frames; the next `frames` frames (with the expert's actions and the joint
//!   states) form the real clip. The world model is conditioned on its first frame and the
//!   actions; the policy sees each generated frame (frames 1…T−1) with the real joint state at
//!   that frame, and its action is compared with the expert's action there ([`policy`]).
//! * Realism: the search's noise is constrained (`NoiseConstraint`: renormalisation to the
//!   initial norm, a trust region around it; and the χ regulariser), and each result records a
//!   realism measure that does not come from the policy — the world model's own denoising PSNR
//!   on the frames — for the real clip and the samples before and after.
//! * [`report`]: one result file per scenario, written when it finishes (`--resume` skips them);
//!   `sampler stress-report DIR` merges a run's (or its shards') results into a summary table and
//!   a ranked gallery of the worst failures.
//!
//! The search runs against the small [`StressWorld`] interface, which the embedded world model
//! implements.

pub mod cosmos_world;
pub mod policy;
pub mod report;
pub mod scenario;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use shared::params::OptimizerConfig;

pub use cosmos_world::CosmosWorld;
pub use policy::{bilinear_matrix, load_policy, LapoFramePolicy};
pub use report::ScenarioResult;
pub use scenario::{Scenario, ScenarioSource, Shard};

use crate::denoiser::{Conditioning, Denoiser};
use crate::noise::{Churn, NoiseMode, NoiseState};
use crate::objective::{Objective, PolicyObjective};
use crate::optimize::{optimize, Direction, GradStats, NoiseConstraint, OptimizeSettings};
use crate::schedule::Schedule;
use crate::solver::{Solver, SolverKind};
use crate::trajectory::{GradMode, Trajectory};
use crate::world_model::{collect_clips, Clips, DataSpec, WorldModel};

/// Noise levels of the realism measure (one-shot denoising PSNR, averaged): where the embedded
/// model's denoising is informative (29.8 dB at σ = 0.1, 24.5 at 0.3, 18.4 at 80 on real clips,
/// `weights/README.md`) and a frame's defects show.
pub const REALISM_SIGMAS: [f64; 2] = [0.3, 1.0];

/// What the stress test runs. The defaults are the measured ones (see `sampler/README.md`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StressSettings {
    pub scenarios: ScenarioSource,
    /// Expert frames before a generated scenario's clip starts (so the arms are moving).
    pub start_frame: usize,
    pub iterations: usize,
    pub lr: f64,
    pub direction: Direction,
    pub solver: SolverKind,
    pub num_steps: usize,
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// Projections of z0 after every update (realism).
    pub constraint: NoiseConstraint,
    /// χ-norm regulariser weight (ReNO; 0 = off).
    pub chi_reg: f64,
    /// Run only this shard of the scenarios.
    pub shard: Option<Shard>,
    /// Scenarios in the gallery of the report.
    pub top: usize,
}

impl Default for StressSettings {
    fn default() -> Self {
        Self {
            scenarios: ScenarioSource::default(),
            start_frame: scenario::DEFAULT_START_FRAME,
            iterations: 12,
            lr: 0.05,
            direction: Direction::Ascent,
            solver: SolverKind::Res,
            // The world model's evaluated setting (weights/README.md): 2 RES steps from σ = 80
            // to 3, then the clean pass.
            num_steps: 2,
            sigma_min: 3.0,
            sigma_max: 80.0,
            constraint: DEFAULT_CONSTRAINT,
            chi_reg: 0.0,
            shard: None,
            top: 8,
        }
    }
}

/// The default realism constraint: a trust region of 0.05·√d around the initial z0. Measured over
/// the 20 default scenarios (`sampler/README.md`): it keeps the frames' PSNR to the nearest real
/// training frame within 0.05 dB of the unoptimised samples' (22.35 against 22.40 dB; the real
/// held-out clips' own: 20.90) while the policy's error still rises on every scenario (mean
/// 0.034 → 0.050); unconstrained, the error rises further (→ 0.126) but the frames drift 2.2 dB
/// from anything real, and renormalisation alone barely helps (‖z0‖/√d moves only to 1.04).
/// A trust region of 0.1 doubles the error but drifts 0.59 dB, past the 0.5 dB bound.
pub const DEFAULT_CONSTRAINT: NoiseConstraint = NoiseConstraint { renormalise: false, trust_region: Some(0.05) };

impl StressSettings {
    /// Every setting's range, named by the `sampler` flag that sets it (all problems at once).
    pub fn checks(&self) -> shared::checks::ArgChecks {
        let mut c = shared::checks::ArgChecks::new();
        c.count("--iterations", self.iterations as u64)
            .count("--num-steps", self.num_steps as u64)
            .count("--top", self.top as u64)
            .positive("--lr", self.lr)
            .positive("sigma_min", self.sigma_min)
            .positive("sigma_max", self.sigma_max);
        if let Some(r) = self.constraint.trust_region {
            c.positive("--trust-region", r);
        }
        c.require(self.chi_reg.is_finite() && self.chi_reg >= 0.0, || {
            format!("--chi-reg must be ≥ 0, got {}", self.chi_reg)
        });
        c.require(self.sigma_min < self.sigma_max, || {
            format!("sigma_min ({}) must be below sigma_max ({})", self.sigma_min, self.sigma_max)
        });
        c
    }

    /// The settings that shape a scenario's result: a resumed run and a merged report must share
    /// them (which scenarios, the shard and the gallery size do not matter).
    pub fn result_settings(&self) -> serde_json::Value {
        json!({
            "iterations": self.iterations, "lr": self.lr, "direction": self.direction,
            "solver": self.solver, "num_steps": self.num_steps,
            "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
            "constraint": self.constraint, "chi_reg": self.chi_reg,
            "realism_sigmas": REALISM_SIGMAS,
        })
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

/// A trajectory generating frames from z0: what a [`StressWorld`] hands the search.
pub struct Generator<'a> {
    pub denoiser: Box<dyn Denoiser + 'a>,
    pub cond: Conditioning,
    pub schedule: Schedule,
    pub solver: Box<dyn Solver>,
    /// Shape of z0.
    pub z0_shape: Vec<usize>,
}

/// What the stress test needs from a world model: the real clip of a scenario, a trajectory
/// that generates its frames from z0, and a realism measure of frames that does not come from
/// the policy. The embedded [`WorldModel`] implements it; its sample is the frames themselves.
pub trait StressWorld {
    fn describe(&self) -> String;
    /// For the report.
    fn config_json(&self) -> serde_json::Value;
    /// The side of one camera view in the generated frames (frames are H × 3H).
    fn view_size(&self) -> usize;
    /// Frames per clip.
    fn frames(&self) -> usize;
    /// The scenario's real clip: frames (1, 3, T, H, 3H) in [−1, 1], actions (1, T, A), joint
    /// states (1, T, S).
    fn real_clip(&self, scenario: &Scenario, device: &Device) -> anyhow::Result<Clips>;
    /// The trajectory generating a clip from `real`'s first frame and `actions` (1, T, A).
    fn generator<'a>(
        &'a self,
        real: &Clips,
        actions: &Tensor,
        settings: &StressSettings,
    ) -> anyhow::Result<Generator<'a>>;
    /// Realism of `frames` (1, 3, T, H, 3H) — frame 0 the given one — in dB, higher being
    /// more like the model's training data (`None` where the world has no such measure).
    fn realism(&self, frames: &Tensor, real: &Clips, actions: &Tensor) -> anyhow::Result<Option<f64>>;
    /// The frames (1, 3, T, H, 3H) in [−1, 1] of a final sample of [`Self::generator`] (the
    /// embedded model samples frames; a latent model decodes).
    fn frames_of(&self, sample: &Tensor) -> anyhow::Result<Tensor> {
        Ok(sample.clone())
    }
    /// The policy objective (on frames in [−1, 1]) as an objective on the generator's samples.
    fn objective<'b>(&'b self, on_frames: PolicyObjective<LapoFramePolicy>) -> Box<dyn Objective + 'b> {
        Box::new(on_frames)
    }
    /// Whether the world is conditioned on actions (a scenario's `actions` are refused for one
    /// that is not, rather than silently unused).
    fn takes_actions(&self) -> bool {
        true
    }
    /// PSNR (dB) of frames 1.. to their nearest frames in a bank of real frames from the
    /// model's training data (`None` where the world has no such bank).
    fn nearest_real(&self, _frames: &Tensor) -> anyhow::Result<Option<f64>> {
        Ok(None)
    }
}

/// Episodes of the embedded world model's training data (seeds 1000–1059) whose frames make
/// the bank of [`EmbeddedWorld::nearest_real`]: the first 30, 30 frames each (900 frames).
pub const BANK_FIRST_SEED: u64 = 1000;
pub const BANK_EPISODES: usize = 30;
pub const BANK_FRAMES_PER_EPISODE: usize = 30;

/// Real frames of the embedded world model's training episodes, flattened (M, D) in [−1, 1]:
/// what the nearest-real-frame measure compares with.
pub struct FrameBank(Tensor);

impl FrameBank {
    /// The frames of [`BANK_EPISODES`] episodes from [`BANK_FIRST_SEED`], rendered as `cfg`'s.
    pub fn collect(cfg: &crate::world_model::WorldModelConfig, device: &Device) -> anyhow::Result<Self> {
        let spec = DataSpec {
            episodes: BANK_EPISODES,
            first_seed: BANK_FIRST_SEED,
            frames_per_episode: BANK_FRAMES_PER_EPISODE,
            clip_spacing: cfg.frames,
        };
        let clips = collect_clips(cfg, &spec, device)?;
        let (n, c, t, h, w) = clips.frames.dims5()?;
        Ok(Self(clips.frames.permute((0, 2, 1, 3, 4))?.reshape((n * t, c * h * w))?.to_dtype(DType::F32)?))
    }

    /// PSNR (pixels in [0, 1]) of the mean, over frames 1.. of `frames` (B, 3, T, H, W), of
    /// each frame's smallest MSE to a bank frame.
    pub fn nearest_db(&self, frames: &Tensor) -> anyhow::Result<f64> {
        let (b, c, t, h, w) = frames.dims5()?;
        let x = frames.narrow(2, 1, t - 1)?.permute((0, 2, 1, 3, 4))?.reshape((b * (t - 1), c * h * w))?;
        let x = x.detach().to_dtype(DType::F32)?;
        anyhow::ensure!(x.dim(1)? == self.0.dim(1)?, "frames of {c}×{h}×{w} against a bank of another size");
        let d = (c * h * w) as f64;
        // ‖x − y‖² = ‖x‖² + ‖y‖² − 2 x·y, for every pair at once.
        let xx = x.sqr()?.sum_keepdim(1)?;
        let yy = self.0.sqr()?.sum_keepdim(1)?.t()?;
        let xy = x.matmul(&self.0.t()?)?;
        let dist = xx.broadcast_add(&yy)?.broadcast_sub(&(xy * 2.0)?)?;
        let nearest = dist.min(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        // [−1, 1] → [0, 1] scales squared errors by 1/4.
        let mse = nearest.iter().map(|v| v.max(0.0) / d * 0.25).sum::<f64>() / nearest.len() as f64;
        Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
    }
}

/// The embedded world model as a [`StressWorld`], with the bank of real frames its
/// nearest-frame realism measure compares with.
pub struct EmbeddedWorld<'a> {
    pub model: &'a WorldModel,
    bank: FrameBank,
}

impl<'a> EmbeddedWorld<'a> {
    pub fn new(model: &'a WorldModel, device: &Device) -> anyhow::Result<Self> {
        Ok(Self { model, bank: FrameBank::collect(&model.cfg, device)? })
    }
}

impl StressWorld for EmbeddedWorld<'_> {
    fn describe(&self) -> String {
        self.model.describe()
    }
    fn config_json(&self) -> serde_json::Value {
        self.model.config_json()
    }
    fn view_size(&self) -> usize {
        self.model.cfg.view_size
    }
    fn frames(&self) -> usize {
        self.model.cfg.frames
    }
    fn real_clip(&self, scenario: &Scenario, device: &Device) -> anyhow::Result<Clips> {
        self.model.real_clip(scenario, device)
    }
    fn generator<'b>(
        &'b self,
        real: &Clips,
        actions: &Tensor,
        settings: &StressSettings,
    ) -> anyhow::Result<Generator<'b>> {
        self.model.generator(real, actions, settings)
    }
    fn realism(&self, frames: &Tensor, real: &Clips, actions: &Tensor) -> anyhow::Result<Option<f64>> {
        self.model.realism(frames, real, actions)
    }

    fn nearest_real(&self, frames: &Tensor) -> anyhow::Result<Option<f64>> {
        Ok(Some(self.bank.nearest_db(frames)?))
    }
}

impl StressWorld for WorldModel {
    fn describe(&self) -> String {
        WorldModel::describe(self)
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }

    fn view_size(&self) -> usize {
        self.cfg.view_size
    }

    fn frames(&self) -> usize {
        self.cfg.frames
    }

    fn real_clip(&self, scenario: &Scenario, device: &Device) -> anyhow::Result<Clips> {
        expert_clip(self, scenario.episode_seed, scenario.start_frame, device)
    }

    fn generator<'a>(
        &'a self,
        real: &Clips,
        actions: &Tensor,
        settings: &StressSettings,
    ) -> anyhow::Result<Generator<'a>> {
        Ok(Generator {
            denoiser: Box::new(self.denoiser()),
            cond: self.conditioning(&real.frames, actions)?,
            schedule: Schedule::karras(settings.num_steps, settings.sigma_min, settings.sigma_max, 7.0)?,
            solver: settings.solver.build(),
            z0_shape: real.frames.dims().to_vec(),
        })
    }

    /// The mean one-shot denoising PSNR over [`REALISM_SIGMAS`] (fixed noise, seed 0).
    fn realism(&self, frames: &Tensor, real: &Clips, actions: &Tensor) -> anyhow::Result<Option<f64>> {
        let clips = Clips {
            frames: frames.clone(),
            actions: actions.clone(),
            states: real.states.clone(),
            origin: real.origin.clone(),
        };
        let per_sigma = crate::world_model::denoising_psnr(self, &clips, &REALISM_SIGMAS, 0)?;
        Ok(Some(per_sigma.iter().map(|(_, db)| db).sum::<f64>() / per_sigma.len() as f64))
    }
}

/// The expert clip for `seed` starting at `start_frame` (one episode).
pub fn expert_clip(model: &WorldModel, seed: u64, start_frame: usize, device: &Device) -> anyhow::Result<Clips> {
    expert_clip_as(&model.cfg, seed, start_frame, device)
}

/// [`expert_clip`] rendered and cut as `cfg` says (frames per clip, view size, stride).
pub fn expert_clip_as(
    cfg: &crate::world_model::WorldModelConfig,
    seed: u64,
    start_frame: usize,
    device: &Device,
) -> anyhow::Result<Clips> {
    let spec = DataSpec {
        episodes: 1,
        first_seed: seed,
        frames_per_episode: start_frame + cfg.frames,
        clip_spacing: start_frame.max(1),
    };
    // Episode 0 of a collection is the scripted expert's.
    let clips = collect_clips(cfg, &spec, device)?;
    let last = clips.len() - 1;
    anyhow::ensure!(clips.origin[last].1 == start_frame, "episode {seed} ended before frame {start_frame}");
    Ok(clips.select(&[last])?)
}

/// What a run did.
pub struct StressSummary {
    /// This run's (or shard's) scenarios' results, in run order: computed or, with `--resume`,
    /// read back.
    pub results: Vec<ScenarioResult>,
    /// How many were read back rather than computed.
    pub resumed: usize,
    pub files: Vec<String>,
    pub seconds: f64,
}

/// Runs the stress test of the embedded world model on the CPU into `out_dir` (see [`run_on`]).
pub fn run(
    model: &WorldModel,
    policy_path: &Path,
    settings: &StressSettings,
    out_dir: &Path,
    log: impl FnMut(&str),
) -> anyhow::Result<StressSummary> {
    let world = EmbeddedWorld::new(model, &Device::Cpu)?;
    run_on(&world, policy_path, settings, &Device::Cpu, out_dir, log)
}

/// Runs every scenario of `settings` (its shard's, with `--shard`) on `device` — the device
/// `world` was loaded on — writing one result per scenario into `out_dir` as it finishes
/// (results already there with the same settings are kept and skipped: `--resume`), then
/// `report.json`, and without a shard the report (`report/`: summary table and gallery).
pub fn run_on<W: StressWorld>(
    world: &W,
    policy_path: &Path,
    settings: &StressSettings,
    device: &Device,
    out_dir: &Path,
    mut log: impl FnMut(&str),
) -> anyhow::Result<StressSummary> {
    let started = Instant::now();
    let device = device.clone();
    // Everything checked before the first write.
    settings.checks().finish()?;
    let all = settings.scenarios.scenarios(settings.start_frame)?;
    let mine = match settings.shard {
        Some(shard) => shard.select(&all),
        None => all.clone(),
    };
    if !world.takes_actions() {
        if let Some(s) = mine.iter().find(|s| s.actions.is_some()) {
            anyhow::bail!(
                "scenario {}: `actions` condition the embedded world model; {} is not conditioned on actions",
                s.id,
                world.describe()
            );
        }
    }
    let result_settings = settings.result_settings();
    let mut done = std::collections::BTreeMap::new();
    for s in &mine {
        let path = report::result_path(out_dir, &s.id);
        if path.exists() {
            let r = report::read_result(&path)?;
            anyhow::ensure!(
                r.settings == result_settings && r.scenario == *s,
                "{}: made with other settings or another scenario than this run's; resume with the same                  settings, or start a new -o directory",
                path.display()
            );
            done.insert(s.id.clone(), r);
        }
    }
    let policy = load_policy(policy_path, &device)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    log(&format!("world model: {}", world.describe()));
    log(&format!(
        "{} scenario(s){}{}; constraint: {}, χ-regulariser {}",
        mine.len(),
        settings.shard.map(|s| format!(" (shard {}/{} of {})", s.index, s.count, all.len())).unwrap_or_default(),
        if done.is_empty() { String::new() } else { format!(", {} already finished (skipped)", done.len()) },
        settings.constraint.describe(),
        settings.chi_reg
    ));
    let mut metrics = shared::metrics::JsonlWriter::append(&out_dir.join("metrics.jsonl"))?;
    let mut results = Vec::new();
    let mut resumed = 0;
    for scenario in &mine {
        if let Some(r) = done.remove(&scenario.id) {
            results.push(r);
            resumed += 1;
            continue;
        }
        let r = run_scenario(world, &policy, scenario, settings, &device, out_dir, &mut metrics, &mut log)?;
        results.push(r);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut files = vec!["scenarios/".to_string(), "metrics.jsonl".into(), "report.json".into()];
    let job = json!({
        "job": "policy stress test",
        "world_model": world.describe(),
        "world_model_config": world.config_json(),
        "denoiser_is_analytic": false,
        "policy": policy_path.display().to_string(),
        "objective": "mean squared deviation of the policy's actions on generated frames 1..T-1 from the expert's actions (action units)",
        "realism": "the world model's one-shot denoising PSNR (dB) on frames 1..T-1, mean over REALISM_SIGMAS",
        "nearest_real": "PSNR (dB) of frames 1..T-1 to their nearest frames among real frames of the world model's training episodes",
        "settings": settings,
        "scenario_ids": mine.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        "resumed": resumed,
        "seconds_total": seconds,
    });
    shared::io::write_json_atomic(&out_dir.join("report.json"), &job)?;
    if settings.shard.is_none() {
        let collected = report::collect(out_dir)?;
        let report_dir = out_dir.join(report::REPORT_DIR);
        for f in report::write_report(&collected, &report_dir, settings.top)? {
            files.push(format!("{}/{f}", report::REPORT_DIR));
        }
        log(&report::markdown(&report::summary(&results)));
    } else {
        log("shard finished: merge the shards with `sampler stress-report DIR` (DIR: the -o directory)");
    }
    log(&format!("wrote {} to {} ({seconds:.1} s)", files.join(", "), out_dir.display()));
    Ok(StressSummary { results, resumed, files, seconds })
}

fn db(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.2}"))
}

/// ‖v‖/√d.
fn rms(t: &Tensor) -> anyhow::Result<f64> {
    let d = t.elem_count() as f64;
    Ok((t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()? / d).sqrt())
}

/// One scenario: the real clip, the search, the realism measures; its result and clips are
/// written into `out_dir` before this returns.
#[allow(clippy::too_many_arguments)]
fn run_scenario<W: StressWorld>(
    world: &W,
    policy: &rl::policy::ExportedPolicy,
    scenario: &Scenario,
    settings: &StressSettings,
    device: &Device,
    out_dir: &Path,
    metrics: &mut shared::metrics::JsonlWriter,
    log: &mut impl FnMut(&str),
) -> anyhow::Result<ScenarioResult> {
    let t0 = Instant::now();
    let id = &scenario.id;
    let clip = world.real_clip(scenario, device).with_context(|| format!("scenario {id}"))?;
    let frame_policy = LapoFramePolicy::new(policy.clone(), &clip.states, world.view_size(), device)?;
    let t = world.frames();
    let on_frames =
        PolicyObjective { policy: frame_policy, reference_actions: clip.actions.narrow(1, 1, t - 1)?.contiguous()? };
    let error_on_real_frames = shared::gradcheck::scalar_f64(&on_frames.loss(&clip.frames)?)?;
    let objective = world.objective(on_frames);
    let actions = match &scenario.actions {
        None => clip.actions.clone(),
        Some(_) if !world.takes_actions() => anyhow::bail!(
            "scenario {id}: `actions` condition the embedded world model; {} is not conditioned on actions",
            world.describe()
        ),
        Some(rows) => {
            let a = clip.actions.dim(2)?;
            anyhow::ensure!(
                rows.len() == t - 1 && rows.iter().all(|r| r.len() == a),
                "scenario {id}: actions must be {} rows of {a} values (one per transition), got {} rows",
                t - 1,
                rows.len()
            );
            // The last frame's action is the reference's only (it conditions nothing).
            let mut flat: Vec<f32> = rows.iter().flatten().copied().collect();
            flat.extend(clip.actions.narrow(1, t - 1, 1)?.flatten_all()?.to_vec1::<f32>()?);
            Tensor::from_vec(flat, (1, t, a), device)?
        }
    };
    let gen = world.generator(&clip, &actions, settings)?;
    let plan = Churn::default().plan(&gen.schedule.sigmas, false);
    let noise =
        NoiseState::draw(scenario.noise_seed(), &gen.z0_shape, &plan, NoiseMode::Ode, true, DType::F32, device)?;
    let z0_initial = noise.z0.tensor().copy()?;
    let traj = Trajectory {
        denoiser: gen.denoiser.as_ref(),
        solver: gen.solver.as_ref(),
        cond: &gen.cond,
        schedule: gen.schedule.clone(),
        plan,
    };
    let opt = OptimizeSettings {
        iterations: settings.iterations,
        optimizer: OptimizerConfig::adam(settings.lr),
        direction: scenario.direction.unwrap_or(settings.direction),
        grad_clip: None,
        chi_reg: settings.chi_reg,
        grad_mode: GradMode::Recompute,
        constraint: settings.constraint,
    };
    let mut write_err = None;
    let outcome = optimize(&traj, &noise, objective.as_ref(), &opt, |r| {
        let rec = json!({"scenario": id, "record": r});
        if let Err(e) = metrics.write(&rec) {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.context("writing metrics.jsonl"));
    }
    let z0_final = noise.z0.tensor();
    let grad0 =
        outcome.records.first().map(|r| r.grad_z0).unwrap_or(GradStats { mean_abs: 0.0, max_abs: 0.0, norm: 0.0 });
    let (before, after) = (world.frames_of(&outcome.initial_output)?, world.frames_of(&outcome.final_output)?);
    let realism_real = world.realism(&clip.frames, &clip, &actions)?;
    let realism_before = world.realism(&before, &clip, &actions)?;
    let realism_after = world.realism(&after, &clip, &actions)?;
    let nearest_real_real = world.nearest_real(&clip.frames)?;
    let nearest_real_before = world.nearest_real(&before)?;
    let nearest_real_after = world.nearest_real(&after)?;
    let result = ScenarioResult {
        scenario: scenario.clone(),
        settings: settings.result_settings(),
        error_on_real_frames,
        error_before: outcome.initial_loss,
        error_after: outcome.final_loss,
        realism_real,
        realism_before,
        realism_after,
        nearest_real_real,
        nearest_real_before,
        nearest_real_after,
        z0_rms_before: rms(&z0_initial)?,
        z0_rms_after: rms(&z0_final)?,
        z0_moved: rms(&(&z0_final - &z0_initial)?)?,
        grad_z0_norm_initial: grad0.norm,
        seconds: t0.elapsed().as_secs_f64(),
        iterations: outcome.records,
    };
    log(&format!(
        "scenario {id}: policy action MSE to the expert — real frames {error_on_real_frames:.5}, generated before {:.5}, after {:.5} ({:+.5}); denoising PSNR {} → {} dB (real {}); nearest real frame {} → {} dB (real {}); ‖z0‖/√d {:.3}, moved {:.3} ({:.1} s)",
        result.error_before,
        result.error_after,
        result.error_after - result.error_before,
        db(realism_before),
        db(realism_after),
        db(realism_real),
        db(nearest_real_before),
        db(nearest_real_after),
        db(nearest_real_real),
        result.z0_rms_after,
        result.z0_moved,
        result.seconds
    ));
    report::write_result(out_dir, &result, &clip.frames, &before, &after)?;
    Ok(result)
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
