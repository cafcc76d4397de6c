//! `cargo run -p rl --release --bin train` — LAPO on a bimanual-pucks dataset.
//!
//! With no arguments: state-only LAPO on the embedded `medium` dataset (3000 noisy-expert
//! episodes collected into `datasets/medium` on first use, 16 px anti-aliased views so the
//! same data trains image policies), with defaults chosen to finish in under 15 minutes on a
//! 2-core CPU (measured: 10 min 54 s, collection included) and beat the data's behaviour
//! score (the reasons are on each option). Writes `runs/<name>/`: config.json, metrics.jsonl,
//! checkpoint.{safetensors,json}, learning_curve.png, final_eval.json, policy.safetensors.
//!
//! Nothing is lost or silently wrong: every argument is checked before any work (ranges, and a
//! memory estimate for sizes that cannot fit); a run directory that holds anything is refused
//! unless `--overwrite` (replaced whole) or `--resume` (continued, after comparing the stored
//! configuration with the command line); a run is locked while it trains; a dataset directory
//! without `meta.json` (an interrupted collection) is never collected over; and a checkpoint or
//! policy is written only from a state whose tensors are finite and whose critic is within the
//! divergence bound (`rl::trainer::DivergenceBound`), so "the last good checkpoint" is good.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use rl::dataset::writer::{collect_dataset, CollectConfig};
use rl::dataset::{dataset_state, DatasetState, Tier};
use rl::encoders::{load_pretrained_resnet18, EncoderKind, FeatureLayout};
use rl::env::EnvConfig;
use rl::env::NUM_CAMERAS;
use rl::lapo::{EncoderOwner, Lapo, LapoConfig};
use rl::plot::{line_charts, Series, PALETTE};
use rl::trainer::{
    check_state, checkpoint_paths, evaluate, load_checkpoint, read_checkpoint_info, save_checkpoint, DivergenceBound,
    Evaluation, Replay,
};
use shared::checks::{ensure_fits, ArgChecks};
use shared::metrics::{progress_bar, read_jsonl, JsonlWriter};
use shared::outputs::{check_dir, check_output_file, claim_dir, Existing};

/// 3000 noisy-expert episodes (~465k transitions, ~1.1 GB at 16 px, about a minute to
/// collect): with 300 episodes behaviour cloning generalised poorly to unseen layouts.
const DEFAULT_DATASET_EPISODES: usize = 3000;

