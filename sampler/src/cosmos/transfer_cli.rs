//! `sampler cosmos` on a Cosmos-Transfer2.5 repository: the control videos (`--control`, files
//! or computed from `--video`), the ControlNets (`--controlnet`), and the chunk-by-chunk loop of
//! [`super::transfer`] with z0 optimised per chunk. The outputs are Predict's
//! (`video.safetensors`, `latents.safetensors` — the chunks' latents joined as diffusers'
//! `output_type="latent"` —, `frames.png`, `video.mp4`, `report.json`, with `--iterations`
//! `before.png` and `before_after.png`) plus each control video used (`control_KIND.png`,
//! `control_KIND.mp4`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::app::{self, CosmosArgs, CosmosSummary};
use super::controlnet::ConditioningScale;
use super::controls::{ControlKind, Preset};
use super::params_file;
use super::pipeline::{self, CosmosPipeline};
use super::transfer::{join_chunks, ControlVideo, TransferRequest, TransferRun};
use super::vae::DecodedObjective;
use crate::noise::NoiseMode;
use crate::objective::{FirstFrames, Objective, TargetMse};
use crate::optimize::{optimize, Direction, OptimizeSettings};
use crate::trajectory::{GradMode, Trajectory};

/// One `--control KIND[=PATH][:WEIGHT]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlSpec {
    pub kind: ControlKind,
    /// None: computed from `--video` (edge, blur).
    pub path: Option<PathBuf>,
    pub weight: f64,
}

impl ControlSpec {
    /// Parses `KIND[=PATH][:WEIGHT]`; a trailing `:NUMBER` is the weight (a path may hold `:`).
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let what = format!("--control {spec}");
        let (head, weight) = match spec.rsplit_once(':') {
            Some((head, w)) if w.trim().parse::<f64>().is_ok() => (head, w.trim().parse::<f64>().ok()),
            _ => (spec, None),
        };
        let (kind, path) = match head.split_once('=') {
            Some((k, p)) => (k, Some(p)),
            None => (head, None),
        };
        let kind = ControlKind::parse(kind.trim()).with_context(|| what.clone())?;
        let path = match path.map(str::trim) {
            Some("") => bail!("{what}: empty PATH after '='"),
            Some(p) => Some(PathBuf::from(p)),
            None => None,
        };
        let weight = weight.unwrap_or(1.0);
        anyhow::ensure!(weight.is_finite() && weight >= 0.0, "{what}: the weight must be finite and ≥ 0, got {weight}");
        anyhow::ensure!(
            path.is_some() || kind.computable(),
            "{what}: {} controls are made by external models upstream; give the video: --control {}=PATH",
            kind.name(),
            kind.name()
        );
        Ok(Self { kind, path, weight })
    }
}

/// One `--controlnet KIND=REF`.
fn parse_controlnet(spec: &str) -> anyhow::Result<(ControlKind, String)> {
    let (kind, reference) =
        spec.split_once('=').with_context(|| format!("--controlnet {spec}: expected KIND=REPOSITORY"))?;
    anyhow::ensure!(!reference.trim().is_empty(), "--controlnet {spec}: empty REPOSITORY");
    Ok((ControlKind::parse(kind.trim()).with_context(|| format!("--controlnet {spec}"))?, reference.trim().into()))
}

