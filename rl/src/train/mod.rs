//! Training LAPO on a bimanual-pucks dataset, top to bottom: check every option and output,
//! collect the dataset if it is missing, build the model (or restore it from the run's
//! checkpoint on `--resume`), optionally pretrain the encoder's privileged-state head, then the
//! LAPO iterations with their logs, evaluations, audits and checkpoints, and last the exported
//! policy, learning curve and final evaluation. `train` only parses [`TrainConfig`] and calls
//! [`run`].
//!
//! Nothing is lost or silently wrong: every argument is checked before any work (ranges, and a
//! memory estimate for sizes that cannot fit); a run directory that holds anything is refused
//! unless `--overwrite` (replaced whole) or `--resume` (continued, after comparing the stored
//! configuration with the command line); a run is locked while it trains; a dataset directory
//! without `meta.json` (an interrupted collection) is never collected over; and a checkpoint or
//! policy is written only from a state whose tensors are finite and whose critic is within the
//! divergence bound ([`crate::trainer::DivergenceBound`]), so "the last good checkpoint" is good.

pub mod config;
pub mod inputs;
pub mod resume;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use shared::metrics::{progress_bar, read_jsonl, JsonlWriter};
use shared::outputs::{claim_dir, Existing};

pub use config::{TrainConfig, DEFAULT_DATASET_EPISODES};
use inputs::{check_export, check_memory, check_run_dir, collect, dataset_fingerprint, DataSource};
pub use resume::MAY_DIFFER_ON_RESUME;
use resume::{check_fingerprint, check_resume, truncate_metrics};

use crate::encoders::load_pretrained_resnet18;
use crate::env::EnvConfig;
use crate::lapo::{EncoderOwner, Lapo};
use crate::plot::{line_charts, Series, PALETTE};
use crate::trainer::{check_state, checkpoint_paths, evaluate, load_checkpoint, read_checkpoint_info, save_checkpoint};
use crate::trainer::{evaluate_offline, DivergenceBound, Evaluation, OfflineEvaluation, Replay};

/// What a finished run reports; also its `final_eval.json`. A run on our environment's data is
/// scored in the environment (`eval`, against the data's `behaviour_score`); a run on an
/// imported dataset, which has no simulator here, by held-out metrics (`offline_eval`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beats_behaviour: Option<bool>,
    /// The dataset's mean normalised score (its behaviour policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behaviour_score: Option<f64>,
    /// The last evaluation in the environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<Evaluation>,
    /// The last held-out evaluation (imported datasets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_eval: Option<OfflineEvaluation>,
    pub iterations: u64,
    /// Wall-clock seconds of the LAPO iterations in this process.
    pub train_seconds: f64,
}