#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(about = "Train LAPO (optionally multimodal) on a bimanual-pucks dataset")]
// Negative values reach the range checks (and their message) instead of being taken for flags.
#[command(allow_negative_numbers = true)]
struct Args {
    /// Dataset directory; a dataset of `--tier` is collected there from the embedded
    /// environment if missing.
    #[arg(long, default_value = "datasets/medium")]
    dataset: PathBuf,
    /// Tier collected when the dataset is missing: medium (the noisy expert; the default),
    /// mixed (random, medium and expert episodes), expert or random.
    #[arg(long, default_value = "medium")]
    tier: Tier,
    /// Episodes to collect when the dataset is missing.
    #[arg(long, default_value_t = DEFAULT_DATASET_EPISODES)]
    dataset_episodes: usize,
    /// Image side when collecting (the conv/ResNet encoders use it as is). 16 px with
    /// `--supersample 2` are the world model's own frames, so the sampler can stress-test a
    /// policy trained on them.
    #[arg(long, default_value_t = 16)]
    image_size: usize,
    /// Anti-aliasing when collecting: render at this many samples per pixel side.
    #[arg(long, default_value_t = 2)]
    supersample: usize,
    #[arg(long, value_enum, default_value = "none")]
    encoder: EncoderKind,
    /// Which optimiser owns the encoder: critic (the design), actor-vae (the source's bug), both.
    #[arg(long, value_enum, default_value = "critic")]
    encoder_owner: EncoderOwner,
    /// Weight of the auxiliary privileged-state head in the critic optimiser (image encoders
    /// only; 0 = the source design, where the encoder learns from TD errors alone). The image
    /// recipe that beats the behaviour policy is 1000 with `--aux-state-input --pretrain-encoder
    /// 8000 --feature-layout fused-state --batch-size 128` (rl/README.md: 58.7 ± 6.7 over 3
    /// seeds against the data's 52.45; 30 and 100 stayed below it).
    #[arg(long, default_value_t = 0.0)]
    aux_state_weight: f64,
    /// Put the auxiliary head inside the encoder and append its prediction to the feature (see
    /// `ObsEncoder::with_privileged_head`); needs `--aux-state-weight` > 0.
    #[arg(long)]
    aux_state_input: bool,
    /// What the image encoder's feature holds besides the head's prediction: `fused` (the
    /// source design), `fused-state` (+ the joint state as it is), `state` (the joint state and
    /// the head's prediction only; needs `--aux-state-input`).
    #[arg(long, value_enum, default_value = "fused")]
    feature_layout: FeatureLayout,
    /// Iterations fitting the encoder's privileged-state head alone before LAPO starts (needs
    /// `--aux-state-input`); learning rate `--pretrain-lr`.
    #[arg(long, default_value_t = 0)]
    pretrain_encoder: u64,
    #[arg(long, default_value_t = 1e-3)]
    pretrain_lr: f64,
    /// ImageNet ResNet18 safetensors (path or `org/name[@rev]:file`), conv1 tiled ×3.
    #[arg(long)]
    pretrained: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads for tensor kernels. 1 by default: the state-only MLPs are too small to
    /// share, and on a busy 2-core machine two threads measured 7× slower (51 s vs 7.4 s per
    /// 100 iterations).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// 8000 iterations: 619 s state-only on one core, 10 min 54 s for the whole default command
    /// including collecting the dataset (measured on the 2-core CI-class machine). Seeds 0/1/2
    /// scored 85.5/87.4/83.1 at 8000 against the data's behaviour score 52.45.
    #[arg(long, default_value_t = 8000)]
    iterations: u64,
    /// Learning rates: the reference uses 2e-4 for all three over 10⁶ iterations; for a
    /// CPU-minutes budget the VAE learns at 1e-3 (measured: at 2e-4 the decoder had not yet
    /// reached behaviour-cloning quality at 3k iterations) and critic and actor at 3e-4.
    #[arg(long, default_value_t = 3e-4)]
    critic_lr: f64,
    #[arg(long, default_value_t = 1e-3)]
    actor_vae_lr: f64,
    #[arg(long, default_value_t = 3e-4)]
    actor_lr: f64,
    #[arg(long, default_value_t = 0.005)]
    tau: f64,
    #[arg(long, default_value_t = 0.99)]
    gamma: f64,
    #[arg(long, default_value_t = 0.9)]
    expectile: f64,
    #[arg(long, default_value_t = 1.0)]
    kl_beta: f64,
    /// Bound of the actor's latent (reference 2.0). With a critic trained for thousands, not
    /// millions, of iterations the actor chases its errors to latents far from the VAE's prior;
    /// 0.5 keeps it near the data (measured on `medium`, 3k iterations: 2.0 → −1.4, 1.0 → 4.4,
    /// 0.5 → 40.6; the target decoder alone at z = 0 scored 44).
    #[arg(long, default_value_t = 0.5)]
    max_latent_action: f64,
    #[arg(long, default_value_t = 1.0)]
    doubleq_min: f64,
    /// Latent size (default 2 × action_dim).
    #[arg(long)]
    latent_dim: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    policy_noise: f64,
    #[arg(long, default_value_t = 0.2)]
    noise_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate every N iterations (and at the end).
    #[arg(long, default_value_t = 2000)]
    eval_every: u64,
    #[arg(long, default_value_t = 20)]
    eval_episodes: usize,
    /// Run the gradient-flow audit at iteration 0 and every N iterations.
    #[arg(long, default_value_t = 5000)]
    audit_every: u64,
    #[arg(long, default_value_t = 100)]
    log_every: u64,
    #[arg(long, default_value_t = 2000)]
    checkpoint_every: u64,
    /// Run name (default: derived from encoder, owner and seed).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Continue runs/<name> from its checkpoint, bit-exactly. The command line must match the
    /// run's stored configuration except for options that do not change the run (--iterations
    /// to extend it, --threads, --device, the eval/log/audit/checkpoint intervals, --export).
    #[arg(long)]
    resume: bool,
    /// Replace runs/<name> whole if it holds a run (and an existing --export file).
    #[arg(long)]
    overwrite: bool,
    /// Also copy the exported policy here.
    #[arg(long)]
    export: Option<PathBuf>,
}

