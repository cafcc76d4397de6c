//! `sampler cosmos`: sample a Cosmos pipeline from a diffusers repository, and optionally
//! optimise its initial noise z0 through every denoising step and the VAE decode.
//!
//! The binary parses [`CosmosArgs`] and calls [`run`]; everything else is here. Outputs in the
//! output directory (refused when it is not empty, unless `--overwrite`): `video.safetensors`
//! (tensor `video`, (B, 3, F, H, W), f32 in [0, 1]), `latents.safetensors` (tensor `latents`, the
//! final normalised latents before decoding), `frames.png` (every frame), `video.gif`,
//! `report.json` (settings, timings, per-iteration loss and gradient statistics), `video.mp4`
//! (H.264; if encoding fails the run still succeeds and the report says why); with
//! `--iterations` > 0 also `before.png` / `before.gif` and the comparison `before_after.png`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};

use super::memory_plan::{MemoryPlan, PlanRequest};
use super::params_file;
use super::pipeline::{self, CosmosPipeline, GenerateRequest, PipelineKind};
use super::vae::DecodedObjective;
use crate::noise::{Churn, ChurnPlan, NoiseMode, NoiseState, NoiseTensor};
use crate::objective::{Objective, TargetMse};
use crate::optimize::{gradcheck_eps, optimize, verify_gradient, Direction, OptimizeSettings};
use crate::schedule::Schedule;
use crate::trajectory::{GradMode, Trajectory};
use shared::device::describe;

