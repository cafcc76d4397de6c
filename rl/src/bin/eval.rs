//! `cargo run -p rl --release --bin eval -- --checkpoint PATH` — score an exported policy (a
//! file, a run directory's `policy.safetensors`, or a Hub reference `org/name[@rev]:file`) in the
//! environment and write a GIF of one episode with the three cameras side by side.
//! `--behaviour medium` also scores the dataset's scripted behaviour policy on the same seeds and
//! prints the paired difference.
//!
//! Before any work: the arguments, the GIF path (an existing file needs --overwrite; a directory
//! is refused), and the policy file (validated by [`ExportedPolicy::load`], then checked against
//! the environment's dims).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use rl::dataset::Tier;
use rl::env::{tile_views, EnvConfig, ACTION_DIM, ENVIRONMENT_STATE_DIM, NUM_CAMERAS, STATE_DIM};
use rl::policy::ExportedPolicy;
use rl::trainer::{evaluate, evaluate_behaviour, paired_difference, TASK_FRAME_DIM};
use shared::checks::ArgChecks;
use shared::weights::WeightRef;

#[derive(Parser, Debug)]
#[command(about = "Evaluate an exported LAPO policy and record a GIF")]
struct Args {
    /// A policy .safetensors file, a run directory holding policy.safetensors, or a Hugging Face
    /// Hub reference `org/name[@revision]:path/in/repo` (resolved from the local Hub cache).
    #[arg(long)]
    checkpoint: String,
    #[arg(long, default_value_t = 20)]
    episodes: usize,
    /// First environment seed (evaluation seeds are seed..seed+episodes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GIF path (default: `episode.gif` beside a local policy, in the current directory for a
    /// Hub reference). An existing file is refused unless --overwrite.
    #[arg(long)]
    gif: Option<PathBuf>,
    /// Replace an existing GIF.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also score the scripted policy of this dataset tier (random, medium, expert, mixed) on the
    /// same seeds, and print the per-episode paired difference (policy − behaviour). The dataset's
    /// behaviour score averages other layouts (the training data's seeds), so this is the fairer
    /// comparison on few episodes. Use seeds the dataset did not use (it starts at 1000).
    #[arg(long)]
    behaviour: Option<Tier>,
}

/// Image sides the environment renders.
const SIDES: std::ops::RangeInclusive<usize> = 16..=1024;

/// The policy can act in the environment: its dims and image size are the environment's.
fn check_fits_environment(policy: &ExportedPolicy, path: &Path) -> Result<()> {
    let h = &policy.header;
    let state_dim =
        if h.encoder.uses_images() { STATE_DIM } else { STATE_DIM + ENVIRONMENT_STATE_DIM + TASK_FRAME_DIM };
    let mut problems = Vec::new();
    if let Err(e) = h.check_environment() {
        problems.push(e.to_string());
    }
    if h.state_dim != state_dim {
        problems.push(format!("state_dim is {}, the environment gives this encoder {state_dim}", h.state_dim));
    }
    if h.action_dim != ACTION_DIM {
        problems.push(format!("action_dim is {}, the environment takes {ACTION_DIM}", h.action_dim));
    }
    if h.encoder.uses_images() && !(SIDES.contains(&h.image_hw.0) && SIDES.contains(&h.image_hw.1)) {
        problems.push(format!(
            "image_hw is {}×{}, the environment renders sides in {}..={}",
            h.image_hw.0,
            h.image_hw.1,
            SIDES.start(),
            SIDES.end()
        ));
    }
    anyhow::ensure!(
        problems.is_empty(),
        "policy file {} cannot act in this environment:\n  - {}",
        path.display(),
        problems.join("\n  - ")
    );
    Ok(())
}

