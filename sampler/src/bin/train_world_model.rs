//! `cargo run -p sampler --release --bin train-world-model` — trains the embedded pixel-space
//! world model on clips collected from the environment, evaluates it on held-out episodes
//! (PSNR of sampled predictions vs the copy-the-first-frame baseline), and writes
//! `weights/world_model.{safetensors,json}`, `weights/world_model_manifest.json` and
//! `docs/world-model-predictions.png`. Checkpoints and `metrics.jsonl` go to `--run-dir`.
//! Every argument and output is checked before anything runs: existing outputs are refused
//! unless `--overwrite` (the run directory is then replaced whole).
//!
//! This file parses and checks the flags and writes the manifest; the data collection, the
//! training loop and the held-out evaluation are library calls in [`sampler::world_model`]
//! (`collect_clips`, `train`, `evaluate`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use clap::Parser;
use sampler::solver::SolverKind;
use sampler::world_model::{
    collect_clips, evaluate, train, write_predictions_figure, DataSpec, EvalSettings, HeldOutEval, RunDir,
    TrainSettings, WorldModel, WorldModelConfig, P_MEAN_BOUND, P_STD_MAX,
};
use serde_json::json;
use sha2::Digest;

#[derive(Parser, Debug, serde::Serialize)]
#[command(about = "Train the embedded pixel-space Cosmos-DiT world model of the environment")]
struct Args {
    /// `medium` (the embedded model), `small` (the previous embedded model, 6× fewer
    /// parameters) or `tiny` (seconds; for tests).
    #[arg(long, default_value = "medium")]
    model: String,
    #[arg(long, default_value_t = TrainSettings::default().steps)]
    steps: usize,
    #[arg(long, default_value_t = TrainSettings::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainSettings::default().lr, allow_negative_numbers = true)]
    lr: f64,
    /// Training episodes (expert, medium, random in turn; seeds 1000…).
    #[arg(long, default_value_t = 120)]
    episodes: usize,
    /// Frames recorded per episode at most.
    #[arg(long, default_value_t = 40)]
    frames_per_episode: usize,
    /// Held-out evaluation episodes (seeds 9000…).
    #[arg(long, default_value_t = 6)]
    eval_episodes: usize,
    /// Evaluation clips sampled (spread over the held-out episodes).
    #[arg(long, default_value_t = 24)]
    eval_clips: usize,
    /// Solver steps when sampling predictions. Few steps ending at a high σ_min, then the
    /// clean pass D(x_N, σ_N), give near-posterior-mean predictions, which is what PSNR rewards
    /// and the stress test's setting (with the `small` model, 10 steps to σ = 0.002 measured
    /// 16.0 dB, below the copy baseline: sampling variance and drift at low σ).
    #[arg(long, default_value_t = 2)]
    eval_solver_steps: usize,
    /// euler | res | unipc
    #[arg(long, default_value = "res")]
    eval_solver: String,
    #[arg(long, default_value_t = 80.0, allow_negative_numbers = true)]
    eval_sigma_max: f64,
    /// Where the solver stops before the final clean pass D(x_N, σ_N).
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    eval_sigma_min: f64,
    /// Mean of ln σ in training (EDM's P_mean).
    #[arg(long, default_value_t = TrainSettings::default().p_mean, allow_negative_numbers = true)]
    p_mean: f64,
    /// Standard deviation of ln σ in training (EDM's P_std).
    #[arg(long, default_value_t = TrainSettings::default().p_std, allow_negative_numbers = true)]
    p_std: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads for tensor kernels (0: Candle's default). 1 by default: these kernels are
    /// small, and on a shared 2-core machine more threads mostly wait for each other.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where the final weights, config and manifest go.
    #[arg(long, default_value = "weights")]
    out_dir: PathBuf,
    /// Where the prediction PNG goes.
    #[arg(long, default_value = "docs/world-model-predictions.png")]
    figure: PathBuf,
    /// Checkpoints and metrics.
    #[arg(long, default_value = "out/world_model")]
    run_dir: PathBuf,
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    /// Only evaluate the model already in `--out-dir`: prints the figures, and rewrites
    /// `--figure` and the manifest's evaluation (which needs --overwrite, as they exist).
    #[arg(long)]
    eval_only: bool,
    /// Replace existing outputs: the weights, config and manifest in --out-dir, --figure, and
    /// --run-dir's contents (removed whole first). Without it, any of them existing is refused
    /// before anything runs.
    #[arg(long)]
    overwrite: bool,
}

impl Args {
    /// Every argument's range, all problems at once, before anything runs.
    fn check(&self, cfg: &WorldModelConfig) -> anyhow::Result<SolverKind> {
        let mut c = shared::checks::ArgChecks::new();
        c.count("--steps", self.steps as u64)
            .count("--batch-size", self.batch_size as u64)
            .positive("--lr", self.lr)
            .count("--episodes", self.episodes as u64)
            .count("--eval-episodes", self.eval_episodes as u64)
            .count("--eval-clips", self.eval_clips as u64)
            .count("--eval-solver-steps", self.eval_solver_steps as u64)
            .count("--checkpoint-every", self.checkpoint_every as u64)
            .positive("--eval-sigma-min", self.eval_sigma_min)
            .positive("--eval-sigma-max", self.eval_sigma_max);
        c.closed("--p-mean", self.p_mean, -P_MEAN_BOUND, P_MEAN_BOUND)
            .open_closed("--p-std", self.p_std, 0.0, P_STD_MAX);
        c.require(self.eval_sigma_min < self.eval_sigma_max, || {
            format!(
                "--eval-sigma-min ({}) must be below --eval-sigma-max ({})",
                self.eval_sigma_min, self.eval_sigma_max
            )
        });
        c.require(self.frames_per_episode >= cfg.frames, || {
            format!(
                "--frames-per-episode must be at least the clip length ({} frames), got {}",
                cfg.frames, self.frames_per_episode
            )
        });
        let solver = serde_json::from_value::<SolverKind>(json!(self.eval_solver));
        c.require(solver.is_ok(), || {
            format!("--eval-solver: unknown value '{}'; allowed: {}", self.eval_solver, SolverKind::ALLOWED.join(", "))
        });
        c.finish()?;
        Ok(solver?)
    }