/// The `cosmos` subcommand's arguments (diffusers' defaults where it has them).
#[derive(clap::Args, Debug, Clone)]
pub struct CosmosArgs {
    /// A diffusers pipeline repository: a local directory or `org/name[@revision]` from the
    /// Hugging Face cache (downloaded when missing and allowed; `HF_HUB_OFFLINE=1` forbids it).
    #[arg(long)]
    pub model: String,
    /// Conditioning image (PNG, JPEG, or a GIF's first frame).
    #[arg(long, conflicts_with = "video")]
    pub image: Option<PathBuf>,
    /// Conditioning video: a folder of frames (PNG/JPEG/GIF, name order, all one size), an
    /// animated GIF (every frame) or an H.264 MP4 (other codecs: convert to a frame folder with
    /// `ffmpeg -i clip.mp4 frames/%05d.png`). Frames are resized to --height × --width.
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// Text prompt, encoded by the repository's T5 encoder (Predict2; its tokenizer/ needs a
    /// tokenizer.json: scripts/cosmos_tokenizer_json.py makes one). Predict2.5's Qwen2.5-VL
    /// encoder is not ported: use --prompt-embeds from scripts/cosmos_prompt_embeds.py.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt with --prompt (default: diffusers' Cosmos-Predict2 negative prompt).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Safetensors with `prompt_embeds` (B, L, D) and optional `negative_prompt_embeds` (a path or
    /// a Hub reference `org/name[@revision]:file`).
    #[arg(long)]
    pub prompt_embeds: Option<PathBuf>,
    #[arg(long, default_value_t = 704)]
    pub height: usize,
    #[arg(long, default_value_t = 1280)]
    pub width: usize,
    /// Frames to generate (default 93). Transfer2.5: the most frames to output (diffusers'
    /// num_frames; default all the control videos' frames), in chunks of --chunk-frames.
    #[arg(long)]
    pub num_frames: Option<usize>,
    /// Denoising steps (diffusers' num_inference_steps; default the pipeline's own: 35 for
    /// Predict2, 36 for Predict2.5).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; applied when > 1, as diffusers (default the pipeline's
    /// own: 7 for Predict2 and Predict2.5, 3 for Transfer2.5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Frames per second passed to the transformer (temporal RoPE). Not passed unless given: the
    /// released checkpoints were trained without fps modulation (diffusers#14768).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Seed of the initial noise when --latents is not given.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Safetensors with tensor `latents`: the unit-variance initial noise (diffusers' `latents`);
    /// a path or a Hub reference.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// f32 | bf16 | f16 (default: bf16 on CUDA, f32 elsewhere).
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto | cpu | cuda[:N] | metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Output directory: refused when it holds anything unless --overwrite. Without -o each run
    /// writes a new out/cosmos/run-NNN.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Replace the contents of a non-empty -o directory (removed whole first).
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
    /// Params file: Cosmos-Predict2.5's inference JSON (`prompt`/`prompt_path`,
    /// `negative_prompt`, `inference_type` + `input_path`, `num_output_frames`, `num_steps`,
    /// `guidance`, `seed`, `resolution` "H,W", `name`) and the source system's `learn_noise`,
    /// `noise_steps`, `noise_lr`, `learnable_step_noise`. Flags given on the command line win
    /// over the file's values. Unknown fields are an error.
    #[arg(short = 'i', long = "input")]
    pub params: Option<PathBuf>,
    /// Keep only the last N frames of --video (default: all; the pipeline conditions on at most
    /// --num-frames of them).
    #[arg(long)]
    pub video_frames: Option<usize>,
    /// ode (diffusers' deterministic sampler) | sde (churn with step noises drawn from --seed,
    /// fixed) | sde-learnable (step noises optimised with z0) | sde-from-z0 (step noises ξ_i =
    /// Q_i z0, z0 the only learned tensor). The sde modes add EDM/Cosmos churn before every step
    /// (η = min(S_churn/(N+1), √1.2 − 1)); any of them departs from diffusers' sampler.
    #[arg(long, default_value = "ode")]
    pub noise_mode: String,
    /// Churn S_churn of the sde modes (default: η at its cap √1.2 − 1 on every step).
    #[arg(long)]
    pub s_churn: Option<f64>,
    /// Check the first iteration's gradient against central finite differences (3 random
    /// directions per learned tensor and all together) before optimising; needs --iterations > 0
    /// and --dtype f32 or f64 (f64 for a tight check).
    #[arg(long)]
    pub verify_grad: bool,
    /// Objective: an exported LAPO policy's action error on the generated frames (the policy
    /// stress test's objective; frames 3× as wide as high: three camera views side by side).
    /// Needs --policy-reference. A path or a Hub reference `org/name[@revision]:file`.
    #[arg(long, conflicts_with = "target_video")]
    pub policy: Option<PathBuf>,
    /// Safetensors with `states` (1, F, S) — the joint states the policy reads with each frame —
    /// and `actions` (1, F, A) — the reference actions its outputs are compared with (frame 0
    /// unused).
    #[arg(long)]
    pub policy_reference: Option<PathBuf>,
    /// Print the memory plan of one z0 optimisation iteration at this size (weights, stored
    /// trajectory, one step's VJP through the DiT, the VAE decode's VJP) and whether it fits
    /// the device's free memory, reading only the repository's config files; nothing is loaded
    /// or written. Needs no --image/--prompt.
    #[arg(long)]
    pub dry_run: bool,
    /// Optimise even when the memory plan predicts more than the device's free memory (a run
    /// with --iterations > 0 is refused up front otherwise).
    #[arg(long)]
    pub ignore_memory_plan: bool,
    /// Transfer2.5: a control video steering generation through the ControlNet,
    /// `KIND[=PATH][:WEIGHT]` (repeatable, one per kind): KIND is edge, blur (or vis), depth or
    /// seg; PATH a video (frame folder, GIF, H.264 MP4) resized to --height × --width; without
    /// PATH, edge and blur are computed from --video as upstream does (Canny 100/200; bilateral
    /// blur, the "medium" presets). WEIGHT is the ControlNet's conditioning scale (default 1;
    /// several weights summing over 1 are divided by their sum, as upstream's multicontrol).
    #[arg(long = "control")]
    pub controls: Vec<String>,
    /// Transfer2.5: the ControlNet of one control kind, `KIND=REF` — a pipeline repository (local
    /// or `org/name[@revision]`) whose controlnet/ is loaded. Needed for every control beyond the
    /// first, which uses the --model repository's own controlnet/.
    #[arg(long = "controlnet")]
    pub controlnets: Vec<String>,
    /// Transfer2.5: frames per autoregressive chunk (diffusers' num_frames_per_chunk); longer
    /// videos are generated chunk by chunk, each conditioned on the previous chunk's last frame.
    #[arg(long, default_value_t = super::transfer::TRANSFER25_DEFAULT_CHUNK_FRAMES)]
    pub chunk_frames: usize,
    /// Transfer2.5: frames of the previous chunk that condition the next (0, 1 or 2; diffusers'
    /// num_ar_conditional_frames, upstream's num_conditional_frames).
    #[arg(long, default_value_t = super::transfer::TRANSFER25_AR_CONDITIONAL_FRAMES)]
    pub conditional_frames: usize,
    /// Transfer2.5: Canny thresholds of computed edge controls (very_low, low, medium, high,
    /// very_high: upstream's preset_edge_threshold).
    #[arg(long, default_value = "medium")]
    pub edge_threshold: String,
    /// Transfer2.5: strength of computed blur controls (upstream's preset_blur_strength).
    #[arg(long, default_value = "medium")]
    pub blur_strength: String,
    /// Arguments the command line gave (clap ids), filled by the binary: these win over a params
    /// file's values.
    #[arg(skip)]
    pub command_line: Vec<String>,
}

/// `--num-frames`' default (Predict; Transfer2.5 defaults to the controls' length).
pub const DEFAULT_NUM_FRAMES: usize = 93;

impl CosmosArgs {
    /// `--num-frames`, or its default.
    pub fn frames(&self) -> usize {
        self.num_frames.unwrap_or(DEFAULT_NUM_FRAMES)
    }
}

/// What the run measured (all zero for `--dry-run`).
#[derive(Debug, Default, serde::Serialize)]
pub struct CosmosSummary {
    pub seconds_load: f64,
    pub seconds_sample: f64,
    pub initial_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub files: Vec<String>,
}

pub(super) fn parse_dtype(arg: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match arg {
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        // For tight gradient checks (--verify-grad) on CPU.
        Some("f64") => DType::F64,
        Some(other) => bail!("--dtype: unknown value '{other}'; allowed: f32, bf16, f16, f64"),
    })
}

