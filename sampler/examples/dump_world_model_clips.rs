//! Writes the world model's training and held-out clips to one safetensors file, for experiments
//! outside this crate (`scripts/world_model_capacity.py` trains PyTorch regressors on them):
//!   cargo run -p sampler --release --example dump_world_model_clips -- OUT.safetensors [EPISODES]
//! `train_*`: EPISODES (default 120) training episodes from seed 1000, every window, as
//! `train-world-model` collects them; `eval_*`: the 24 held-out clips `train-world-model` scores
//! (6 episodes from seed 9000); `evalall_*`: every window of 30 held-out episodes.
//! Frames (N, 3, T, 16, 48) in [−1, 1]; actions (N, T, 8).

use std::collections::HashMap;

use anyhow::Context;
use candle_core::Device;
use sampler::world_model::{collect_clips, DataSpec, WorldModelConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args.next().context("usage: dump_world_model_clips OUT.safetensors [EPISODES]")?;
    let episodes: usize = match args.next() {
        Some(s) => s.parse().with_context(|| format!("EPISODES: '{s}' is not a count"))?,
        None => 120,
    };
    anyhow::ensure!(episodes > 0, "EPISODES must be at least 1");
    anyhow::ensure!(!std::path::Path::new(&out).exists(), "{out} exists; give a new path");
    let cfg = WorldModelConfig::medium();
    let spec =
        |episodes, first_seed, clip_spacing| DataSpec { episodes, first_seed, frames_per_episode: 40, clip_spacing };
    let train = collect_clips(&cfg, &spec(episodes, 1000, 1), &Device::Cpu)?;
    let eval = collect_clips(&cfg, &spec(6, 9000, cfg.frames), &Device::Cpu)?.spread(24)?;
    let eval_all = collect_clips(&cfg, &spec(30, 9000, 1), &Device::Cpu)?;
    let mut tensors = HashMap::new();
    for (name, clips) in [("train", train), ("eval", eval), ("evalall", eval_all)] {
        println!("{name}: {} clips", clips.len());
        tensors.insert(format!("{name}_frames"), clips.frames);
        tensors.insert(format!("{name}_actions"), clips.actions);
    }
    shared::weights::save_tensors_atomic(&tensors, std::path::Path::new(&out))?;
    println!("wrote {out}");
    Ok(())
}