/// Config fields of a run (`config.json` "args") that `--resume` may change, each because it
/// does not alter what the run computes:
const MAY_DIFFER_ON_RESUME: &[(&str, &str)] = &[
    ("iterations", "where the run stops: raising it extends the run"),
    ("threads", "how many CPU threads run the same kernels"),
    ("device", "where the kernels run"),
    ("eval_every", "evaluations use their own environments and only read the model"),
    ("eval_episodes", "as --eval-every"),
    ("log_every", "which losses are written to metrics.jsonl"),
    ("audit_every", "the audit reads gradients and snapshots; it never changes a var or draws a random number"),
    ("checkpoint_every", "when the state is saved, not what it is"),
    ("name", "the run is found by it"),
    ("runs_dir", "as --name"),
    ("dataset", "the path may move; the dataset itself is compared by its fingerprint"),
    // How a missing dataset is collected: a resumed run never collects (its dataset must be
    // there, and is compared by its fingerprint).
    ("tier", "collection only"),
    ("dataset_episodes", "collection only"),
    ("image_size", "collection only"),
    ("supersample", "collection only"),
    ("export", "an extra copy of the result"),
    ("resume", "the mode of this invocation"),
    ("overwrite", "the mode of this invocation"),
];

fn main() -> Result<()> {
    let args = Args::parse();
    // Every argument first: nothing is read, collected or written with a bad one.
    check_args(&args)?;
    let mode = Existing::from_flags(args.overwrite, args.resume)?;
    // Candle's CPU kernels size their pool from this variable on first use.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let device = shared::device::parse_device(&args.device)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("lapo-{:?}-{:?}-s{}", args.encoder, args.encoder_owner, args.seed).to_lowercase());
    let run_dir = args.runs_dir.join(&name);

    // Outputs and inputs, before any work.
    check_run_dir(&run_dir, mode, args.name.is_none())?;
    if let Some(path) = &args.export {
        check_export(path, &args, &run_dir)?;
    }
    let dataset = check_dataset_dir(&args.dataset)?;
    let collecting = dataset == DatasetState::Absent;
    let stored = if args.resume { Some(check_resume(&run_dir, &args, collecting)?) } else { None };
    if let (Some(reference), None) = (&args.pretrained, &stored) {
        // Resolved now so a missing file fails before the dataset is collected (a resumed run
        // takes its weights from the checkpoint).
        shared::weights::resolve(reference).with_context(|| format!("--pretrained {reference}"))?;
    }
    check_memory(&args, &device, collecting)?;

    if collecting {
        collect(&args)?;
    }
    let replay = Replay::open(&args.dataset, args.encoder, args.gamma)?;
    let fingerprint = dataset_fingerprint(&args.dataset)?;
    if let Some(stored) = &stored {
        match stored.get("dataset_fingerprint").and_then(|v| v.as_str()) {
            Some(recorded) if recorded != fingerprint => anyhow::bail!(
                "--dataset {}: a different dataset than the run was trained on (its meta.json has {fingerprint}, \
                 {} recorded {recorded}); give the run's dataset, or start a new run with --name",
                args.dataset.display(),
                run_dir.join("config.json").display()
            ),
            Some(_) => {}
            None => eprintln!(
                "note: {} records no dataset fingerprint (written before it was recorded); the dataset is not compared",
                run_dir.join("config.json").display()
            ),
        }
    }
    let behaviour = replay.dataset.meta().mean_normalized_score as f64;
    eprintln!(
        "dataset {}: {} transitions, behaviour score {:.2}, success {:.2}",
        args.dataset.display(),
        replay.len(),
        behaviour,
        replay.dataset.meta().success_rate
    );
    let env_config = EnvConfig { render: args.encoder.uses_images(), ..replay.dataset.meta().env.clone() };

    let config = lapo_config(&args);
    let mut lapo = Lapo::new(config.clone(), replay.dims, replay.bounds, DType::F32, &device)?;
    if let (Some(reference), false) = (&args.pretrained, args.resume) {
        for prefix in ["encoder.", "target.encoder."] {
            load_pretrained_resnet18(&lapo.varmap, prefix, reference)?;
        }
    }
    let bound = DivergenceBound::new(&replay.bounds);

    // The first write: from here on this process holds the run's lock (until it exits), and an
    // overwritten run's old files are gone.
    let run = claim_dir(&run_dir, "--name", mode)?;
    let metrics_path = run.join("metrics.jsonl");
    let mut metrics = if args.resume {
        let info = load_checkpoint(&mut lapo, run.path()).with_context(|| format!("resuming {}", run_dir.display()))?;
        // A checkpoint written before checkpoints were checked can hold a diverged state.
        let probe = replay.sample(args.batch_size, &mut lapo.iteration_rng(lapo.iteration, 3), DType::F32, &device)?;
        check_state(&lapo, &probe)
            .with_context(|| format!("{}: cannot be resumed", checkpoint_paths(run.path()).0.display()))?;
        eprintln!("resumed {} at iteration {}", run_dir.display(), info.iteration);
        truncate_metrics(&metrics_path, info.iteration)?;
        JsonlWriter::append(&metrics_path)?
    } else {
        // On --resume the stored configuration stays as it was written: it is the run's.
        shared::io::write_json_atomic(
            &run.join("config.json"),
            &serde_json::json!({"args": args, "lapo": config, "dims": replay.dims, "bounds": replay.bounds,
                "normalization": replay.norm, "behaviour_score": behaviour,
                "dataset_meta_tier": replay.dataset.meta().tier, "dataset_fingerprint": fingerprint}),
        )?;
        JsonlWriter::create(&metrics_path)?
    };

    if args.pretrain_encoder > 0 && lapo.iteration == 0 {
        // A resumed run already holds its pretrained (and trained) encoder.
        let encoder_vars = lapo.partitions.vars(rl::lapo::groups::ENCODER)?;
        let mut opt = shared::params::GroupOptimizer::new(
            "encoder_pretraining",
            encoder_vars,
            shared::params::OptimizerConfig::adam(args.pretrain_lr),
        )?;
        let bar = progress_bar(args.pretrain_encoder, "encoder pretraining");
        for i in 0..args.pretrain_encoder {
            // Its own sample stream (stream 2), so LAPO's batches are the same with or without it.
            let mut rng = lapo.iteration_rng(i, 2);
            let batch = replay.sample(args.batch_size, &mut rng, DType::F32, &device)?;
            let loss = lapo.pretrain_encoder_step(&batch, &mut opt)?;
            if (i + 1) % args.log_every == 0 {
                metrics.write(&serde_json::json!({"pretrain_iteration": i + 1, "aux_state": loss}))?;
                bar.set_message(format!("aux {loss:.4}"));
            }
            bar.inc(1);
        }
        bar.finish();
        lapo.sync_target_encoder()?;
    }

    // The audit only aborts for the design; ablations reproduce a known-bad ownership on purpose.
    let abort_on_audit = args.encoder_owner == EncoderOwner::Critic;
    let bar = progress_bar(args.iterations, "lapo");
    bar.set_position(lapo.iteration);
    let start = Instant::now();
    let mut last_checkpoint: Option<PathBuf> = args.resume.then(|| checkpoint_paths(run.path()).0);
    let last_good =
        |last: &Option<PathBuf>| last.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none yet".into());
    let mut last_eval = Evaluation::default();
    let mut last_batch = None;
    while lapo.iteration < args.iterations {
        let it = lapo.iteration;
        let mut rng = lapo.iteration_rng(it, 1);
        let batch = replay.sample(args.batch_size, &mut rng, DType::F32, &device)?;
        let audit_now = args.audit_every > 0 && it % args.audit_every == 0;
        let (losses, audit) = match lapo.train_step(&batch, audit_now) {
            Ok(out) => out,
            Err(rl::lapo::LapoError::NonFinite { iteration, stage, losses }) => {
                anyhow::bail!(
                    "non-finite {stage} at iteration {iteration}; loss terms {losses:?}; stopping without writing \
                     a checkpoint or policy; last good checkpoint: {}",
                    last_good(&last_checkpoint)
                );
            }
            Err(e) => return Err(e.into()),
        };
        // Every iteration: the losses are at hand, and a divergence caught here never reaches a file.
        if let Err(what) = bound.check_losses(&losses) {
            anyhow::bail!(
                "diverged at iteration {it}: {what}; stopping without writing a checkpoint or policy; \
                 last good checkpoint: {}",
                last_good(&last_checkpoint)
            );
        }
        if let Some(audit) = audit {
            metrics.write(&serde_json::json!({"iteration": it, "audit": audit}))?;
            if !audit.passed() {
                let table = audit.table();
                if abort_on_audit {
                    anyhow::bail!("gradient-flow audit failed at iteration {it}:\n{table}");
                }
                bar.println(format!("audit (ablation {:?}, not aborting):\n{table}", args.encoder_owner));
            } else if it == 0 {
                bar.println(audit.table());
            }
        }
        let done = lapo.iteration;
        if done % args.log_every == 0 {
            metrics.write(
                &serde_json::json!({"iteration": done, "elapsed_s": start.elapsed().as_secs_f64(), "losses": losses}),
            )?;
            bar.set_message(format!(
                "critic {:.4} vae {:.4} actor {:.3}",
                losses.critic, losses.actor_vae, losses.actor
            ));
        }
        if done % args.eval_every == 0 || done == args.iterations {
            last_eval = evaluate(&(&lapo, &replay.norm), &env_config, args.eval_episodes, 0, |_| {})?;
            metrics.write(
                &serde_json::json!({"iteration": done, "elapsed_s": start.elapsed().as_secs_f64(), "eval": last_eval}),
            )?;
            bar.println(format!(
                "iter {done}: score {:.2} ± {:.2}, success {:.2} (behaviour {:.2})",
                last_eval.normalized_score, last_eval.normalized_score_std, last_eval.success_rate, behaviour
            ));
        }
        if done % args.checkpoint_every == 0 || done == args.iterations {
            let saved = save_checkpoint(&lapo, &replay.norm, run.path(), &batch).with_context(|| {
                format!("iteration {done}: stopping; last good checkpoint: {}", last_good(&last_checkpoint))
            })?;
            last_checkpoint = Some(saved);
        }
        last_batch = Some(batch);
        bar.set_position(done);
    }
    bar.finish();
    let elapsed = start.elapsed().as_secs_f64();
    // The policy is written from a good state only (a resumed run that trained no further was
    // checked when its checkpoint was loaded).
    if let Some(batch) = &last_batch {
        check_state(&lapo, batch).with_context(|| {
            format!("not exporting the policy; last good checkpoint: {}", last_good(&last_checkpoint))
        })?;
    }
    if last_eval.episodes == 0 {
        // Resumed at (or past) the last iteration: nothing was evaluated in this process, and the
        // summary must not report an empty evaluation as the final score.
        last_eval = evaluate(&(&lapo, &replay.norm), &env_config, args.eval_episodes, 0, |_| {})?;
    }

    rl::policy::export(&lapo, &replay.norm, &run.join("policy.safetensors"))?;
    if let Some(path) = &args.export {
        rl::policy::export(&lapo, &replay.norm, path)?;
    }
    plot_run(&metrics_path, &run.join("learning_curve.png"), behaviour)?;
    let summary = serde_json::json!({"iterations": lapo.iteration, "train_seconds": elapsed, "eval": last_eval,
        "behaviour_score": behaviour, "beats_behaviour": last_eval.normalized_score > behaviour});
    shared::io::write_json_atomic(&run.join("final_eval.json"), &summary)?;
    println!("{}", serde_json::to_string(&summary)?);
    let _ = read_checkpoint_info(run.path())?;
    drop(run);
    Ok(())
}