/// Where `sampler cosmos` writes without `-o`: a new numbered directory under it per run.
pub const DEFAULT_OUT: &str = "out/cosmos";

/// Where this run writes (one mechanism for every command: `shared::outputs`).
fn out_dir(args: &CosmosArgs) -> anyhow::Result<shared::outputs::OutputDir> {
    shared::outputs::OutputDir::check(args.out.as_deref(), Path::new(DEFAULT_OUT), args.overwrite)
}

/// Every argument checked before anything is loaded or written (`kind`: the pipeline
/// `model_index.json` names).
fn validate(args: &CosmosArgs, kind: PipelineKind) -> anyhow::Result<()> {
    match (&args.prompt, &args.prompt_embeds) {
        (Some(_), Some(_)) => bail!("give --prompt TEXT or --prompt-embeds FILE, not both"),
        (None, None) if !args.dry_run => bail!("give --prompt TEXT (Predict2) or --prompt-embeds FILE"),
        (None, Some(_)) if args.negative_prompt.is_some() => bail!(
            "--negative-prompt goes with --prompt; with --prompt-embeds the file's negative_prompt_embeds are used"
        ),
        _ => {}
    }
    if let Some(p) = &args.prompt {
        anyhow::ensure!(!p.trim().is_empty(), "--prompt is empty");
    }
    if kind.uses_controls() {
        super::transfer_cli::validate(args)?;
    } else {
        anyhow::ensure!(
            args.controls.is_empty() && args.controlnets.is_empty(),
            "--control/--controlnet steer a Cosmos-Transfer2.5 pipeline; {} is {}",
            args.model,
            kind.class_name()
        );
        anyhow::ensure!(
            args.dry_run || args.image.is_some() || args.video.is_some(),
            "give a conditioning --image or --video"
        );
    }
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
    anyhow::ensure!(args.num_frames.is_none_or(|n| (1..=10_000).contains(&n)), "--num-frames must be in 1..=10000");
    anyhow::ensure!(args.steps.is_none_or(|s| (2..=10_000).contains(&s)), "--steps must be in 2..=10000");
    anyhow::ensure!(
        args.condition_latent_frames.is_none_or(|n| n == 1 || n == 2),
        "--condition-latent-frames must be 1 or 2"
    );
    anyhow::ensure!(args.guidance.is_none_or(|g| g.is_finite() && g >= 0.0), "--guidance must be finite and ≥ 0");
    anyhow::ensure!(args.fps.is_none_or(|f| f.is_finite() && f > 0.0), "--fps must be positive");
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be positive and finite");
    anyhow::ensure!(args.grad_clip.is_finite() && args.grad_clip >= 0.0, "--grad-clip must be ≥ 0");
    anyhow::ensure!(args.chi_reg.is_finite() && args.chi_reg >= 0.0, "--chi-reg must be ≥ 0");
    anyhow::ensure!(args.iterations <= 100_000, "--iterations must be at most 100000");
    if args.iterations > 0 {
        anyhow::ensure!(
            args.target_video.is_some() || args.policy.is_some(),
            "--iterations > 0 needs an objective: --target-video FILE or --policy FILE"
        );
    }
    let inputs = [
        ("--image", &args.image),
        ("--video", &args.video),
        ("--prompt-embeds", &args.prompt_embeds),
        ("--latents", &args.latents),
        ("--target-video", &args.target_video),
        ("--policy", &args.policy),
        ("--policy-reference", &args.policy_reference),
    ];
    for (flag, path) in inputs {
        if let Some(p) = path {
            anyhow::ensure!(p.exists(), "{flag} {}: no such file or directory", p.display());
        }
    }
    Ok(())
}

