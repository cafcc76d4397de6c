//! `--resume`: which options may change when a run is continued, the comparison of the command
//! line (and the dataset) with the run's stored configuration, and the metrics log cut back to
//! the checkpoint, so a resumed run is the uninterrupted one bit for bit.

use std::path::Path;

use anyhow::{Context, Result};
use shared::metrics::read_jsonl;

use super::TrainConfig;
use crate::trainer::checkpoint_paths;

/// Config fields of a run (`config.json` "args") that `--resume` may change, each because it
/// does not alter what the run computes:
pub const MAY_DIFFER_ON_RESUME: &[(&str, &str)] = &[
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
    ("converted_dir", "as --dataset: where a conversion is cached, compared by the fingerprint"),
    // What is taken from an imported source decides the converted dataset, which is compared
    // by its fingerprint.
    ("cameras", "conversion only"),
    ("state_keys", "conversion only"),
    ("filter_key", "conversion only"),
    ("reward", "conversion only"),
    ("export", "an extra copy of the result"),
    ("resume", "the mode of this invocation"),
    ("overwrite", "the mode of this invocation"),
];

/// `--resume`: the run's stored configuration, after checking that the run can be continued
/// and that the command line changes nothing that alters it (all differences in one error).
pub fn check_resume(run_dir: &Path, config: &TrainConfig, collecting: bool) -> Result<serde_json::Value> {
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
        config.dataset.display()
    );
    let current = serde_json::to_value(config)?;
    // A field the stored args lack (a run from before the option existed) ran at its default.
    let defaults = serde_json::to_value(TrainConfig::default())?;
    let mut changes = Vec::new();
    for (field, now) in current.as_object().into_iter().flatten() {
        if MAY_DIFFER_ON_RESUME.iter().any(|(f, _)| f == field) {
            continue;
        }
        let legacy = legacy_value(field);
        let then = stored_args
            .get(field)
            .or(legacy.as_ref())
            .or_else(|| defaults.get(field))
            .unwrap_or(&serde_json::Value::Null);
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

/// What a run from before an option was recorded ran with, where that differs from today's
/// default: the networks had 2 hidden layers before `--hidden-layers` (default 3) existed.
fn legacy_value(field: &str) -> Option<serde_json::Value> {
    match field {
        "hidden_layers" => Some(serde_json::json!(crate::nets::LEGACY_HIDDEN_LAYERS)),
        _ => None,
    }
}

/// The dataset of a resumed run must be the one it was trained on: its fingerprint against the
/// one `stored` (the run's `config.json`) records.
pub fn check_fingerprint(stored: &serde_json::Value, fingerprint: &str, dataset: &Path, run_dir: &Path) -> Result<()> {
    match stored.get("dataset_fingerprint").and_then(|v| v.as_str()) {
        Some(recorded) if recorded != fingerprint => anyhow::bail!(
            "--dataset {}: a different dataset than the run was trained on (its meta.json has {fingerprint}, \
             {} recorded {recorded}); give the run's dataset, or start a new run with --name",
            dataset.display(),
            run_dir.join("config.json").display()
        ),
        Some(_) => {}
        None => eprintln!(
            "note: {} records no dataset fingerprint (written before it was recorded); the dataset is not compared",
            run_dir.join("config.json").display()
        ),
    }
    Ok(())
}

/// A resumed run drops metric lines past its checkpoint, so the log matches an uninterrupted one.
pub fn truncate_metrics(path: &Path, iteration: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: TrainConfig,
    }

    /// Every recorded field is a flag of the same name (the resume error names `--field`), and
    /// every field `--resume` may change is a recorded one.
    #[test]
    fn recorded_fields_are_the_flags() {
        let recorded = serde_json::to_value(TrainConfig::default()).unwrap();
        let recorded = recorded.as_object().unwrap();
        let command = Cli::command();
        let mut flags: Vec<String> =
            command.get_arguments().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect();
        flags.retain(|f| f != "help");
        flags.sort();
        let fields: Vec<String> = recorded.keys().cloned().collect();
        assert_eq!(fields, flags);
        for (field, _) in MAY_DIFFER_ON_RESUME {
            assert!(recorded.contains_key(*field), "{field} is not a recorded field");
        }
    }

    /// A run recorded before `--hidden-layers` existed ran with 2 hidden layers: resuming it with
    /// today's default (3) is a change that is named; with `--hidden-layers 2` it is none.
    #[test]
    fn a_run_from_before_the_depth_option_resumes_at_its_own_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let mut args = serde_json::to_value(TrainConfig::default()).unwrap();
        args.as_object_mut().unwrap().remove("hidden_layers");
        std::fs::write(run.join("config.json"), serde_json::json!({ "args": args }).to_string()).unwrap();
        std::fs::write(checkpoint_paths(run).1, b"{}").unwrap();
        let err = check_resume(run, &TrainConfig::default(), false).unwrap_err().to_string();
        assert!(err.contains("--hidden-layers: stored 2, command line 3"), "{err}");
        let mut at_two = TrainConfig::default();
        at_two.lapo.hidden_layers = 2;
        check_resume(run, &at_two, false).unwrap();
    }
}