fn lapo_config(args: &Args) -> LapoConfig {
    LapoConfig {
        batch_size: args.batch_size,
        critic_lr: args.critic_lr,
        actor_vae_lr: args.actor_vae_lr,
        actor_lr: args.actor_lr,
        tau: args.tau,
        gamma: args.gamma,
        expectile: args.expectile,
        kl_beta: args.kl_beta,
        max_latent_action: args.max_latent_action,
        doubleq_min: args.doubleq_min,
        latent_dim: args.latent_dim,
        policy_noise: args.policy_noise,
        noise_clip: args.noise_clip,
        encoder: args.encoder,
        encoder_owner: args.encoder_owner,
        aux_state_weight: args.aux_state_weight,
        aux_state_input: args.aux_state_input,
        feature_layout: args.feature_layout,
        seed: args.seed,
    }
}

/// Every range and option conflict, reported together in one error.
fn check_args(args: &Args) -> Result<()> {
    let mut c = ArgChecks::new();
    c.extend(lapo_config(args).checks());
    c.count("--iterations", args.iterations)
        .count("--log-every", args.log_every)
        .count("--eval-every", args.eval_every)
        .count("--checkpoint-every", args.checkpoint_every)
        .count("--eval-episodes", args.eval_episodes as u64)
        .count("--dataset-episodes", args.dataset_episodes as u64)
        // Each pool thread reserves its own stack; far beyond any core count is a typo.
        .count_at_most("--threads", args.threads as u64, 1024, "threads of the kernel pool")
        .positive("--pretrain-lr", args.pretrain_lr)
        // The renderer's limits (`Env::new`), checked here so they fail before anything else.
        .require((16..=1024).contains(&args.image_size), || {
            format!("--image-size must be in 16..=1024 (the renderer's range), got {}", args.image_size)
        })
        .require((1..=8).contains(&args.supersample), || {
            format!("--supersample must be in 1..=8, got {}", args.supersample)
        })
        .require(!args.aux_state_input || (args.aux_state_weight > 0.0 && args.encoder.uses_images()), || {
            "--aux-state-input needs an image encoder and --aux-state-weight > 0".into()
        })
        .require(args.pretrain_encoder == 0 || args.aux_state_input, || {
            "--pretrain-encoder needs --aux-state-input".into()
        })
        .require(args.feature_layout == FeatureLayout::Fused || args.encoder.uses_images(), || {
            "--feature-layout needs an image encoder".into()
        })
        .require(args.feature_layout != FeatureLayout::State || args.aux_state_input, || {
            "--feature-layout state needs --aux-state-input (the images reach the networks only through the head)"
                .into()
        })
        .require(args.pretrained.is_none() || args.encoder == EncoderKind::ResNet18, || {
            "--pretrained needs --encoder resnet18".into()
        });
    if let Some(name) = &args.name {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\'])
            && Path::new(name).components().count() == 1;
        c.require(plain, || format!("--name must be a plain directory name (no path separators), got {name:?}"));
    }
    c.finish()
}