/// `--prompt` (and `--negative-prompt`, default diffusers' Cosmos-Predict2 one) through the
/// repository's T5 encoder, as diffusers' `encode_prompt`: 512 tokens, rows past each prompt
/// zeroed. The encoder is dropped before sampling (T5-XXL is 11 B parameters).
fn encode_prompt(
    args: &CosmosArgs,
    pipe: &CosmosPipeline,
    text: &str,
    dtype: DType,
    device: &Device,
    log: &mut impl FnMut(&str),
) -> anyhow::Result<(Tensor, Option<Tensor>)> {
    use super::text_encoder::{
        T5PromptEncoder, COSMOS_PREDICT2_DEFAULT_NEGATIVE_PROMPT, COSMOS_PREDICT2_MAX_SEQUENCE_LENGTH,
    };
    let started = Instant::now();
    let encoder = T5PromptEncoder::load(&pipeline::Repository::parse(&args.model)?, dtype, device)?;
    let negative = args.negative_prompt.as_deref().unwrap_or(COSMOS_PREDICT2_DEFAULT_NEGATIVE_PROMPT);
    let tokens = encoder.tokenize(&[text, negative], COSMOS_PREDICT2_MAX_SEQUENCE_LENGTH)?;
    for (which, truncated) in ["--prompt", "--negative-prompt"].iter().zip(&tokens.truncated) {
        if *truncated {
            log(&format!(
                "warning: {which} is longer than {COSMOS_PREDICT2_MAX_SEQUENCE_LENGTH} tokens and was truncated (as diffusers does)"
            ));
        }
    }
    let embeds = encoder.encode_tokens(&tokens)?;
    anyhow::ensure!(
        embeds.dim(2)? == pipe.transformer.config().context_dim(),
        "the text encoder writes {} features, the transformer reads {}",
        embeds.dim(2)?,
        pipe.transformer.config().context_dim()
    );
    log(&format!(
        "encoded the prompts with T5 ({} tokens; {:.1} s)",
        tokens.lengths()[0],
        started.elapsed().as_secs_f64()
    ));
    Ok((embeds.narrow(0, 0, 1)?, Some(embeds.narrow(0, 1, 1)?)))
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The memory plan of one optimisation iteration for the arguments, from the repository's
/// `model_index.json`, `transformer/config.json` and `vae/config.json` alone (Transfer2.5: also
/// `controlnet/config.json`; one chunk of `--chunk-frames`, one ControlNet per `--control`).
fn memory_plan(args: &CosmosArgs, dtype: DType) -> anyhow::Result<MemoryPlan> {
    let repo = pipeline::Repository::parse(&args.model)?;
    let kind = CosmosPipeline::kind_of(&args.model)?;
    let transformer = super::transformer::Config::from_json_file(&repo.file("transformer/config.json")?)?;
    let vae = super::vae::Config::from_json_file(&repo.file("vae/config.json")?)?;
    let (frames, controlnets) = if kind.uses_controls() {
        let cfg = super::controlnet::Config::from_json_file(&repo.file("controlnet/config.json")?)?;
        (args.chunk_frames, Some((cfg, args.controls.len().max(1))))
    } else {
        (args.frames(), None)
    };
    let request = PlanRequest {
        steps: args.steps.unwrap_or(kind.default_steps()),
        guidance: guidance(args, kind) > 1.0,
        dtype,
        solver_state_per_step: kind.solver_state_per_step(),
        controlnets,
        ..PlanRequest::new(args.height, args.width, frames)
    };
    MemoryPlan::new(&transformer, &vae, &request)
}

/// The flags that name weights-like safetensors files take a local path or a Hub reference
/// (`org/name[@revision]:file`), resolved to a local file by the one resolver every binary uses.
fn resolve_weight_inputs(mut args: CosmosArgs) -> anyhow::Result<CosmosArgs> {
    for (flag, value) in
        [("--prompt-embeds", &mut args.prompt_embeds), ("--latents", &mut args.latents), ("--policy", &mut args.policy)]
    {
        if let Some(reference) = value.as_mut() {
            let text = reference.to_string_lossy().into_owned();
            *reference = shared::weights::resolve(&text).with_context(|| format!("{flag} {text}"))?;
        }
    }
    Ok(args)
}

/// Runs `sampler cosmos`: samples (and optimises) and writes the outputs into the `-o`
/// directory (or a new `out/cosmos/run-NNN`).
pub fn run(args: &CosmosArgs, mut log: impl FnMut(&str)) -> anyhow::Result<CosmosSummary> {
    let (args, params_applied) = with_params_file(args)?;
    let args = &resolve_weight_inputs(args)?;
    if let Some(a) = &params_applied {
        log(&format!(
            "params file {}: set {}; command line wins for {}; ignored {}",
            a.path.display(),
            list_or_none(&a.set),
            list_or_none(&a.command_line_wins),
            list_or_none(&a.ignored)
        ));
    }
    // Which pipeline, from model_index.json alone: the checks depend on it.
    let kind = CosmosPipeline::kind_of(&args.model)?;
    validate(args, kind)?;
    let noise_mode = validate_noise_and_objective(args)?;
    let direction = match args.direction.as_str() {
        "ascent" => Direction::Ascent,
        "descent" => Direction::Descent,
        other => bail!("--direction: unknown value '{other}'; allowed: ascent, descent"),
    };
    let device = shared::device::parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    anyhow::ensure!(
        !args.verify_grad || matches!(dtype, DType::F32 | DType::F64),
        "--verify-grad: finite differences in {dtype:?} measure rounding, not the gradient; use --dtype f32 or f64"
    );
    if args.dry_run || args.iterations > 0 {
        let plan = memory_plan(args, dtype)?;
        let free = shared::device::free_memory_bytes(&device);
        let verdict = match free {
            Some(free) => match plan.fits(free) {
                Ok(()) => Ok(format!("fits the {:.1} GiB free on {}", free as f64 / GIB, describe(&device))),
                Err(advice) => Err(advice),
            },
            None => Ok(format!("free memory of {} unknown: not checked", describe(&device))),
        };
        if args.dry_run {
            log(&format!("{plan}"));
            match &verdict {
                Ok(v) => log(v),
                Err(advice) => log(&format!("does not fit: {advice}")),
            }
            return Ok(CosmosSummary::default());
        }
        if let Err(advice) = verdict {
            bail!(
                "the memory plan of one optimisation iteration does not fit (see --dry-run): {advice}; or pass \
                 --ignore-memory-plan to try anyway"
            );
        }
    }
    // Refused before any work when not empty (unless --overwrite); claimed below, before the first write.
    let out_dir = out_dir(args)?;
    if kind.uses_controls() {
        let run = super::transfer_cli::Run { args, out_dir, device, dtype, noise_mode, direction, params_applied };
        return super::transfer_cli::run(run, log);
    }
    // Every input file is read and checked before the model is loaded.
    let video = load_conditioning_input(args, &device)?;
    let objective_input = load_objective_input(args, args.frames(), &device)?;
    let prompt_embeds = match &args.prompt_embeds {
        Some(path) => Some(pipeline::read_prompt_embeds(path, &device)?),
        None => None,
    };
    check_prompt_encoder(args, kind)?;

    let started = Instant::now();
    log(&format!("loading {} ({dtype:?} on {})", args.model, shared::device::describe(&device)));
    let mut pipe = CosmosPipeline::load(&args.model, dtype, &device)?;
    if args.iterations > 0 {
        // What the memory plan assumes: each step's VJP keeps block inputs, not block graphs,
        // and attention never holds a tokens × tokens matrix (gradients equal: tests/cosmos_grad.rs).
        pipe.transformer.set_memory_mode(super::transformer::MemoryMode::low_memory())?;
    }
    let seconds_load = started.elapsed().as_secs_f64();
    let steps = args.steps.unwrap_or(pipe.kind.default_steps());
    pipe.check_size(args.frames(), args.height, args.width)?;
    let (prompt, negative) = match (&args.prompt, &prompt_embeds) {
        (_, Some(embeds)) => embeds.clone(),
        (Some(text), None) => encode_prompt(args, &pipe, text, dtype, &device, &mut log)?,
        (None, None) => bail!("give --prompt TEXT or --prompt-embeds FILE"),
    };
    let latents = initial_latents(args, &pipe.latent_shape(1, args.frames(), args.height, args.width), &device)?;
    let req = GenerateRequest {
        video,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames: args.frames(),
        steps,
        guidance: guidance(args, kind),
        fps: args.fps,
        latents,
        condition_latent_frames: args.condition_latent_frames,
    };
    let prepared = pipe.prepare(&req)?;
    // Created, or emptied whole with --overwrite, and locked while this run writes it.
    let out_claim = out_dir.claim()?;
    let out = out_claim.path().to_path_buf();
    let plan = churn_plan(args, noise_mode, &prepared.schedule);
    let injected = plan.noise_scales.iter().filter(|s| **s > 0.0).count();
    let traj = Trajectory {
        denoiser: prepared.denoiser.as_ref(),
        solver: prepared.solver.as_ref(),
        cond: &prepared.cond,
        schedule: prepared.schedule.clone(),
        plan,
    };
    if noise_mode.injects() {
        log(&format!(
            "noise mode {}: churn on {injected}/{} steps (σ̂ = {:.4}·σ), not diffusers' deterministic sampler",
            noise_mode.name(),
            traj.num_steps(),
            traj.plan.eval_sigmas[0] / traj.schedule.sigmas[0]
        ));
    }
    let z0 = req.latents.to_dtype(dtype)?;
    let objective = build_objective(objective_input, &pipe, dtype)?;
    let mut files = Vec::new();
    let mut gradient_check = None;
    let started = Instant::now();
    let (final_latents, initial_loss, final_loss, history) = if args.iterations == 0 {
        log(&format!("sampling: {steps} steps, guidance {}", guidance(args, kind)));
        let noise = noise_state(args.seed, &z0, &traj.plan, noise_mode, false)?;
        let latents = traj.sample_state(&noise)?;
        // An objective given without optimisation is measured on the sample.
        let loss = match &objective {
            Some(o) => Some(shared::gradcheck::scalar_f64(&o.loss(&latents)?)?),
            None => None,
        };
        if let (Some(o), Some(l)) = (&objective, loss) {
            log(&format!("objective ({}): {l:.6} (measured on the sample)", o.describe()));
        }
        (latents, loss, loss, Vec::new())
    } else {
        let objective = objective.as_ref().context("--iterations > 0 needs an objective")?;
        let noise = noise_state(args.seed, &z0, &traj.plan, noise_mode, true)?;
        let settings = OptimizeSettings {
            iterations: args.iterations,
            optimizer: shared::params::OptimizerConfig::adam(args.lr),
            direction,
            grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
            chi_reg: args.chi_reg,
            grad_mode: GradMode::Recompute,
            constraint: Default::default(),
        };
        if args.verify_grad {
            let check = check_first_gradient(&traj, &noise, objective.as_ref(), dtype, args.seed)?;
            log(&format!(
                "verify-grad: central differences (eps {:.0e}) along {} directions: max relative error {:.3e}",
                check.eps,
                check.per_var.iter().map(|v| v.checks.len()).sum::<usize>() + check.joint.len(),
                check.max_rel_error()
            ));
            gradient_check = Some(check);
        }
        log(&format!(
            "optimising {} ({} iterations, {}) through {} steps and the VAE decode",
            noise.learnable().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            args.iterations,
            objective.describe(),
            steps
        ));
        let mut history = Vec::new();
        let outcome = optimize(&traj, &noise, objective.as_ref(), &settings, |r| {
            log(&format!("iteration {}: loss {:.6}, |∇z0| {:.3e}", r.iteration, r.loss, r.grad_z0.norm));
            history.push(serde_json::to_value(r).unwrap_or_default());
        })?;
        let before = pipe.decode_to_unit(&outcome.initial_output)?.affine(2.0, -1.0)?.to_dtype(DType::F32)?;
        let after = pipe.decode_to_unit(&outcome.final_output)?.affine(2.0, -1.0)?.to_dtype(DType::F32)?;
        files.extend(crate::report::write_frames(&out, "before", &before.to_device(&Device::Cpu)?)?);
        files.push(crate::report::write_comparison(
            &out,
            &before.to_device(&Device::Cpu)?,
            &after.to_device(&Device::Cpu)?,
        )?);
        (outcome.final_output, Some(outcome.initial_loss), Some(outcome.final_loss), history)
    };
    let video = pipe.decode_to_unit(&final_latents)?;
    let seconds_sample = started.elapsed().as_secs_f64();

    let mp4_fps = args.fps.unwrap_or(DEFAULT_MP4_FPS);
    let mp4 = write_sample(&out, &video, &final_latents, mp4_fps, &mut files, &mut log)?;
    let summary = CosmosSummary { seconds_load, seconds_sample, initial_loss, final_loss, files };
    let report = serde_json::json!({
        "model": pipe.repository,
        "pipeline": pipe.kind,
        "dtype": format!("{dtype:?}"),
        "device": shared::device::describe(&device),
        "height": args.height, "width": args.width, "num_frames": args.frames(),
        "steps": steps, "guidance": guidance(args, kind), "fps": args.fps,
        "scheduler": pipe.scheduler,
        "seed": args.seed, "latents": args.latents, "prompt_embeds": args.prompt_embeds,
        "iterations": args.iterations, "lr": args.lr, "direction": args.direction,
        "sigmas": prepared.schedule.sigmas,
        "noise_mode": noise_mode.name(), "churn_plan": traj.plan,
        "objective": objective.as_ref().map(|o| o.describe()),
        "conditioning": args.image.as_ref().or(args.video.as_ref()), "video_frames": args.video_frames,
        "params_file": params_applied,
        "gradient_check": gradient_check,
        "video_mp4": mp4,
        "history": history,
        "summary": &summary,
    });
    shared::io::write_json_atomic(&out.join("report.json"), &report)?;
    log(&format!("wrote {} ({} s load, {:.2} s sampling)", out.display(), seconds_load.round(), seconds_sample));
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------
// Params file, noise modes, objectives, gradient check, MP4 output

/// The initial noise of `shape`: `--latents`, checked against the shape, or drawn from `--seed`.
pub(super) fn initial_latents(args: &CosmosArgs, shape: &[usize], device: &Device) -> anyhow::Result<Tensor> {
    match &args.latents {
        Some(path) => pipeline::read_latents(path, shape, device),
        None => Ok(shared::rng::SplitMix64::new(args.seed).normal_tensor(shape, DType::F32, device)?),
    }
}

/// `--guidance`, or the pipeline's default.
pub(super) fn guidance(args: &CosmosArgs, kind: PipelineKind) -> f64 {
    args.guidance.unwrap_or(kind.default_guidance())
}

/// `--prompt` needs the pipeline's text encoder ported (Predict2's T5); the others take
/// `--prompt-embeds`. Checked before the models load.
pub(super) fn check_prompt_encoder(args: &CosmosArgs, kind: PipelineKind) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prompt.is_none() || kind == PipelineKind::Predict2VideoToWorld,
        "--prompt: {} encodes text with Qwen2.5-VL-7B, which is not ported; compute its embeddings with \
         scripts/cosmos_prompt_embeds.py --model {} --prompt \"...\" -o prompt.safetensors and pass \
         --prompt-embeds prompt.safetensors",
        kind.class_name(),
        args.model
    );
    Ok(())
}

