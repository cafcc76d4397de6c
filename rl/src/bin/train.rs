//! `cargo run -p rl --release --bin train` — LAPO on a bimanual-pucks dataset.
//!
//! With no arguments: state-only LAPO on the embedded `medium` dataset (3000 noisy-expert
//! episodes collected into `datasets/medium` on first use, 16 px anti-aliased views so the
//! same data trains image policies), with defaults chosen to finish in about 15 minutes on a
//! 2-core CPU and beat the data's behaviour score (~96 against 52.45; the reasons are on each
//! option: `rl::train::TrainConfig`, `rl::lapo::LapoConfig`).
//! Writes `runs/<name>/`: config.json, metrics.jsonl, checkpoint.{safetensors,json},
//! learning_curve.png, final_eval.json, policy.safetensors.
//!
//! The binary only parses the options; the run, and every check before it (arguments, outputs,
//! `--resume`, the dataset, memory), is `rl::train::run`.

use anyhow::Result;
use clap::Parser;
use rl::train::TrainConfig;

#[derive(Parser, Debug)]
#[command(about = "Train LAPO (optionally multimodal) on a bimanual-pucks dataset")]
// Negative values reach the range checks (and their message) instead of being taken for flags.
#[command(allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    config: TrainConfig,
}

fn main() -> Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    let summary = rl::train::run(&args.config)?;
    // Through a JSON value: its keys are sorted, as in final_eval.json.
    println!("{}", serde_json::to_value(&summary)?);
    Ok(())
}