/// The run directory may be written in `mode`; a run already there is named with the three
/// ways on (a default name repeats whenever the same command is run again).
fn check_run_dir(run_dir: &Path, mode: Existing, default_name: bool) -> Result<()> {
    check_dir(run_dir, "--name", mode).map_err(|e| {
        let holds_a_run = mode == Existing::Refuse && !shared::outputs::contents(run_dir).unwrap_or_default().is_empty();
        if holds_a_run {
            let whose = if default_name { "the default name (from --encoder, --encoder-owner and --seed) is taken; " } else { "" };
            anyhow::anyhow!(
                "{e}\n{whose}pass --name NAME for a new run, --overwrite to replace this one, or --resume to continue it"
            )
        } else {
            e
        }
    })
}

/// `--export` must be writable. An existing file is replaced with `--overwrite`, and on
/// `--resume` when it is this run's own earlier export (the same bytes as its policy).
fn check_export(path: &Path, args: &Args, run_dir: &Path) -> Result<()> {
    let own_export = args.resume
        && path.is_file()
        && std::fs::read(path).ok().is_some_and(|b| std::fs::read(run_dir.join("policy.safetensors")).ok() == Some(b));
    check_output_file(path, "--export", args.overwrite || own_export)
}

/// What the dataset directory holds; an interrupted collection is refused, never collected over.
fn check_dataset_dir(dir: &Path) -> Result<DatasetState> {
    anyhow::ensure!(!dir.exists() || dir.is_dir(), "--dataset {}: exists and is not a directory", dir.display());
    let state = dataset_state(dir).with_context(|| format!("--dataset {}", dir.display()))?;
    if let DatasetState::Incomplete { files } = &state {
        // Neither read nor collected over.
        let incomplete = rl::dataset::DatasetError::Incomplete { dir: dir.to_path_buf(), files: files.clone() };
        anyhow::bail!("--dataset {incomplete}");
    }
    Ok(state)
}

