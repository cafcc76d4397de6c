//! Collects offline datasets of the bimanual environment, renders previews, and measures the
//! reference returns.
//!
//! ```text
//! cargo run -p rl --release --bin collect -- --tier medium --episodes 100 --out data/medium
//! cargo run -p rl --release --bin collect -- --preview docs/env-preview.png
//! cargo run -p rl --release --bin collect -- --evaluate-references --seeds 100
//! ```
//!
//! Every argument and output path is checked before any work. `--out` must be absent or empty:
//! a directory holding a dataset — complete, or the files an interrupted collection left — is
//! refused unless `--overwrite`, which removes it whole before the first shard is written (so no
//! stale shard of the old dataset remains); the directory is locked while the collection runs.

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rl::dataset::{check_dataset_dir, claim_dataset_dir, collect_dataset_into, write_atomically, CollectConfig, Tier};
use rl::env::policy::{rollout, Policy, PolicyKind};
use rl::env::{
    contact_sheet, normalized_score, Env, EnvConfig, REFERENCE_COMMAND, REFERENCE_EXPERT_RETURN,
    REFERENCE_RANDOM_RETURN,
};
use shared::checks::ArgChecks;
use shared::outputs::Existing;
use std::path::{Path, PathBuf};

/// Image sides the environment renders.
const SIDES: (usize, usize) = (16, 1024);
/// Supersampling factors the environment renders.
const MAX_SUPERSAMPLE: usize = 8;

#[derive(Parser, Debug)]
#[command(about = "Collect bimanual-pucks datasets, previews and reference returns")]
struct Args {
    /// Dataset tier: random, medium, expert or mixed.
    #[arg(long, default_value = "mixed")]
    tier: Tier,
    /// Number of episodes to collect.
    #[arg(long, default_value_t = 100)]
    episodes: usize,
    /// Output directory for shards and meta.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Episode i uses environment seed SEED + i (evaluation uses 0..100).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Square image size in pixels (both sides); see --height/--width for other shapes.
    #[arg(long, default_value_t = 84)]
    image_size: usize,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// Render at this many samples per pixel side and box-average (anti-aliasing; 2 with
    /// --image-size 16 matches the world model's frames).
    #[arg(long, default_value_t = 1)]
    supersample: usize,
    /// Episode length in control steps.
    #[arg(long, default_value_t = 200)]
    max_steps: usize,
    /// Worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Write a PNG contact sheet of one episode (the tier's policy; expert for mixed) from SEED.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Print expert, medium and random success rates and returns over seeds 0..SEEDS.
    #[arg(long)]
    evaluate_references: bool,
    /// Number of seeds for --evaluate-references.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// Replace what --out or --preview already holds (a dataset directory is removed whole).
    #[arg(long)]
    overwrite: bool,
}

/// Every out-of-range argument, by flag.
fn check_args(args: &Args, env: &EnvConfig, threads: usize) -> Result<()> {
    let mut c = ArgChecks::new();
    let mut sides = vec![("--image-size", args.image_size)];
    sides.extend(args.height.map(|h| ("--height", h)));
    sides.extend(args.width.map(|w| ("--width", w)));
    for (flag, side) in sides {
        c.require((SIDES.0..=SIDES.1).contains(&side), || {
            format!("{flag} must be in {}..={} pixels (what the environment renders), got {side}", SIDES.0, SIDES.1)
        });
    }
    c.count_at_most("--supersample", env.supersample as u64, MAX_SUPERSAMPLE as u64, "the renderer's limit");
    c.count("--max-steps", args.max_steps as u64);
    c.count("--threads", threads as u64);
    if args.out.is_some() {
        c.count("--episodes", args.episodes as u64);
    }
    if args.evaluate_references {
        c.count("--seeds", args.seeds);
    }
    c.finish()
}

fn main() -> Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    let env_config = EnvConfig {
        image_height: args.height.unwrap_or(args.image_size),
        image_width: args.width.unwrap_or(args.image_size),
        max_steps: args.max_steps,
        render: true,
        supersample: args.supersample,
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !args.evaluate_references && args.preview.is_none() && args.out.is_none() {
        bail!("nothing to do: give --out DIR, --preview FILE.png or --evaluate-references");
    }
    // Before any work: arguments, memory, output paths.
    check_args(&args, &env_config, threads)?;
    let mode = if args.overwrite { Existing::Overwrite } else { Existing::Refuse };
    let config =
        CollectConfig { tier: args.tier, episodes: args.episodes, seed: args.seed, env: env_config.clone(), threads };
    if let Some(out) = &args.out {
        shared::checks::ensure_fits(
            &candle_core::Device::Cpu,
            config.working_set_bytes(),
            &format!(
                "collecting --episodes {} with --image-size {}×{} --supersample {} --max-steps {} --threads {}",
                args.episodes,
                env_config.image_height,
                env_config.image_width,
                env_config.supersample,
                env_config.max_steps,
                config.effective_threads()
            ),
        )?;
        check_dataset_dir(out, "--out", mode)?;
    }
    if let Some(path) = &args.preview {
        shared::outputs::check_output_file(path, "--preview", args.overwrite)?;
        if let Some(out) = &args.out {
            anyhow::ensure!(
                !path.starts_with(out),
                "--preview {} is inside --out {}: the dataset directory holds only the dataset",
                path.display(),
                out.display()
            );
        }
    }
    if args.evaluate_references {
        evaluate_references(&env_config, args.seeds, threads)?;
    }
    if let Some(path) = &args.preview {
        let policy = match args.tier {
            Tier::Mixed => PolicyKind::Expert,
            tier => tier.policy_for_episode(0),
        };
        write_preview(&env_config, policy, args.seed, path)?;
    }
    if let Some(out) = &args.out {
        let claimed = claim_dataset_dir(out, "--out", mode)?;
        let bar = ProgressBar::new(args.episodes as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} episodes ({per_sec}, eta {eta})")
                .context("progress bar template")?
                .progress_chars("=> "),
        );
        bar.set_message(format!("collecting {}", args.tier.name()));
        let started = std::time::Instant::now();
        let summary = collect_dataset_into(&config, &claimed, &|| bar.inc(1))
            .with_context(|| format!("collecting into {}", out.display()))?;
        bar.finish();
        let meta = &summary.meta;
        println!(
            "wrote {} episodes, {} frames to {} in {:.1}s: mean return {:.2}, normalised score {:.1}, success {:.0}%",
            meta.num_episodes,
            meta.num_frames,
            out.display(),
            started.elapsed().as_secs_f32(),
            meta.mean_return,
            meta.mean_normalized_score.unwrap_or(f32::NAN),
            100.0 * meta.success_rate
        );
    }
    Ok(())
}