/// Frame rate written into `video.mp4` when `--fps` is not given: 16, the rate diffusers'
/// Cosmos pipelines export at.
pub const DEFAULT_MP4_FPS: f64 = 16.0;

pub(super) fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

/// Records which arguments the command line gave (`matches`: the `cosmos` subcommand's), so a
/// params file does not override them. The binary calls this after parsing.
pub fn record_command_line(args: &mut CosmosArgs, matches: &clap::ArgMatches) {
    args.command_line = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect();
}

/// `args` with its params file (`-i`) applied: file values for the arguments the command line
/// did not give.
pub fn with_params_file(args: &CosmosArgs) -> anyhow::Result<(CosmosArgs, Option<params_file::Applied>)> {
    let Some(path) = &args.params else { return Ok((args.clone(), None)) };
    let params = params_file::read(path)?;
    let mut merged = args.clone();
    let given = |id: &str| args.command_line.iter().any(|c| c == id);
    let applied = params_file::apply(path, &params, &mut merged, &given);
    Ok((merged, Some(applied)))
}

/// The noise mode, and every check of the noise, gradient-check, objective and video flags that
/// needs no file read (files are checked by their readers, also before any work).
fn validate_noise_and_objective(args: &CosmosArgs) -> anyhow::Result<NoiseMode> {
    let mode: NoiseMode = serde_json::from_value(serde_json::Value::from(args.noise_mode.as_str())).map_err(|_| {
        anyhow::anyhow!("--noise-mode: unknown value '{}'; allowed: {}", args.noise_mode, NoiseMode::ALLOWED.join(", "))
    })?;
    if let Some(c) = args.s_churn {
        anyhow::ensure!(c.is_finite() && c >= 0.0, "--s-churn must be finite and ≥ 0, got {c}");
        anyhow::ensure!(
            mode.injects(),
            "--s-churn applies to the sde noise modes; --noise-mode ode injects no noise (pass --noise-mode sde, sde-learnable or sde-from-z0)"
        );
        anyhow::ensure!(
            c > 0.0,
            "--s-churn 0: --noise-mode {} would inject nothing (churn is its only injection); use --noise-mode ode",
            mode.name()
        );
    }
    anyhow::ensure!(
        !(mode == NoiseMode::SdeLearnable && args.iterations == 0),
        "--noise-mode sde-learnable learns the step noises, but --iterations 0 optimises nothing: use --noise-mode sde to sample with fixed step noises"
    );
    anyhow::ensure!(
        !args.verify_grad || args.iterations > 0,
        "--verify-grad checks the gradient of the first iteration: it needs --iterations > 0 and an objective"
    );
    if let Some(n) = args.video_frames {
        anyhow::ensure!(n >= 1, "--video-frames must be at least 1");
        anyhow::ensure!(args.video.is_some(), "--video-frames applies to --video");
    }
    anyhow::ensure!(
        !(args.target_video.is_some() && args.policy.is_some()),
        "give one objective: --target-video or --policy"
    );
    match (&args.policy, &args.policy_reference) {
        (Some(_), None) => bail!(
            "--policy needs --policy-reference FILE: safetensors with `states` (1, {f}, S) and `actions` (1, {f}, A), \
             the joint states the policy reads and the actions its outputs are compared with",
            f = args.frames()
        ),
        (None, Some(_)) => bail!("--policy-reference is the reference of --policy; give --policy FILE too"),
        (Some(_), Some(_)) => super::policy::check_video_size(args.frames(), args.height, args.width)?,
        (None, None) => {}
    }
    Ok(mode)
}