/// The Transfer2.5 checks of [`app`]'s validation: controls, ControlNets, chunk size, and the
/// Predict flags that do not apply.
pub fn validate(args: &CosmosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.dry_run || !args.controls.is_empty(),
        "{} is a Cosmos-Transfer2.5 pipeline: give at least one --control KIND[=PATH][:WEIGHT]",
        args.model
    );
    anyhow::ensure!(
        args.image.is_none(),
        "--image: Transfer2.5 generates from control videos (the first chunk has no conditioning frame); use \
         --control, with --video as the source of computed edge/blur controls"
    );
    anyhow::ensure!(args.fps.is_none(), "--fps: Cosmos2_5_TransferPipeline passes no fps to its transformer");
    anyhow::ensure!(
        args.condition_latent_frames.is_none(),
        "--condition-latent-frames: Transfer2.5 conditions each chunk on the previous chunk's last frame"
    );
    anyhow::ensure!(
        (5..=10_000).contains(&args.chunk_frames),
        "--chunk-frames must be in 5..=10000 (a chunk needs 2 latent frames), got {}",
        args.chunk_frames
    );
    anyhow::ensure!(
        args.conditional_frames <= 2 && args.conditional_frames < args.chunk_frames,
        "--conditional-frames must be 0, 1 or 2 (and fewer than --chunk-frames), got {}",
        args.conditional_frames
    );
    Preset::parse(&args.edge_threshold).context("--edge-threshold")?;
    Preset::parse(&args.blur_strength).context("--blur-strength")?;
    let specs = args.controls.iter().map(|s| ControlSpec::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    for (i, s) in specs.iter().enumerate() {
        anyhow::ensure!(
            !specs[..i].iter().any(|o| o.kind == s.kind),
            "--control {}: given twice (one control per kind)",
            s.kind.name()
        );
        match &s.path {
            // --dry-run reads no input: only the count of controls matters to the plan.
            _ if args.dry_run => {}
            Some(p) => {
                anyhow::ensure!(p.exists(), "--control {}={}: no such file or folder", s.kind.name(), p.display())
            }
            None => anyhow::ensure!(
                args.video.is_some(),
                "--control {}: computed from the input video, which --video gives (or pass --control {}=PATH)",
                s.kind.name(),
                s.kind.name()
            ),
        }
    }
    let nets = args.controlnets.iter().map(|s| parse_controlnet(s)).collect::<anyhow::Result<Vec<_>>>()?;
    for (i, (kind, _)) in nets.iter().enumerate() {
        anyhow::ensure!(
            specs.iter().any(|s| s.kind == *kind),
            "--controlnet {}: no --control of that kind",
            kind.name()
        );
        anyhow::ensure!(!nets[..i].iter().any(|(k, _)| k == kind), "--controlnet {}: given twice", kind.name());
    }
    let default_users = specs.iter().filter(|s| !nets.iter().any(|(k, _)| *k == s.kind)).count();
    anyhow::ensure!(
        default_users <= 1,
        "{} controls would share the --model repository's controlnet/, which is trained for one kind: give \
         --controlnet KIND=REPOSITORY for all but one",
        default_users
    );
    Ok(())
}

/// Weights as upstream's multicontrol uses them: divided by their sum when it exceeds 1.
fn normalised_weights(specs: &[ControlSpec]) -> Vec<f64> {
    let sum: f64 = specs.iter().map(|s| s.weight).sum();
    let div = if specs.len() > 1 && sum > 1.0 { sum } else { 1.0 };
    specs.iter().map(|s| s.weight / div).collect()
}

/// The control videos (1, 3, F, H, W) in [−1, 1]: read, or computed from `--video`'s frames.
fn load_controls(
    args: &CosmosArgs,
    specs: &[ControlSpec],
    device: &Device,
    log: &mut impl FnMut(&str),
) -> anyhow::Result<Vec<Tensor>> {
    let mut source = None;
    let mut videos = Vec::with_capacity(specs.len());
    for s in specs {
        let frames = match &s.path {
            Some(path) => super::inputs::read_video_frames(path, None)
                .with_context(|| format!("--control {}={}", s.kind.name(), path.display()))?,
            None => {
                if source.is_none() {
                    let path = args.video.as_ref().context("--video")?;
                    source = Some(super::inputs::read_video_frames(path, args.video_frames)?);
                }
                let frames = source.as_deref().unwrap_or_default();
                let preset = match s.kind {
                    ControlKind::Edge => Preset::parse(&args.edge_threshold)?,
                    _ => Preset::parse(&args.blur_strength)?,
                };
                let started = Instant::now();
                let out = super::controls::compute_control_with(s.kind, frames, preset)
                    .with_context(|| format!("computing the {} control from --video", s.kind.name()))?;
                log(&format!(
                    "computed the {} control ({} preset) from {} frames of --video in {:.1} s",
                    s.kind.name(),
                    preset.name(),
                    frames.len(),
                    started.elapsed().as_secs_f64()
                ));
                out
            }
        };
        videos.push(super::inputs::frames_to_video(frames, args.height, args.width, device)?);
    }
    Ok(videos)
}