struct PolicyReport {
    success_rate: f32,
    mean_return: f32,
    mean_length: f32,
}

fn evaluate(kind: PolicyKind, env_config: &EnvConfig, seeds: u64, threads: usize) -> Result<PolicyReport> {
    let config = EnvConfig { render: false, ..env_config.clone() };
    let outcomes = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..threads {
            handles.push(scope.spawn(|| -> Result<()> {
                let mut env = Env::new(config.clone())?;
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= seeds {
                        return Ok(());
                    }
                    let mut policy = kind.build(seed);
                    let outcome = rollout(&mut env, policy.as_mut(), seed);
                    outcomes.lock().map_err(|_| anyhow::anyhow!("worker panicked"))?.push((seed, outcome));
                }
            }));
        }
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("evaluation worker panicked"))??;
        }
        Ok(())
    })?;
    let mut outcomes = outcomes.into_inner().map_err(|_| anyhow::anyhow!("worker panicked"))?;
    outcomes.sort_by_key(|(seed, _)| *seed);
    let n = outcomes.len().max(1) as f32;
    Ok(PolicyReport {
        success_rate: outcomes.iter().filter(|(_, o)| o.success).count() as f32 / n,
        mean_return: outcomes.iter().map(|(_, o)| o.episode_return).sum::<f32>() / n,
        mean_length: outcomes.iter().map(|(_, o)| o.length as f32).sum::<f32>() / n,
    })
}

fn evaluate_references(env_config: &EnvConfig, seeds: u64, threads: usize) -> Result<()> {
    println!("reference evaluation over seeds 0..{seeds} ({REFERENCE_COMMAND})");
    let mut reports = Vec::new();
    for kind in [PolicyKind::Expert, PolicyKind::Medium, PolicyKind::Random] {
        let report = evaluate(kind, env_config, seeds, threads)?;
        println!(
            "{:>7}: success {:5.1}%  mean return {:8.3}  mean length {:6.1}  normalised score {:6.1}",
            kind.name(),
            100.0 * report.success_rate,
            report.mean_return,
            report.mean_length,
            normalized_score(report.mean_return)
        );
        reports.push(report);
    }
    println!(
        "stored constants: REFERENCE_EXPERT_RETURN = {REFERENCE_EXPERT_RETURN}, REFERENCE_RANDOM_RETURN = {REFERENCE_RANDOM_RETURN}"
    );
    println!(
        "measured:         REFERENCE_EXPERT_RETURN = {}, REFERENCE_RANDOM_RETURN = {}",
        reports[0].mean_return, reports[2].mean_return
    );
    Ok(())
}

/// Rolls out one episode and writes a contact sheet of 8 evenly spaced frames.
fn write_preview(env_config: &EnvConfig, kind: PolicyKind, seed: u64, path: &Path) -> Result<()> {
    let mut env = Env::new(env_config.clone())?;
    let mut policy: Box<dyn Policy + Send> = kind.build(seed);
    let mut frames = vec![env.reset(seed).images];
    let mut success = false;
    loop {
        let action = policy.act(&env);
        let step = env.step(&action);
        frames.push(step.obs.images);
        if step.done {
            success = step.success || success;
            break;
        }
    }
    let columns = 8.min(frames.len());
    let picked: Vec<_> = (0..columns).map(|i| frames[i * (frames.len() - 1) / (columns - 1).max(1)].clone()).collect();
    let scale = (168 / env_config.image_height.max(1)).max(1);
    let (width, height, pixels) = contact_sheet(&picked, env_config.image_height, env_config.image_width, scale);
    let image = image::RgbImage::from_raw(width as u32, height as u32, pixels)
        .context("contact sheet buffer has the wrong size")?;
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).context("encoding the preview PNG")?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    write_atomically(path, &png)?;
    println!(
        "wrote {} ({} policy, seed {seed}, {} steps, success: {success}; rows: left wrist, global, right wrist)",
        path.display(),
        kind.name(),
        frames.len() - 1
    );
    Ok(())
}