/// The churn plan of a noise mode on the pipeline's schedule: none for `ode`; in the sde modes
/// S_churn (default: η at Cosmos' cap on every step). With diffusers' flow-match Karras
/// schedule the last step goes from σ_min to σ_min: churned, it becomes a short denoising step
/// from (1 + η)σ_min.
pub(super) fn churn_plan(args: &CosmosArgs, mode: NoiseMode, schedule: &Schedule) -> ChurnPlan {
    let n = schedule.num_steps() as f64;
    let s_churn = args.s_churn.unwrap_or((n + 1.0) * crate::noise::COSMOS_ETA_CAP);
    Churn { s_churn, ..Churn::default() }.plan(&schedule.sigmas, mode.injects())
}

/// z0 (the run's initial latents) and the step noises of `mode` (drawn from `seed` as the
/// analytic sampler draws them), z0 learnable when `learn`.
pub(super) fn noise_state(
    seed: u64,
    z0: &Tensor,
    plan: &ChurnPlan,
    mode: NoiseMode,
    learn: bool,
) -> anyhow::Result<NoiseState> {
    let mut state = NoiseState::draw(seed, z0.dims(), plan, mode, learn, z0.dtype(), z0.device())?;
    state.z0 = if learn { NoiseTensor::Learnable(Var::from_tensor(z0)?) } else { NoiseTensor::Fixed(z0.clone()) };
    Ok(state)
}