/// What [`app::run`] hands over once the common checks are done.
pub struct Run<'a> {
    pub args: &'a CosmosArgs,
    pub out_dir: shared::outputs::OutputDir,
    pub device: Device,
    pub dtype: DType,
    pub noise_mode: NoiseMode,
    pub direction: Direction,
    pub params_applied: Option<params_file::Applied>,
}

/// Runs Transfer2.5: every input read and checked, the models loaded, each chunk sampled (and
/// its z0 optimised), the outputs written.
pub fn run(r: Run, mut log: impl FnMut(&str)) -> anyhow::Result<CosmosSummary> {
    let Run { args, out_dir, device, dtype, noise_mode, direction, params_applied } = r;
    let kind = super::pipeline::PipelineKind::Transfer25;
    app::check_prompt_encoder(args, kind)?;
    let specs = args.controls.iter().map(|s| ControlSpec::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let weights = normalised_weights(&specs);
    if weights.iter().zip(&specs).any(|(w, s)| *w != s.weight) {
        log(&format!("control weights sum over 1: divided by their sum, as upstream (now {weights:?})"));
    }
    let control_videos = load_controls(args, &specs, &device, &mut log)?;
    let control_frames = control_videos.iter().map(|v| v.dim(2)).collect::<candle_core::Result<Vec<_>>>()?;
    // diffusers: the controls' length, capped by num_frames when given.
    let num_frames = control_frames.iter().copied().fold(args.num_frames.unwrap_or(usize::MAX), usize::min);
    let objective_input = app::load_objective_input(args, num_frames, &device)
        .with_context(|| format!("the video has {num_frames} frames (the controls' length, capped by --num-frames)"))?;
    let (prompt, negative) = match &args.prompt_embeds {
        Some(path) => pipeline::read_prompt_embeds(path, &device)?,
        None => bail!("give --prompt-embeds FILE (Transfer2.5's Qwen2.5-VL text encoder is not ported)"),
    };

    let started = Instant::now();
    log(&format!("loading {} ({dtype:?} on {})", args.model, shared::device::describe(&device)));
    let mut pipe = CosmosPipeline::load(&args.model, dtype, &device)?;
    let mut extra = Vec::new();
    for spec in &args.controlnets {
        let (kind, reference) = parse_controlnet(spec)?;
        let repo = pipeline::Repository::parse(&reference).with_context(|| format!("--controlnet {spec}"))?;
        let net = pipeline::load_controlnet(
            &repo,
            "controlnet",
            pipe.transformer.config(),
            pipe.vae.config().z_dim,
            dtype,
            &device,
        )
        .with_context(|| format!("--controlnet {spec}"))?;
        extra.push((kind, net));
    }
    if args.iterations > 0 {
        // As Predict's: block inputs kept, not graphs, and tiled attention, in both models.
        let mode = super::transformer::MemoryMode::low_memory();
        pipe.transformer.set_memory_mode(mode)?;
        if let Some(c) = pipe.controlnet.as_mut() {
            c.set_memory_mode(mode)?;
        }
        for (_, c) in &mut extra {
            c.set_memory_mode(mode)?;
        }
    }
    let seconds_load = started.elapsed().as_secs_f64();
    let steps = args.steps.unwrap_or(kind.default_steps());
    let guidance = app::guidance(args, kind);

    // ControlNet 0 is the repository's; then the --controlnet ones in order.
    let own = pipe.controlnet.as_ref().context("the repository has no controlnet/")?;
    let mut nets = vec![own];
    nets.extend(extra.iter().map(|(_, n)| n));
    let controls = specs
        .iter()
        .zip(control_videos)
        .zip(&weights)
        .map(|((s, video), w)| ControlVideo {
            name: s.kind.name().to_string(),
            video,
            controlnet: extra.iter().position(|(k, _)| *k == s.kind).map_or(0, |i| i + 1),
            scale: ConditioningScale::All(*w),
        })
        .collect::<Vec<_>>();
    let latents =
        app::initial_latents(args, &pipe.latent_shape(1, args.chunk_frames, args.height, args.width), &device)?;
    let req = TransferRequest {
        controls,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames,
        chunk_frames: args.chunk_frames,
        conditional_frames: args.conditional_frames,
        steps,
        guidance,
        latents,
    };
    let mut run = TransferRun::new(&pipe, nets, req)?;
    let out_claim = out_dir.claim()?;
    let out = out_claim.path().to_path_buf();
    log(&format!(
        "{} frames in {} chunk(s) of {} ({:?}), {steps} steps, guidance {guidance}",
        run.plan.num_frames,
        run.plan.chunks.len(),
        run.plan.chunk_frames,
        run.plan.chunks
    ));

    let z0 = run.request().latents.to_dtype(dtype)?;
    let mut befores = Vec::new();
    let mut chunk_reports = Vec::new();
    let mut schedule_sigmas = Vec::new();
    let sampling = Instant::now();
    while let Some(k) = run.next_chunk() {
        let (start, end) = run.plan.chunks[k];
        let prepared = run.prepare_chunk()?;
        schedule_sigmas = prepared.schedule.sigmas.clone();
        let plan = app::churn_plan(args, noise_mode, &prepared.schedule);
        let traj = Trajectory {
            denoiser: prepared.denoiser.as_ref(),
            solver: prepared.solver.as_ref(),
            cond: &prepared.cond,
            schedule: prepared.schedule.clone(),
            plan,
        };
        let chunk_started = Instant::now();
        let (latents, report) = if args.iterations == 0 {
            let noise = app::noise_state(args.seed, &z0, &traj.plan, noise_mode, false)?;
            (traj.sample_state(&noise)?, serde_json::json!({"frames": [start, end]}))
        } else {
            let input = objective_input.as_ref().context("--iterations > 0 needs an objective")?;
            let objective = DecodedObjective {
                vae: &pipe.vae,
                inner: FirstFrames { frames: end - start, inner: chunk_objective(input, start, end, dtype)? },
            };
            let noise = app::noise_state(args.seed, &z0, &traj.plan, noise_mode, true)?;
            let settings = OptimizeSettings {
                iterations: args.iterations,
                optimizer: shared::params::OptimizerConfig::adam(args.lr),
                direction,
                grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
                chi_reg: args.chi_reg,
                grad_mode: GradMode::Recompute,
                constraint: Default::default(),
            };
            let mut history = Vec::new();
            let outcome = optimize(&traj, &noise, &objective, &settings, |r| {
                log(&format!("chunk {k}, iteration {}: loss {:.6}, |∇z0| {:.3e}", r.iteration, r.loss, r.grad_z0.norm));
                history.push(serde_json::to_value(r).unwrap_or_default());
            })?;
            befores.push(pipe.vae.decode(&pipe.vae.denormalize_latents(&outcome.initial_output)?)?.detach());
            let report = serde_json::json!({
                "frames": [start, end], "objective": objective.describe(),
                "initial_loss": outcome.initial_loss, "final_loss": outcome.final_loss, "history": history,
            });
            (outcome.final_output, report)
        };
        drop(traj);
        drop(prepared);
        run.finish_chunk(&latents)?;
        log(&format!("chunk {k} (frames {start}..{end}) done in {:.1} s", chunk_started.elapsed().as_secs_f64()));
        chunk_reports.push(report);
    }
    let (final_latents, video) = run.outputs()?;
    let seconds_sample = sampling.elapsed().as_secs_f64();

    let mut files = Vec::new();
    let losses = |key: &str| -> Option<f64> {
        let v: Vec<f64> = chunk_reports.iter().filter_map(|r| r[key].as_f64()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let (initial_loss, final_loss) = (losses("initial_loss"), losses("final_loss"));
    if !befores.is_empty() {
        let before = join_chunks(&befores, run.plan.conditional_frames, run.plan.num_frames)?
            .clamp(-1.0, 1.0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        files.extend(crate::report::write_frames(&out, "before", &before)?);
        let after = video.affine(2.0, -1.0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        files.push(crate::report::write_comparison(&out, &before, &after)?);
    }
    let fps = app::DEFAULT_MP4_FPS;
    let mut mp4 = serde_json::Map::new();
    mp4.insert("video".into(), app::write_sample(&out, &video, &final_latents, fps, &mut files, &mut log)?);
    for c in &run.request().controls {
        let used = c.video.narrow(2, 0, run.plan.num_frames)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let stem = format!("control_{}", c.name);
        files.extend(crate::report::write_frames(&out, &stem, &used)?);
        mp4.insert(stem.clone(), app::write_mp4_logged(&out, &format!("{stem}.mp4"), &used, fps, &mut files, &mut log));
    }
    let summary = CosmosSummary { seconds_load, seconds_sample, initial_loss, final_loss, files };
    let report = serde_json::json!({
        "model": pipe.repository,
        "pipeline": pipe.kind,
        "dtype": format!("{dtype:?}"),
        "device": shared::device::describe(&device),
        "height": args.height, "width": args.width, "num_frames": run.plan.num_frames,
        "chunks": run.plan, "chunk_results": chunk_reports,
        "controls": specs.iter().zip(&weights).map(|(s, w)| serde_json::json!({
            "kind": s.kind.name(), "path": s.path, "weight_given": s.weight, "conditioning_scale": w,
            "computed_from": if s.path.is_none() { args.video.clone() } else { None },
        })).collect::<Vec<_>>(),
        "controlnets": args.controlnets,
        "edge_threshold": args.edge_threshold, "blur_strength": args.blur_strength,
        "steps": steps, "guidance": guidance,
        "scheduler": pipe.scheduler,
        "seed": args.seed, "latents": args.latents, "prompt_embeds": args.prompt_embeds,
        "iterations": args.iterations, "lr": args.lr, "direction": args.direction,
        "z0_optimisation": "per chunk (chunks before fixed): the VAE encoder re-encoding the conditioning frame carries no gradient",
        "sigmas": schedule_sigmas,
        "noise_mode": noise_mode.name(),
        "params_file": params_applied,
        "video_mp4": mp4,
        "summary": &summary,
    });
    shared::io::write_json_atomic(&out.join("report.json"), &report)?;
    log(&format!("wrote {} ({} s load, {:.2} s sampling)", out.display(), seconds_load.round(), seconds_sample));
    Ok(summary)
}

/// The objective of one chunk's frames [start, end) of the video.
fn chunk_objective(
    input: &app::ObjectiveInput,
    start: usize,
    end: usize,
    dtype: DType,
) -> anyhow::Result<Box<dyn Objective>> {
    let n = end - start;
    Ok(match input {
        app::ObjectiveInput::Target { video, label } => Box::new(TargetMse {
            target: video.narrow(2, start, n)?.to_dtype(dtype)?,
            label: format!("{label}, frames {start}..{end}"),
        }),
        app::ObjectiveInput::Policy { policy, states, actions, height, device } => {
            anyhow::ensure!(n >= 2, "the policy objective needs chunks of at least 2 frames; frames {start}..{end}");
            Box::new(super::policy::PolicyOnVideo::new(
                (**policy).clone(),
                &states.narrow(1, start, n)?,
                &actions.narrow(1, start, n)?,
                *height,
                device,
            )?)
        }
    })
}
