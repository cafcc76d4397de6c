//! `cargo run -p rl --release --bin eval -- --checkpoint PATH` — score an exported policy (or a
//! run directory's `policy.safetensors`) in the environment and write a GIF of one episode with
//! the three cameras side by side. `--behaviour medium` also scores the dataset's scripted
//! behaviour policy on the same seeds and prints the paired difference.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use rl::dataset::Tier;
use rl::env::{tile_views, EnvConfig, NUM_CAMERAS};
use rl::policy::ExportedPolicy;
use rl::trainer::{evaluate, evaluate_behaviour, paired_difference};

#[derive(Parser, Debug)]
#[command(about = "Evaluate an exported LAPO policy and record a GIF")]
struct Args {
    /// A policy .safetensors file, or a run directory holding policy.safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 20)]
    episodes: usize,
    /// First environment seed (evaluation seeds are seed..seed+episodes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GIF path (default: beside the policy, `episode.gif`).
    #[arg(long)]
    gif: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also score the scripted policy of this dataset tier (random, medium, expert, mixed) on the
    /// same seeds, and print the per-episode paired difference (policy − behaviour). The dataset's
    /// behaviour score averages other layouts (the training data's seeds), so this is the fairer
    /// comparison on few episodes. Use seeds the dataset did not use (it starts at 1000).
    #[arg(long)]
    behaviour: Option<Tier>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.behaviour.is_none() || args.episodes >= 2,
        "--behaviour needs --episodes of at least 2 (the paired difference has a standard error)"
    );
    let path =
        if args.checkpoint.is_dir() { args.checkpoint.join("policy.safetensors") } else { args.checkpoint.clone() };
    let device = shared::device::parse_device(&args.device)?;
    let policy = ExportedPolicy::load(&path, &device).with_context(|| format!("loading policy {}", path.display()))?;
    let (h, w) = if policy.header.encoder.uses_images() { policy.header.image_hw } else { (84, 84) };
    // Render as the training data was (size and anti-aliasing), or the policy sees other images.
    let env_config = EnvConfig {
        render: true,
        supersample: policy.header.supersample,
        ..EnvConfig::default().with_image_size(h, w)
    };
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

    let gif_path = args.gif.unwrap_or_else(|| path.with_file_name("episode.gif"));
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