/// `--resume`: the run's stored configuration, after checking that the run can be continued
/// and that the command line changes nothing that alters it (all differences in one error).
fn check_resume(run_dir: &Path, args: &Args, collecting: bool) -> Result<serde_json::Value> {
    let config_path = run_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!("--resume: reading {} (is {} a training run?)", config_path.display(), run_dir.display())
    })?;
    let stored: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--resume: {} is not valid JSON", config_path.display()))?;
    let stored_args = stored
        .get("args")
        .filter(|a| a.is_object())
        .with_context(|| format!("--resume: {} has no \"args\" object", config_path.display()))?;
    anyhow::ensure!(
        checkpoint_paths(run_dir).1.is_file(),
        "--resume {}: the run has no checkpoint yet (it stopped before --checkpoint-every iterations); \
         start it again with --overwrite",
        run_dir.display()
    );
    // Collecting a dataset for a resumed run could only give the run's own dataset by chance
    // (its fingerprint is compared after): the run's dataset must be given.
    anyhow::ensure!(
        !collecting,
        "--resume {}: --dataset {} is absent or empty; give the dataset the run was trained on (a resumed run \
         never collects one)",
        run_dir.display(),
        args.dataset.display()
    );
    let current = serde_json::to_value(args)?;
    // A field the stored args lack (a run from before the option existed) ran at its default.
    let defaults = serde_json::to_value(Args::parse_from(["train"]))?;
    let mut changes = Vec::new();
    for (field, now) in current.as_object().into_iter().flatten() {
        if MAY_DIFFER_ON_RESUME.iter().any(|(f, _)| f == field) {
            continue;
        }
        let then = stored_args.get(field).or_else(|| defaults.get(field)).unwrap_or(&serde_json::Value::Null);
        if then != now {
            changes.push(format!("--{}: stored {then}, command line {now}", field.replace('_', "-")));
        }
    }
    if !changes.is_empty() {
        anyhow::bail!(
            "--resume {}: the command line changes the run, whose configuration is in {}:\n  - {}\n\
             give the stored values to continue it, or start a new run with --name (or replace it with --overwrite)",
            run_dir.display(),
            config_path.display(),
            changes.join("\n  - ")
        );
    }
    Ok(stored)
}