/// The conditioning video (1, 3, F, H, W) in [−1, 1] from --image or --video.
fn load_conditioning_input(args: &CosmosArgs, device: &Device) -> anyhow::Result<Tensor> {
    match (&args.image, &args.video) {
        (Some(image), _) => super::inputs::load_image(image, args.height, args.width, device),
        (None, Some(video)) => super::inputs::load_video(video, args.video_frames, args.height, args.width, device),
        (None, None) => bail!("give a conditioning --image or --video"),
    }
}

/// An objective's inputs, read and checked before the model loads.
pub(super) enum ObjectiveInput {
    Target { video: Tensor, label: String },
    Policy { policy: Box<rl::policy::ExportedPolicy>, states: Tensor, actions: Tensor, height: usize, device: Device },
}

/// The objective's files, checked for a video of `frames` frames.
pub(super) fn load_objective_input(
    args: &CosmosArgs,
    frames: usize,
    device: &Device,
) -> anyhow::Result<Option<ObjectiveInput>> {
    if let Some(path) = &args.target_video {
        let video = shared::weights::read_safetensors(path, device)
            .with_context(|| format!("--target-video {}", path.display()))?
            .remove("video")
            .with_context(|| format!("--target-video {}: no tensor 'video'", path.display()))?;
        let expected = [1, 3, frames, args.height, args.width];
        anyhow::ensure!(
            video.dims() == expected,
            "--target-video {}: 'video' is {:?}, the run makes {:?}",
            path.display(),
            video.dims(),
            expected
        );
        return Ok(Some(ObjectiveInput::Target { video, label: path.display().to_string() }));
    }
    let (Some(policy_path), Some(reference)) = (&args.policy, &args.policy_reference) else { return Ok(None) };
    let policy = rl::policy::ExportedPolicy::load(policy_path, device)
        .with_context(|| format!("--policy {}: not an exported LAPO policy", policy_path.display()))?;
    // The generated video is cut into the environment's camera views.
    policy.header.check_environment().with_context(|| format!("--policy {}", policy_path.display()))?;
    anyhow::ensure!(
        policy.header.encoder.uses_images(),
        "--policy {}: a state-only policy (encoder 'none'): generated frames cannot change its actions",
        policy_path.display()
    );
    let (s, a) = (policy.header.state_dim, policy.header.action_dim);
    let (states, actions) = super::inputs::read_policy_reference(reference, frames, s, a, device)?;
    Ok(Some(ObjectiveInput::Policy {
        policy: Box::new(policy),
        states,
        actions,
        height: args.height,
        device: device.clone(),
    }))
}

