//! `cargo run -p rl --release --bin eval -- --checkpoint PATH` — score an exported policy (or a
//! run directory's `policy.safetensors`) in the environment and write a GIF of one episode with
//! the three cameras side by side.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use rl::env::{tile_views, EnvConfig, NUM_CAMERAS};
use rl::policy::ExportedPolicy;
use rl::trainer::evaluate;

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
}

fn main() -> Result<()> {
    let args = Args::parse();
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
    println!("{}", serde_json::to_string_pretty(&result)?);

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