    /// Lower bounds of what the data and a training step hold, refused when they cannot fit on
    /// `device`: every recorded frame of every episode lies in up to `frames` overlapping clips
    /// (f32), and each block's input is kept per batch clip for the backward.
    fn check_fits(&self, cfg: &WorldModelConfig, device: &candle_core::Device) -> anyhow::Result<()> {
        let clip: u128 = cfg.clip_shape().iter().map(|&d| d as u128).product();
        let frame = clip / cfg.frames as u128;
        let per_episode =
            (self.frames_per_episode as u128).saturating_mul(frame).saturating_mul(cfg.frames as u128 * 4);
        shared::checks::ensure_fits(
            device,
            (self.episodes as u128 + self.eval_episodes as u128).saturating_mul(per_episode),
            &format!(
                "the data of --episodes {} + --eval-episodes {} × --frames-per-episode {}",
                self.episodes, self.eval_episodes, self.frames_per_episode
            ),
        )?;
        let [pt, ph, pw] = cfg.dit.patch_size;
        let tokens = clip / 3 / (pt * ph * pw).max(1) as u128;
        let per_clip = tokens * cfg.dit.hidden_size() as u128 * 4 * (cfg.dit.num_layers as u128 + 1);
        shared::checks::ensure_fits(
            device,
            (self.batch_size as u128).saturating_mul(per_clip),
            &format!("--batch-size {} (at least {per_clip} bytes of block inputs per clip)", self.batch_size),
        )?;
        // The schedules of --eval-solver-steps: three f64 vectors of N + 1 values.
        shared::checks::ensure_fits(
            device,
            (self.eval_solver_steps as u128).saturating_add(1).saturating_mul(24),
            &format!("--eval-solver-steps {}", self.eval_solver_steps),
        )
    }

    /// The files this run writes, checked before any work: (flag, path).
    fn output_files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = vec![("--figure", self.figure.clone())];
        let manifest = ("--out-dir", self.out_dir.join("world_model_manifest.json"));
        if self.eval_only {
            // Re-measured figures go into an existing manifest only.
            if manifest.1.exists() {
                files.push(manifest);
            }
        } else {
            files.push(("--out-dir", self.out_dir.join(sampler::world_model::WEIGHTS_FILE)));
            files.push(("--out-dir", self.out_dir.join(sampler::world_model::CONFIG_FILE)));
            files.push(manifest);
        }
        files
    }
}

