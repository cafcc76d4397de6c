//! `cargo run -p rl --release --bin ablation -- RUN_DIR...` — summarises training runs that
//! differ in which optimiser owns the encoder (`--encoder-owner`), the ablation of the source
//! system's fix. Runs are grouped by the owner recorded in each `config.json`; per owner it
//! reports mean ± std over seeds of the evaluation score at every evaluated iteration, the
//! critic loss (mean over windows of 500 iterations) and the first iteration whose mean score
//! passes `--threshold`, and writes `ablation.md`, `ablation.json` and `ablation.png` (score and
//! critic loss against iterations, one line per owner).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use rl::plot::{line_charts, Series, PALETTE};
use shared::metrics::read_jsonl;

#[derive(Parser, Debug)]
struct Args {
    /// Run directories (each with config.json and metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where the table, JSON and PNG go.
    #[arg(long, default_value = "runs/ablation")]
    out: PathBuf,
    /// Score that counts as "converged" for the iterations-to-threshold column.
    #[arg(long, default_value_t = 30.0)]
    threshold: f64,
    /// Critic-loss averaging window, in iterations.
    #[arg(long, default_value_t = 500)]
    window: u64,
    /// Replace ablation.{md,json,png} already in --out.
    #[arg(long)]
    overwrite: bool,
}

/// The files written into --out.
const OUTPUTS: [&str; 3] = ["ablation.md", "ablation.json", "ablation.png"];

/// Every argument and output path, before any run is read.
fn check_args(args: &Args) -> Result<()> {
    let mut c = shared::checks::ArgChecks::new();
    c.count("--window", args.window);
    c.require(args.threshold.is_finite(), || format!("--threshold must be finite, got {}", args.threshold));
    for dir in &args.runs {
        c.require(dir.is_dir(), || format!("run directory {} does not exist or is not a directory", dir.display()));
    }
    c.finish()?;
    for name in OUTPUTS {
        shared::outputs::check_output_file(&args.out.join(name), "--out", args.overwrite)?;
    }
    Ok(())
}

/// One run's curves.
struct Run {
    seed: u64,
    scores: BTreeMap<u64, f64>,
    critic: BTreeMap<u64, f64>,
}

fn read_run(dir: &Path, window: u64) -> Result<(String, Run)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", config_path.display()))?;
    let owner = config["lapo"]["encoder_owner"]
        .as_str()
        .with_context(|| format!("{}: no field lapo.encoder_owner", config_path.display()))?
        .to_string();
    let seed =
        config["lapo"]["seed"].as_u64().with_context(|| format!("{}: no field lapo.seed", config_path.display()))?;
    let mut scores = BTreeMap::new();
    let mut sums: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for record in read_jsonl(&dir.join("metrics.jsonl"))? {
        let Some(iteration) = record["iteration"].as_u64() else { continue };
        if let Some(score) = record["eval"]["normalized_score"].as_f64() {
            scores.insert(iteration, score);
        }
        if let Some(loss) = record["losses"]["critic"].as_f64() {
            let bucket = iteration.div_ceil(window) * window;
            let entry = sums.entry(bucket).or_insert((0.0, 0));
            entry.0 += loss;
            entry.1 += 1;
        }
    }
    anyhow::ensure!(!scores.is_empty(), "{}: no evaluation in metrics.jsonl", dir.display());
    let critic = sums.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect();
    Ok((owner, Run { seed, scores, critic }))
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Mean and std over runs at every key all runs share.
fn across(runs: &[&Run], pick: impl Fn(&Run) -> &BTreeMap<u64, f64>) -> Vec<(u64, f64, f64)> {
    let Some(first) = runs.first() else { return Vec::new() };
    pick(first)
        .keys()
        .filter_map(|k| {
            let values: Option<Vec<f64>> = runs.iter().map(|r| pick(r).get(k).copied()).collect();
            values.map(|v| {
                let (m, s) = mean_std(&v);
                (*k, m, s)
            })
        })
        .collect()
}

fn main() -> Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    check_args(&args)?;
    let mut by_owner: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for dir in &args.runs {
        let (owner, run) = read_run(dir, args.window)?;
        by_owner.entry(owner).or_default().push(run);
    }

    let mut table = String::from(
        "| encoder owner | seeds | score at each evaluation (mean ± std) | final score | \
         first iteration with mean score ≥ threshold | final critic loss |\n|---|---|---|---|---|---|\n",
    );
    let mut json = serde_json::Map::new();
    let (mut score_series, mut critic_series) = (Vec::new(), Vec::new());
    for (i, (owner, runs)) in by_owner.iter().enumerate() {
        let refs: Vec<&Run> = runs.iter().collect();
        let scores = across(&refs, |r| &r.scores);
        let critic = across(&refs, |r| &r.critic);
        let curve: Vec<String> = scores.iter().map(|(k, m, s)| format!("{k}: {m:.1} ± {s:.1}")).collect();
        let (final_it, final_mean, final_std) = scores.last().copied().unwrap_or((0, f64::NAN, f64::NAN));
        let reached = scores.iter().find(|(_, m, _)| *m >= args.threshold).map(|(k, _, _)| *k);
        let final_critic = critic.last().map(|(_, m, _)| *m).unwrap_or(f64::NAN);
        let seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
        table.push_str(&format!(
            "| {owner} | {seeds:?} | {} | {final_mean:.1} ± {final_std:.1} (it {final_it}) | {} | {final_critic:.3} |\n",
            curve.join("; "),
            reached.map_or("not reached".to_string(), |k| k.to_string()),
        ));
        json.insert(
            owner.clone(),
            serde_json::json!({"seeds": seeds, "score": scores, "critic_loss": critic,
                "iterations_to_threshold": reached, "threshold": args.threshold}),
        );
        let color = PALETTE[i % PALETTE.len()];
        score_series.push(Series {
            label: owner.clone(),
            points: scores.iter().map(|(k, m, _)| (*k as f64, *m)).collect(),
            color,
        });
        critic_series.push(Series {
            label: owner.clone(),
            // Log scale: critic losses span orders of magnitude across owners.
            points: critic.iter().map(|(k, m, _)| (*k as f64, m.max(1e-12).log10())).collect(),
            color,
        });
    }
    let colours: Vec<String> =
        by_owner.keys().enumerate().map(|(i, o)| format!("{o} = rgb{:?}", PALETTE[i % PALETTE.len()])).collect();
    table.push_str(&format!(
        "\nablation.png: left, normalised score against iterations; right, log10 critic loss \
         ({}-iteration means). Colours: {}.\n",
        args.window,
        colours.join(", ")
    ));
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    shared::io::write_atomic(&args.out.join(OUTPUTS[0]), table.as_bytes())?;
    shared::io::write_json_atomic(&args.out.join(OUTPUTS[1]), &serde_json::Value::Object(json))?;
    line_charts(&[score_series, critic_series], &args.out.join(OUTPUTS[2]))?;
    println!("{table}");
    println!("wrote {}/ablation.{{md,json,png}}", args.out.display());
    Ok(())
}