/// Estimated bytes of an evaluation: every episode runs at once (one environment and renderer
/// each, its images as u8 and as f32 model input, and conv activations of about 256 bytes per
/// pixel), plus the GIF's frames of one episode.
fn evaluation_bytes(episodes: usize, hw: (usize, usize), supersample: usize, max_steps: usize) -> u128 {
    let pixels = (hw.0 as u128) * (hw.1 as u128);
    let ss2 = (supersample as u128).pow(2);
    let per_episode = pixels * (3 * 16 * ss2 + 9 + 9 * 4 * 3 + 256);
    (episodes as u128).saturating_mul(per_episode) + (max_steps as u128 + 1) * pixels * 9 * 2
}

fn main() -> Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    let mut checks = ArgChecks::new();
    checks.count("--episodes", args.episodes as u64);
    checks.require(args.behaviour.is_none() || args.episodes >= 2, || {
        format!(
            "--behaviour needs --episodes of at least 2 (the paired difference has a standard error), got {}",
            args.episodes
        )
    });
    checks.require(args.seed.checked_add(args.episodes as u64).is_some(), || {
        format!("--seed {} + --episodes {} is beyond the seed range (u64)", args.seed, args.episodes)
    });
    checks.finish()?;
    let device = shared::device::parse_device(&args.device)?;

    // The policy file (resolved, not yet read) and the GIF path, both before any work.
    let path =
        rl::policy::resolve_policy(&args.checkpoint).with_context(|| format!("--checkpoint {}", args.checkpoint))?;
    let is_hub = !Path::new(&args.checkpoint).exists()
        && matches!(WeightRef::parse(&args.checkpoint), Ok(WeightRef::Hub { .. }));
    let (gif_path, gif_is_default) = match &args.gif {
        Some(p) => (p.clone(), false),
        // Never beside a Hub file: that is the shared Hub cache.
        None if is_hub => (PathBuf::from("episode.gif"), true),
        None => (path.with_file_name("episode.gif"), true),
    };
    shared::outputs::check_output_file(&gif_path, "--gif", args.overwrite).map_err(|e| {
        if gif_is_default {
            anyhow::anyhow!("{e:#} (the default GIF path; pass --gif PATH or --overwrite)")
        } else {
            e
        }
    })?;

    let policy = ExportedPolicy::load(&path, &device).with_context(|| format!("--checkpoint {}", args.checkpoint))?;
    check_fits_environment(&policy, &path)?;
    let (h, w) = if policy.header.encoder.uses_images() { policy.header.image_hw } else { (84, 84) };
    // Render as the training data was (size and anti-aliasing), or the policy sees other images.
    let env_config = EnvConfig {
        render: true,
        supersample: policy.header.supersample,
        ..EnvConfig::default().with_image_size(h, w)
    };
    shared::checks::ensure_fits(
        &device,
        evaluation_bytes(args.episodes, (h, w), env_config.supersample, env_config.max_steps),
        &format!("--episodes {} (all run at once, {h}×{w} images)", args.episodes),
    )?;
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let result = evaluate(&policy, &env_config, args.episodes, args.seed, |obs| {
        frames.push(tile_views(&obs.images, obs.height, obs.width));
    })?;
    match args.behaviour {
        None => println!("{}", serde_json::to_string_pretty(&result)?),
        Some(tier) => {
            let behaviour = evaluate_behaviour(tier, &env_config, args.episodes, args.seed)?;
            let difference = paired_difference(&result, &behaviour)?;
            let report = serde_json::json!({
                "policy": result,
                "behaviour": { "tier": tier.name(), "evaluation": behaviour },
                "policy_minus_behaviour": difference,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }

    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        encoder.set_repeat(Repeat::Infinite)?;
        let tiled_w = (w * NUM_CAMERAS) as u32;
        for rgb in &frames {
            let n = rgb.len() / 3;
            anyhow::ensure!(n == (tiled_w as usize) * h, "tiled frame has {n} pixels, expected {}x{h}", tiled_w);
            let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
            let img = RgbaImage::from_raw(tiled_w, h as u32, rgba).context("frame buffer")?;
            encoder.encode_frame(Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(50, 1)))?;
        }
    }
    shared::io::write_atomic(&gif_path, &bytes)?;
    eprintln!("wrote {} ({} frames)", gif_path.display(), frames.len());
    Ok(())
}