/// Peak-memory growth per batch element of one training iteration, measured as the maximum
/// resident set of `train` at batch 2048 against 64 (`/usr/bin/time -v`, 16 px views): state-only
/// 58 KiB — the MLPs' activations and their gradients, ~160× the 360 B of inputs. Rounded up.
const STATE_BYTES_PER_SAMPLE: u128 = 64 << 10;

/// Image-encoder activations per byte of f32 input images (observation and next observation,
/// 2 × 9 × H × W × 4 B), from the same measurement: conv 247 KiB and ResNet18 1927 KiB per
/// element (ResNet18 at 512 against 64) beyond the MLPs' 58 KiB, over 18 KiB of images: 10.3×
/// and 101× (both scale with the pixel count). Rounded up.
fn image_activation_factor(encoder: EncoderKind) -> u128 {
    match encoder {
        EncoderKind::None => 0,
        EncoderKind::Conv => 12,
        EncoderKind::ResNet18 => 110,
    }
}

/// Refuses sizes that cannot fit, naming the flags that set them, before any work:
/// * the training batch and its activations, on the training device;
/// * the evaluation: `--eval-episodes` environments in lockstep (each with its renderer's
///   buffers when images are used) and one batched forward over them;
/// * collecting a missing dataset: shards stream to disk, so memory holds one episode per
///   worker thread (`CollectConfig::working_set_bytes`) and a few KiB of statistics per
///   episode until `meta.json` is written; the disk is not checked (a full disk fails with an
///   error naming the shard, and the incomplete directory is then refused, never reused).
fn check_memory(args: &Args, device: &Device, collecting: bool) -> Result<()> {
    let (h, w, ss) = if collecting {
        (args.image_size, args.image_size, args.supersample)
    } else {
        let meta = rl::dataset::Dataset::read_meta(&args.dataset)?;
        (meta.image_height, meta.image_width, meta.env.supersample)
    };
    let (h, w, ss) = (h as u128, w as u128, ss as u128);
    let images = args.encoder.uses_images();
    let image_bytes = if images { 2 * 3 * NUM_CAMERAS as u128 * h * w * 4 } else { 0 };
    let per_sample = STATE_BYTES_PER_SAMPLE + image_bytes * image_activation_factor(args.encoder);
    ensure_fits(
        device,
        args.batch_size as u128 * per_sample,
        &format!("--batch-size {} (with --encoder {:?}, {h}×{w} px views)", args.batch_size, args.encoder),
    )?;
    // A renderer keeps two frames at the supersampled size; an observation holds three views.
    let env_bytes = 4096 + if images { 2 * 3 * h * ss * w * ss + 2 * 3 * 3 * h * w } else { 0 };
    ensure_fits(
        &Device::Cpu,
        args.eval_episodes as u128 * env_bytes,
        &format!("--eval-episodes {}", args.eval_episodes),
    )?;
    ensure_fits(device, args.eval_episodes as u128 * per_sample, &format!("--eval-episodes {}", args.eval_episodes))?;
    if collecting {
        ensure_fits(
            &Device::Cpu,
            collect_config(args).working_set_bytes(),
            &format!(
                "collecting --dataset-episodes {} at --image-size {} --supersample {}",
                args.dataset_episodes, args.image_size, args.supersample
            ),
        )?;
    }
    Ok(())
}