/// Trains (or continues, with `config.resume`) the run `config` describes, writing
/// `<runs_dir>/<name>/`: config.json, metrics.jsonl, checkpoint.{safetensors,json},
/// learning_curve.png, final_eval.json, policy.safetensors (and `--export`).
pub fn run(config: &TrainConfig) -> Result<RunSummary> {
    // Every argument first: nothing is read, collected or written with a bad one.
    config.checks().finish()?;
    let mode = Existing::from_flags(config.overwrite, config.resume)?;
    // Candle's CPU kernels size their pool from this variable on first use.
    std::env::set_var("RAYON_NUM_THREADS", config.threads.to_string());
    let device = shared::device::parse_device(&config.device)?;
    let run_dir = config.runs_dir.join(config.run_name());

    // Outputs and inputs, before any work.
    check_run_dir(&run_dir, mode, config.name.is_none())?;
    if let Some(path) = &config.export {
        check_export(path, config, &run_dir)?;
    }
    let source = DataSource::check(config)?;
    let collecting = source.collecting();
    let stored = if config.resume { Some(check_resume(&run_dir, config, collecting)?) } else { None };
    if let (Some(reference), None) = (&config.pretrained, &stored) {
        // Resolved now so a missing file fails before the dataset is collected (a resumed run
        // takes its weights from the checkpoint).
        shared::weights::resolve(reference).with_context(|| format!("--pretrained {reference}"))?;
    }
    if let Some(dir) = source.dataset_dir() {
        // Sizes are known before any work for our datasets (and conversions made before).
        check_memory(config, &device, dir, collecting)?;
    }

    // The data.
    if collecting {
        collect(config)?;
    }
    let dataset_dir = source.prepare(config)?;
    let held_out = source.held_out_episodes(config, &dataset_dir)?;
    if source.dataset_dir().is_none() {
        check_memory(config, &device, &dataset_dir, false)?;
    }
    let replay = Replay::open_split(&dataset_dir, config.lapo.encoder, config.lapo.gamma, held_out)?;
    let fingerprint = dataset_fingerprint(&dataset_dir)?;
    if let Some(stored) = &stored {
        check_fingerprint(stored, &fingerprint, &dataset_dir, &run_dir)?;
    }
    let meta = replay.dataset.meta();
    let behaviour = meta.behaviour_score().map(f64::from);
    match behaviour {
        Some(score) => eprintln!(
            "dataset {}: {} transitions, behaviour score {score:.2}, success {:.2}",
            dataset_dir.display(),
            replay.len(),
            meta.success_rate
        ),
        None => eprintln!(
            "dataset {}: {} training transitions, {} episodes held out for evaluation (no simulator for imported \
             data), cameras {:?}, state {} and action {} wide",
            dataset_dir.display(),
            replay.len(),
            held_out,
            meta.cameras,
            meta.state_dim,
            meta.action_dim
        ),
    }
    let env_config =
        meta.env.as_ref().map(|env| EnvConfig { render: config.lapo.encoder.uses_images(), ..env.clone() });

    // The model.
    let mut lapo = Lapo::new(config.lapo.clone(), replay.dims.clone(), replay.bounds, DType::F32, &device)?;
    if let (Some(reference), false) = (&config.pretrained, config.resume) {
        for prefix in ["encoder.", "target.encoder."] {
            load_pretrained_resnet18(&lapo.varmap, prefix, reference)?;
        }
    }
    let bound = DivergenceBound::new(&replay.bounds);

    // The first write: from here on this process holds the run's lock (until it exits), and an
    // overwritten run's old files are gone.
    let run = claim_dir(&run_dir, "--name", mode)?;
    let metrics_path = run.join("metrics.jsonl");
    let batch_size = config.lapo.batch_size;
    let mut metrics = if config.resume {
        let info = load_checkpoint(&mut lapo, run.path()).with_context(|| format!("resuming {}", run_dir.display()))?;
        // A checkpoint written before checkpoints were checked can hold a diverged state.
        let probe = replay.sample(batch_size, &mut lapo.iteration_rng(lapo.iteration, 3), DType::F32, &device)?;
        check_state(&lapo, &probe)
            .with_context(|| format!("{}: cannot be resumed", checkpoint_paths(run.path()).0.display()))?;
        eprintln!("resumed {} at iteration {}", run_dir.display(), info.iteration);
        truncate_metrics(&metrics_path, info.iteration)?;
        JsonlWriter::append(&metrics_path)?
    } else {
        // On --resume the stored configuration stays as it was written: it is the run's.
        shared::io::write_json_atomic(
            &run.join("config.json"),
            &serde_json::json!({"args": config, "lapo": lapo.config, "dims": replay.dims, "bounds": replay.bounds,
                "normalization": replay.norm, "behaviour_score": behaviour,
                "dataset_meta_tier": replay.dataset.meta().tier, "dataset_fingerprint": fingerprint,
                "held_out_episodes": held_out}),
        )?;
        JsonlWriter::create(&metrics_path)?
    };

    if config.pretrain_encoder > 0 && lapo.iteration == 0 {
        // A resumed run already holds its pretrained (and trained) encoder.
        pretrain_encoder(&mut lapo, &replay, config, &device, &mut metrics)?;
    }

    // LAPO. The audit only aborts for the design; ablations reproduce a known-bad ownership on
    // purpose.
    let owner = config.lapo.encoder_owner;
    let abort_on_audit = owner == EncoderOwner::Critic;
    let bar = progress_bar(config.iterations, "lapo");
    bar.set_position(lapo.iteration);
    let start = Instant::now();
    let mut last_checkpoint: Option<PathBuf> = config.resume.then(|| checkpoint_paths(run.path()).0);
    let last_good =
        |last: &Option<PathBuf>| last.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none yet".into());
    let mut last_eval: Option<Evaluation> = None;
    let mut last_offline: Option<OfflineEvaluation> = None;
    let mut last_batch = None;
    while lapo.iteration < config.iterations {
        let it = lapo.iteration;
        let mut rng = lapo.iteration_rng(it, 1);
        let batch = replay.sample(batch_size, &mut rng, DType::F32, &device)?;
        let audit_now = config.audit_every > 0 && it % config.audit_every == 0;
        let (losses, audit) = match lapo.train_step(&batch, audit_now) {
            Ok(out) => out,
            Err(crate::lapo::LapoError::NonFinite { iteration, stage, losses }) => {
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
                bar.println(format!("audit (ablation {owner:?}, not aborting):\n{table}"));
            } else if it == 0 {
                bar.println(audit.table());
            }
        }
        let done = lapo.iteration;
        if done % config.log_every == 0 {
            metrics.write(
                &serde_json::json!({"iteration": done, "elapsed_s": start.elapsed().as_secs_f64(), "losses": losses}),
            )?;
            bar.set_message(format!(
                "critic {:.4} vae {:.4} actor {:.3}",
                losses.critic, losses.actor_vae, losses.actor
            ));
        }
        if done % config.eval_every == 0 || done == config.iterations {
            let elapsed_s = start.elapsed().as_secs_f64();
            match &env_config {
                Some(env) => {
                    let eval = evaluate(&(&lapo, &replay.norm), env, config.eval_episodes, 0, |_| {})?;
                    metrics.write(&serde_json::json!({"iteration": done, "elapsed_s": elapsed_s, "eval": eval}))?;
                    bar.println(format!(
                        "iter {done}: score {:.2} ± {:.2}, success {:.2} (behaviour {:.2})",
                        eval.normalized_score,
                        eval.normalized_score_std,
                        eval.success_rate,
                        behaviour.unwrap_or(f64::NAN)
                    ));
                    last_eval = Some(eval);
                }
                None => {
                    let eval = evaluate_offline(&lapo, &replay)?;
                    metrics
                        .write(&serde_json::json!({"iteration": done, "elapsed_s": elapsed_s, "offline_eval": eval}))?;
                    bar.println(format!(
                        "iter {done}: held-out action mse {:.4} (mean action {:.4}), vae {:.4}, td {:.4}, Q {:.2}",
                        eval.action_mse, eval.mean_action_mse, eval.vae_reconstruction_mse, eval.td_mse, eval.q_mean
                    ));
                    last_offline = Some(eval);
                }
            }
        }
        if done % config.checkpoint_every == 0 || done == config.iterations {
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

    // The results. The policy is written from a good state only (a resumed run that trained no
    // further was checked when its checkpoint was loaded).
    if let Some(batch) = &last_batch {
        check_state(&lapo, batch).with_context(|| {
            format!("not exporting the policy; last good checkpoint: {}", last_good(&last_checkpoint))
        })?;
    }
    if last_eval.is_none() && last_offline.is_none() {
        // Resumed at (or past) the last iteration: nothing was evaluated in this process, and the
        // summary must not report an empty evaluation as the final score.
        match &env_config {
            Some(env) => last_eval = Some(evaluate(&(&lapo, &replay.norm), env, config.eval_episodes, 0, |_| {})?),
            None => last_offline = Some(evaluate_offline(&lapo, &replay)?),
        }
    }
    crate::policy::export(&lapo, &replay.norm, &run.join("policy.safetensors"))?;
    if let Some(path) = &config.export {
        crate::policy::export(&lapo, &replay.norm, path)?;
    }
    plot_run(&metrics_path, &run.join("learning_curve.png"), behaviour)?;
    let summary = RunSummary {
        beats_behaviour: last_eval.as_ref().zip(behaviour).map(|(eval, b)| eval.normalized_score > b),
        behaviour_score: behaviour,
        eval: last_eval,
        offline_eval: last_offline,
        iterations: lapo.iteration,
        train_seconds: elapsed,
    };
    // Through a JSON value: its keys are sorted, as every JSON file of a run.
    shared::io::write_json_atomic(&run.join("final_eval.json"), &serde_json::to_value(&summary)?)?;
    let _ = read_checkpoint_info(run.path())?;
    drop(run);
    Ok(summary)
}

/// Before LAPO (`--pretrain-encoder N`): N steps fitting the encoder's privileged-state head
/// alone, with its own Adam optimiser and sample stream, then the encoder copied to its target.
fn pretrain_encoder(
    lapo: &mut Lapo,
    replay: &Replay,
    config: &TrainConfig,
    device: &Device,
    metrics: &mut JsonlWriter,
) -> Result<()> {
    let encoder_vars = lapo.partitions.vars(crate::lapo::groups::ENCODER)?;
    let mut opt = shared::params::GroupOptimizer::new(
        "encoder_pretraining",
        encoder_vars,
        shared::params::OptimizerConfig::adam(config.pretrain_lr),
    )?;
    let bar = progress_bar(config.pretrain_encoder, "encoder pretraining");
    for i in 0..config.pretrain_encoder {
        // Its own sample stream (stream 2), so LAPO's batches are the same with or without it.
        let mut rng = lapo.iteration_rng(i, 2);
        let batch = replay.sample(config.lapo.batch_size, &mut rng, DType::F32, device)?;
        let loss = lapo.pretrain_encoder_step(&batch, &mut opt)?;
        if (i + 1) % config.log_every == 0 {
            metrics.write(&serde_json::json!({"pretrain_iteration": i + 1, "aux_state": loss}))?;
            bar.set_message(format!("aux {loss:.4}"));
        }
        bar.inc(1);
    }
    bar.finish();
    lapo.sync_target_encoder()?;
    Ok(())
}

/// Left: normalised score (and the behaviour line) vs iterations — for an imported dataset the
/// held-out action error of the policy and of the mean action; right: critic loss.
pub fn plot_run(metrics_path: &Path, png: &Path, behaviour: Option<f64>) -> Result<()> {
    let rows = read_jsonl(metrics_path)?;
    let mut score = Vec::new();
    let mut critic = Vec::new();
    let (mut action_mse, mut baseline) = (Vec::new(), Vec::new());
    for r in &rows {
        let it = r["iteration"].as_f64().unwrap_or(0.0);
        if let Some(s) = r["eval"]["normalized_score"].as_f64() {
            score.push((it, s));
        }
        if let Some(e) = r["offline_eval"]["action_mse"].as_f64() {
            action_mse.push((it, e));
        }
        if let Some(e) = r["offline_eval"]["mean_action_mse"].as_f64() {
            baseline.push((it, e));
        }
        if let Some(c) = r["losses"]["critic"].as_f64() {
            critic.push((it, c));
        }
    }
    let Some(behaviour) = behaviour else {
        return line_charts(
            &[
                vec![
                    Series { label: "held-out action mse".into(), points: action_mse, color: PALETTE[0] },
                    Series { label: "mean action".into(), points: baseline, color: PALETTE[7] },
                ],
                vec![Series { label: "critic loss".into(), points: critic, color: PALETTE[3] }],
            ],
            png,
        );
    };
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
