//! `sampler cosmos`: sample a Cosmos pipeline from a diffusers repository, and optionally
//! optimise its initial noise z0 through every denoising step and the VAE decode.
//!
//! The binary parses [`CosmosArgs`] and calls [`run`]; everything else is here. Outputs in the
//! output directory (refused when it is not empty, unless `--overwrite`): `video.safetensors`
//! (tensor `video`, (B, 3, F, H, W), f32 in [0, 1]), `latents.safetensors` (tensor `latents`, the
//! final normalised latents before decoding), `frames.png` (every frame), `video.gif`,
//! `report.json` (settings, timings, per-iteration loss and gradient statistics); with
//! `--iterations` > 0 also `before.png` / `before.gif` and the comparison `before_after.png`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};

use super::pipeline::{self, CosmosPipeline, GenerateRequest};
use super::vae::DecodedObjective;
use crate::noise::{NoiseState, NoiseTensor};
use crate::objective::{Objective, TargetMse};
use crate::optimize::{optimize, Direction, OptimizeSettings};
use crate::trajectory::GradMode;

/// The `cosmos` subcommand's arguments (diffusers' defaults where it has them).
#[derive(clap::Args, Debug, Clone)]
pub struct CosmosArgs {
    /// A diffusers pipeline repository: a local directory or `org/name[@revision]` from the
    /// Hugging Face cache (downloaded when missing and allowed; `HF_HUB_OFFLINE=1` forbids it).
    #[arg(long)]
    pub model: String,
    /// Conditioning image (PNG or GIF).
    #[arg(long, conflicts_with = "video")]
    pub image: Option<PathBuf>,
    /// Conditioning video: a directory of PNG frames, taken in name order.
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// Text prompt (needs the T5 text encoder: not available yet; use --prompt-embeds).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt (needs the T5 text encoder, like --prompt).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Safetensors with `prompt_embeds` (B, L, D) and optional `negative_prompt_embeds`.
    #[arg(long)]
    pub prompt_embeds: Option<PathBuf>,
    #[arg(long, default_value_t = 704)]
    pub height: usize,
    #[arg(long, default_value_t = 1280)]
    pub width: usize,
    #[arg(long, default_value_t = 93)]
    pub num_frames: usize,
    /// Denoising steps (diffusers' num_inference_steps; default the pipeline's own: 35 for
    /// Predict2, 36 for Predict2.5).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; applied when > 1, as diffusers.
    #[arg(long, default_value_t = 7.0)]
    pub guidance: f64,
    /// Frames per second passed to the transformer (temporal RoPE). Not passed unless given: the
    /// released checkpoints were trained without fps modulation (diffusers#14768).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Seed of the initial noise when --latents is not given.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Safetensors with tensor `latents`: the unit-variance initial noise (diffusers' `latents`).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// f32 | bf16 | f16 (default: bf16 on CUDA, f32 elsewhere).
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto | cpu | cuda[:N] | metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Output directory.
    #[arg(short = 'o', long = "out", default_value = "out/cosmos")]
    pub out: PathBuf,
    /// Replace the contents of a non-empty output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Optimisation iterations of z0 (0 = sample once).
    #[arg(long, default_value_t = 0)]
    pub iterations: usize,
    /// Adam learning rate of z0.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// ascent | descent of the objective.
    #[arg(long, default_value = "descent")]
    pub direction: String,
    /// Clip the gradient norm (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub grad_clip: f64,
    /// χ-norm regulariser weight (keeps z0 Gaussian-typical; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub chi_reg: f64,
    /// Objective: MSE of the video (in [0, 1]) to this safetensors' tensor `video` (B, 3, F, H, W).
    #[arg(long)]
    pub target_video: Option<PathBuf>,
    /// Predict2.5 with --video: latent frames that condition (1 or 2; the last 4(n − 1) + 1
    /// frames of the video are used). Default 2, as diffusers.
    #[arg(long)]
    pub condition_latent_frames: Option<usize>,
}

/// What the run measured.
#[derive(Debug, serde::Serialize)]
pub struct CosmosSummary {
    pub seconds_load: f64,
    pub seconds_sample: f64,
    pub initial_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub files: Vec<String>,
}

fn parse_dtype(arg: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match arg {
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("--dtype: unknown value '{other}'; allowed: f32, bf16, f16"),
    })
}

/// Refuses an output directory that holds anything unless `overwrite` — checked before any work,
/// so nothing is loaded or written for a run that would be refused.
fn check_out_dir(dir: &Path, overwrite: bool) -> anyhow::Result<()> {
    if dir.exists() {
        anyhow::ensure!(dir.is_dir(), "-o {}: exists and is not a directory", dir.display());
        anyhow::ensure!(
            overwrite || std::fs::read_dir(dir)?.next().is_none(),
            "-o {}: the directory is not empty; pass --overwrite to replace its contents, or choose another",
            dir.display()
        );
    }
    Ok(())
}