/// The objective on the final latents: the inner objective on the decoded video in [0, 1].
fn build_objective<'a>(
    input: Option<ObjectiveInput>,
    pipe: &'a CosmosPipeline,
    dtype: DType,
) -> anyhow::Result<Option<Box<dyn Objective + 'a>>> {
    let inner: Box<dyn Objective> = match input {
        None => return Ok(None),
        Some(ObjectiveInput::Target { video, label }) => Box::new(TargetMse { target: video.to_dtype(dtype)?, label }),
        Some(ObjectiveInput::Policy { policy, states, actions, height, device }) => {
            Box::new(super::policy::PolicyOnVideo::new(*policy, &states, &actions, height, &device)?)
        }
    };
    Ok(Some(Box::new(DecodedObjective { vae: &pipe.vae, inner })))
}

/// `--verify-grad`: the gradient the optimiser's first iteration uses (the recomputing backward
/// through every step and the VAE decode) against central finite differences along random
/// directions of each learned tensor and of all together.
pub(super) fn check_first_gradient(
    traj: &Trajectory,
    noise: &NoiseState,
    objective: &dyn Objective,
    dtype: DType,
    seed: u64,
) -> anyhow::Result<shared::gradcheck::GradCheckReport> {
    let opts = shared::gradcheck::GradCheckOptions {
        eps: gradcheck_eps(dtype),
        directions: 3,
        seed: seed ^ 0xC4EC,
        floor: 1e-12,
    };
    Ok(verify_gradient(traj, noise, objective, GradMode::Recompute, &opts)?)
}

/// The sample's files: `video.safetensors` (`video`, in [0, 1]), `latents.safetensors`
/// (`latents`), `frames.png` and `frames.gif`, and `video.mp4` at `fps` (a failed encoding is
/// logged and recorded, not fatal). Returns what `report.json` records of the MP4.
pub(super) fn write_sample(
    out: &Path,
    video: &Tensor,
    latents: &Tensor,
    fps: f64,
    files: &mut Vec<String>,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<serde_json::Value> {
    let save = |name: &str, key: &str, t: &Tensor| -> anyhow::Result<String> {
        let map =
            std::collections::HashMap::from([(key.to_string(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)]);
        shared::weights::save_tensors_atomic(&map, &out.join(name))?;
        Ok(name.to_string())
    };
    files.push(save("video.safetensors", "video", video)?);
    files.push(save("latents.safetensors", "latents", latents)?);
    let shown = video.affine(2.0, -1.0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    files.extend(crate::report::write_frames(out, "frames", &shown)?);
    Ok(write_mp4_logged(out, "video.mp4", &shown, fps, files, log))
}

/// [`write_mp4_named`], a failure logged and returned as `{"error": …}` (the run goes on);
/// `{"file", "fps"}` otherwise.
pub(super) fn write_mp4_logged(
    out: &Path,
    name: &str,
    video: &Tensor,
    fps: f64,
    files: &mut Vec<String>,
    log: &mut dyn FnMut(&str),
) -> serde_json::Value {
    match write_mp4_named(out, name, video, fps) {
        Ok(name) => {
            files.push(name.clone());
            serde_json::json!({"file": name, "fps": fps})
        }
        Err(e) => {
            log(&format!("{name} not written: {e:#}"));
            serde_json::json!({"error": format!("{e:#}")})
        }
    }
}

/// `name` (e.g. `video.mp4`): the frames (sample 0 of a (B, 3, F, H, W) tensor in [−1, 1]) as
/// H.264 at `fps`.
pub(super) fn write_mp4_named(dir: &Path, name: &str, video: &Tensor, fps: f64) -> anyhow::Result<String> {
    let frames = crate::report::frames_to_images(video, 0, 1)?;
    let bytes = super::h264::encode_mp4(&frames, fps)?;
    shared::io::write_atomic(&dir.join(name), &bytes)?;
    Ok(name.to_string())
}