/// What collecting a missing `--dataset` means.
fn collect_config(args: &Args) -> CollectConfig {
    CollectConfig {
        tier: args.tier,
        episodes: args.dataset_episodes,
        env: EnvConfig {
            supersample: args.supersample,
            ..EnvConfig::default().with_image_size(args.image_size, args.image_size)
        },
        ..CollectConfig::default()
    }
}

/// Collects the dataset of `--tier` into the (absent or empty) `--dataset` directory.
fn collect(args: &Args) -> Result<()> {
    eprintln!(
        "collecting the {} dataset ({} episodes) into {}",
        args.tier.name(),
        args.dataset_episodes,
        args.dataset.display()
    );
    let config = collect_config(args);
    let bar = progress_bar(args.dataset_episodes as u64, "collect");
    collect_dataset(&config, &args.dataset, &|| bar.inc(1))
        .with_context(|| format!("collecting into {}", args.dataset.display()))?;
    bar.finish();
    Ok(())
}

/// `sha256:<hex>` of the dataset's meta.json: it records every episode's seed, length and
/// return and every key's statistics, so another dataset (or the same directory collected
/// again differently) has another fingerprint.
fn dataset_fingerprint(dir: &Path) -> Result<String> {
    let path = dir.join(rl::dataset::META_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes)))
}

/// A resumed run drops metric lines past its checkpoint, so the log matches an uninterrupted one.
fn truncate_metrics(path: &Path, iteration: u64) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let keep: Vec<String> = read_jsonl(path)?
        .into_iter()
        .filter(|r| {
            let it = r["iteration"].as_u64().unwrap_or(0);
            // Audit records are written before their iteration completes.
            if r.get("audit").is_some() {
                it < iteration
            } else {
                it <= iteration
            }
        })
        .map(|r| r.to_string())
        .collect();
    let mut text = keep.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    shared::io::write_atomic(path, text.as_bytes())
}

/// Left: normalised score (and the behaviour line) vs iterations; right: critic loss.
pub fn plot_run(metrics_path: &Path, png: &Path, behaviour: f64) -> Result<()> {
    let rows = read_jsonl(metrics_path)?;
    let mut score = Vec::new();
    let mut critic = Vec::new();
    for r in &rows {
        let it = r["iteration"].as_f64().unwrap_or(0.0);
        if let Some(s) = r["eval"]["normalized_score"].as_f64() {
            score.push((it, s));
        }
        if let Some(c) = r["losses"]["critic"].as_f64() {
            critic.push((it, c));
        }
    }
    let xmax = score.last().map(|p| p.0).unwrap_or(1.0);
    line_charts(
        &[
            vec![
                Series { label: "score".into(), points: score, color: PALETTE[0] },
                Series {
                    label: "behaviour".into(),
                    points: vec![(0.0, behaviour), (xmax, behaviour)],
                    color: PALETTE[7],
                },
            ],
            vec![Series { label: "critic loss".into(), points: critic, color: PALETTE[3] }],
        ],
        png,
    )
}