fn main() -> anyhow::Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    if args.threads > 0 {
        // Candle's CPU kernels size their thread pool from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let started = Instant::now();
    let device = shared::device::parse_device(&args.device).context("opening the device")?;
    let cfg = match args.model.as_str() {
        "small" => WorldModelConfig::small(),
        "medium" => WorldModelConfig::medium(),
        "tiny" => WorldModelConfig::tiny(),
        other => anyhow::bail!("--model: unknown value '{other}'; allowed: small, medium, tiny"),
    };
    // Every argument and output checked before any work.
    let eval_solver = args.check(&cfg)?;
    args.check_fits(&cfg, &device)?;
    for (flag, path) in args.output_files() {
        shared::outputs::check_output_file(&path, flag, args.overwrite)?;
    }
    let run_mode = shared::outputs::Existing::from_flags(args.overwrite, false)?;
    if !args.eval_only {
        shared::outputs::check_dir(&args.run_dir, "--run-dir", run_mode)?;
    }
    // --eval-only: the model to evaluate, loaded and checked before the data is collected.
    let existing = if args.eval_only { Some(WorldModel::load_dir(&args.out_dir, DType::F32, &device)?) } else { None };
    println!("device: {}", shared::device::describe(&device));

    // Data: training and held-out episodes never share a seed.
    let train_spec = DataSpec {
        episodes: args.episodes,
        first_seed: 1000,
        frames_per_episode: args.frames_per_episode,
        clip_spacing: 1,
    };
    let eval_spec = DataSpec {
        episodes: args.eval_episodes,
        first_seed: 9000,
        frames_per_episode: args.frames_per_episode,
        clip_spacing: cfg.frames,
    };
    let t_data = Instant::now();
    let train_clips = collect_clips(&cfg, &train_spec, &device)?;
    let eval_clips = collect_clips(&cfg, &eval_spec, &device)?.spread(args.eval_clips)?;
    println!(
        "data: {} training clips from {} episodes, {} held-out clips from {} episodes ({:.1} s); clip {:?}",
        train_clips.len(),
        args.episodes,
        eval_clips.len(),
        args.eval_episodes,
        t_data.elapsed().as_secs_f64(),
        cfg.clip_shape()
    );
    let eval_settings = EvalSettings {
        solver: eval_solver,
        solver_steps: args.eval_solver_steps,
        sigma_min: args.eval_sigma_min,
        sigma_max: args.eval_sigma_max,
        seed: args.seed,
    };
    let manifest_path = args.out_dir.join("world_model_manifest.json");

    if let Some(frozen) = existing {
        let eval = evaluate(&frozen, &eval_clips, &eval_settings, |line| println!("{line}"))?;
        write_predictions_figure(&args.figure, &eval_clips, &eval.predictions)?;
        // Re-measured figures replace the manifest's evaluation (the training record stays).
        if manifest_path.exists() {
            let text = std::fs::read_to_string(&manifest_path)
                .with_context(|| format!("reading {}", manifest_path.display()))?;
            let mut manifest: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
            manifest["eval"] = eval_record(&args, &eval);
            manifest["eval"]["command"] = json!(command_line());
            shared::io::write_json_atomic(&manifest_path, &manifest)?;
            println!("updated the evaluation in {} and {}", manifest_path.display(), args.figure.display());
        }
        return Ok(());
    }

    let settings = TrainSettings {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
        p_mean: args.p_mean,
        p_std: args.p_std,
        ..TrainSettings::default()
    };
    let run =
        RunDir { path: &args.run_dir, flag: "--run-dir", existing: run_mode, checkpoint_every: args.checkpoint_every };
    let trained = train(&cfg, &settings, &train_clips, &run, |line| println!("{line}"))?;

    // Save the frozen model and re-load it, so the evaluation sees exactly what ships.
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("--out-dir {}: creating it", args.out_dir.display()))?;
    let (weights_path, config_path) = trained.save(&args.out_dir)?;
    let frozen = WorldModel::load_dir(&args.out_dir, DType::F32, &device)?;

    let eval = evaluate(&frozen, &eval_clips, &eval_settings, |line| println!("{line}"))?;
    write_predictions_figure(&args.figure, &eval_clips, &eval.predictions)?;

    let bytes = std::fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    let sha256 = format!("{:x}", sha2::Sha256::digest(&bytes));
    let manifest = json!({
        "file": sampler::world_model::WEIGHTS_FILE,
        "config": sampler::world_model::CONFIG_FILE,
        "bytes": bytes.len(),
        "sha256": sha256,
        "parameters": trained.parameters,
        "command": command_line(),
        "args": args,
        "data": {
            "train": train_spec, "train_clips": train_clips.len(),
            "eval": eval_spec, "eval_clips": eval_clips.len(),
            "policies": "expert, medium (noisy expert), random, cycled over episodes",
            "frames": "three 32×32 camera renders box-downsampled to 16×16 and tiled (16×48 RGB in [-1, 1])",
        },
        "steps": args.steps,
        "final_loss_ema": trained.final_loss_ema,
        "train_seconds": trained.seconds,
        "eval": eval_record(&args, &eval),
        "device": shared::device::describe(&device),
        "seconds_total": started.elapsed().as_secs_f64(),
    });
    shared::io::write_json_atomic(&manifest_path, &manifest)?;
    println!(
        "wrote {} ({} bytes, sha256 {sha256}), {}, {}, {}",
        weights_path.display(),
        bytes.len(),
        config_path.display(),
        manifest_path.display(),
        args.figure.display()
    );
    Ok(())
}

/// This run's command, as the manifest records it.
fn command_line() -> String {
    format!(
        "cargo run -p sampler --release --bin train-world-model -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    )
}

/// The manifest's `eval` record: the held-out settings as requested and the figures.
fn eval_record(args: &Args, eval: &HeldOutEval) -> serde_json::Value {
    json!({
        "held_out_episodes": args.eval_episodes, "clips": args.eval_clips,
        "solver": args.eval_solver, "solver_steps": args.eval_solver_steps,
        "sigma_min": args.eval_sigma_min, "sigma_max": args.eval_sigma_max,
        "psnr_db": eval.psnr_db, "psnr_db_per_frame": eval.psnr_db_per_frame,
        "copy_first_frame_psnr_db": eval.copy_first_frame_psnr_db,
        "copy_first_frame_psnr_db_per_frame": eval.copy_first_frame_psnr_db_per_frame,
    })
}