/// The output directory: created, or emptied first when `overwrite` — a new run never mixes with
/// an earlier one's files. Called once the inputs are loaded and checked.
fn prepare_out_dir(dir: &Path, overwrite: bool) -> anyhow::Result<()> {
    check_out_dir(dir, overwrite)?;
    if dir.exists() {
        anyhow::ensure!(dir.is_dir(), "-o {}: exists and is not a directory", dir.display());
        let non_empty = std::fs::read_dir(dir)?.next().is_some();
        if non_empty {
            anyhow::ensure!(
                overwrite,
                "-o {}: the directory is not empty; pass --overwrite to replace its contents, or choose another",
                dir.display()
            );
            std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// Every argument checked before anything is loaded or written.
fn validate(args: &CosmosArgs) -> anyhow::Result<()> {
    if args.prompt.is_some() || args.negative_prompt.is_some() {
        bail!(
            "--prompt / --negative-prompt need the T5 text encoder, which is not available yet: pass \
             --prompt-embeds FILE (safetensors with `prompt_embeds` and `negative_prompt_embeds`, e.g. \
             from diffusers' `pipe.encode_prompt`)"
        );
    }
    anyhow::ensure!(args.prompt_embeds.is_some(), "--prompt-embeds FILE is required (see --prompt)");
    anyhow::ensure!(args.image.is_some() || args.video.is_some(), "give a conditioning --image or --video");
    anyhow::ensure!(
        args.height > 0 && args.width > 0 && args.height.is_multiple_of(16) && args.width.is_multiple_of(16),
        "--height and --width must be positive multiples of 16, got {}×{}",
        args.height,
        args.width
    );
    // Cosmos DiTs cover at most 240 latent rows/columns (1920 px); far beyond is a typo.
    anyhow::ensure!(
        args.height <= 8192 && args.width <= 8192,
        "--height and --width must be at most 8192, got {}×{}",
        args.height,
        args.width
    );
    anyhow::ensure!((1..=10_000).contains(&args.num_frames), "--num-frames must be in 1..=10000");
    anyhow::ensure!(args.steps.is_none_or(|s| (2..=10_000).contains(&s)), "--steps must be in 2..=10000");
    anyhow::ensure!(
        args.condition_latent_frames.is_none_or(|n| n == 1 || n == 2),
        "--condition-latent-frames must be 1 or 2"
    );
    anyhow::ensure!(args.guidance.is_finite() && args.guidance >= 0.0, "--guidance must be finite and ≥ 0");
    anyhow::ensure!(args.fps.is_none_or(|f| f.is_finite() && f > 0.0), "--fps must be positive");
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be positive and finite");
    anyhow::ensure!(args.grad_clip.is_finite() && args.grad_clip >= 0.0, "--grad-clip must be ≥ 0");
    anyhow::ensure!(args.chi_reg.is_finite() && args.chi_reg >= 0.0, "--chi-reg must be ≥ 0");
    anyhow::ensure!(args.iterations <= 100_000, "--iterations must be at most 100000");
    if args.iterations > 0 {
        anyhow::ensure!(args.target_video.is_some(), "--iterations > 0 needs an objective: --target-video FILE");
    }
    let inputs = [
        ("--image", &args.image),
        ("--video", &args.video),
        ("--prompt-embeds", &args.prompt_embeds),
        ("--latents", &args.latents),
        ("--target-video", &args.target_video),
    ];
    for (flag, path) in inputs {
        if let Some(p) = path {
            anyhow::ensure!(p.exists(), "{flag} {}: no such file or directory", p.display());
        }
    }
    Ok(())
}

/// Runs `sampler cosmos`: samples (and optimises) and writes the outputs into `args.out`.
pub fn run(args: &CosmosArgs, mut log: impl FnMut(&str)) -> anyhow::Result<CosmosSummary> {
    validate(args)?;
    let direction = match args.direction.as_str() {
        "ascent" => Direction::Ascent,
        "descent" => Direction::Descent,
        other => bail!("--direction: unknown value '{other}'; allowed: ascent, descent"),
    };
    let device = shared::device::parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    check_out_dir(&args.out, args.overwrite)?;

    let started = Instant::now();
    log(&format!("loading {} ({dtype:?} on {})", args.model, shared::device::describe(&device)));
    let pipe = CosmosPipeline::load(&args.model, dtype, &device)?;
    let seconds_load = started.elapsed().as_secs_f64();
    let steps = args.steps.unwrap_or(pipe.kind.default_steps());
    pipe.check_size(args.num_frames, args.height, args.width)?;
    let conditioning = args.image.as_ref().or(args.video.as_ref()).context("conditioning")?;
    let video = pipeline::load_conditioning(conditioning, args.height, args.width, &device)?;
    let prompt_path = args.prompt_embeds.as_ref().context("--prompt-embeds")?;
    let (prompt, negative) = pipeline::read_prompt_embeds(prompt_path, &device)?;
    let shape = pipe.latent_shape(1, args.num_frames, args.height, args.width);
    let latents = match &args.latents {
        Some(path) => pipeline::read_latents(path, &shape, &device)?,
        None => shared::rng::SplitMix64::new(args.seed).normal_tensor(&shape[..], DType::F32, &device)?,
    };
    let req = GenerateRequest {
        video,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames: args.num_frames,
        steps,
        guidance: args.guidance,
        fps: args.fps,
        latents,
        condition_latent_frames: args.condition_latent_frames,
    };
    let prepared = pipe.prepare(&req)?;
    prepare_out_dir(&args.out, args.overwrite)?;
    let traj = prepared.trajectory();
    let z0 = req.latents.to_dtype(dtype)?;
    let mut files = Vec::new();
    let started = Instant::now();
    let (final_latents, initial_loss, final_loss, history) = if args.iterations == 0 {
        log(&format!("sampling: {steps} steps, guidance {}", args.guidance));
        (traj.sample(&z0, &vec![None; traj.num_steps()])?, None, None, Vec::new())
    } else {
        let target_path = args.target_video.as_ref().context("--target-video")?;
        let target = shared::weights::read_safetensors(target_path, &device)?
            .remove("video")
            .with_context(|| format!("{} has no tensor 'video'", target_path.display()))?;
        let expected = [1, 3, args.num_frames, args.height, args.width];
        anyhow::ensure!(
            target.dims() == expected,
            "{}: 'video' is {:?}, the run makes {:?}",
            target_path.display(),
            target.dims(),
            expected
        );
        let objective = DecodedObjective {
            vae: &pipe.vae,
            inner: TargetMse { target: target.to_dtype(dtype)?, label: target_path.display().to_string() },
        };
        let noise = NoiseState {
            z0: NoiseTensor::Learnable(Var::from_tensor(&z0)?),
            steps: vec![None; traj.num_steps()],
            from_z0: None,
        };
        let settings = OptimizeSettings {
            iterations: args.iterations,
            optimizer: shared::params::OptimizerConfig::adam(args.lr),
            direction,
            grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
            chi_reg: args.chi_reg,
            grad_mode: GradMode::Recompute,
        };
        log(&format!(
            "optimising z0 ({} iterations, {}) through {} steps and the VAE decode",
            args.iterations,
            objective.describe(),
            steps
        ));
        let mut history = Vec::new();
        let outcome = optimize(&traj, &noise, &objective, &settings, |r| {
            log(&format!("iteration {}: loss {:.6}, |∇z0| {:.3e}", r.iteration, r.loss, r.grad_z0.norm));
            history.push(serde_json::to_value(r).unwrap_or_default());
        })?;
        let before = pipe.decode_to_unit(&outcome.initial_output)?.affine(2.0, -1.0)?.to_dtype(DType::F32)?;
        let after = pipe.decode_to_unit(&outcome.final_output)?.affine(2.0, -1.0)?.to_dtype(DType::F32)?;
        files.extend(crate::report::write_frames(&args.out, "before", &before.to_device(&Device::Cpu)?)?);
        files.push(crate::report::write_comparison(
            &args.out,
            &before.to_device(&Device::Cpu)?,
            &after.to_device(&Device::Cpu)?,
        )?);
        (outcome.final_output, Some(outcome.initial_loss), Some(outcome.final_loss), history)
    };
    let video = pipe.decode_to_unit(&final_latents)?;
    let seconds_sample = started.elapsed().as_secs_f64();

    let save = |name: &str, key: &str, t: &Tensor| -> anyhow::Result<String> {
        let map =
            std::collections::HashMap::from([(key.to_string(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)]);
        shared::weights::save_tensors_atomic(&map, &args.out.join(name))?;
        Ok(name.to_string())
    };
    files.push(save("video.safetensors", "video", &video)?);
    files.push(save("latents.safetensors", "latents", &final_latents)?);
    let shown = video.affine(2.0, -1.0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    for f in crate::report::write_frames(&args.out, "frames", &shown)? {
        files.push(f);
    }
    let summary = CosmosSummary { seconds_load, seconds_sample, initial_loss, final_loss, files };
    let report = serde_json::json!({
        "model": pipe.repository,
        "pipeline": pipe.kind,
        "dtype": format!("{dtype:?}"),
        "device": shared::device::describe(&device),
        "height": args.height, "width": args.width, "num_frames": args.num_frames,
        "steps": steps, "guidance": args.guidance, "fps": args.fps,
        "scheduler": pipe.scheduler,
        "seed": args.seed, "latents": args.latents, "prompt_embeds": args.prompt_embeds,
        "iterations": args.iterations, "lr": args.lr, "direction": args.direction,
        "sigmas": prepared.schedule.sigmas,
        "history": history,
        "summary": &summary,
    });
    shared::io::write_json_atomic(&args.out.join("report.json"), &report)?;
    log(&format!("wrote {} ({} s load, {:.2} s sampling)", args.out.display(), seconds_load.round(), seconds_sample));
    Ok(summary)
}
