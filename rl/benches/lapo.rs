//! ms per multimodal LAPO iteration: batch 64, 9×84×84 (three cameras), ResNet18 encoder owned
//! by the critic, train-mode batch norm — the configuration of the source system. Compare with
//! `rl/benches/lapo_torch.py` (the same iteration in PyTorch eager) on the same machine.
//!
//! `cargo bench -p rl --bench lapo [-- ITERS [BATCH]]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rl::encoders::EncoderKind;
use rl::lapo::{Batch, Dims, EncoderOwner, Lapo, LapoConfig, ValueBounds};
use shared::rng::SplitMix64;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let iters: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(3);
    let batch_size: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let (h, w, state_dim, action_dim) = (84, 84, 16, 8);
    let dev = Device::Cpu;
    let config = LapoConfig {
        encoder: EncoderKind::ResNet18,
        encoder_owner: EncoderOwner::Critic,
        batch_size,
        ..LapoConfig::reference()
    };
    let dims =
        Dims { state_dim, action_dim, image_hw: (h, w), privileged_dim: 0, supersample: 1, ..Default::default() };
    let mut lapo = Lapo::new(config, dims, ValueBounds { min_v: 0.0, max_v: 100.0 }, DType::F32, &dev)?;
    let mut rng = SplitMix64::new(0);
    let batch = Batch {
        images: Some(rng.uniform_tensor((batch_size, 9, h, w), 0.0, 1.0, DType::F32, &dev)?),
        next_images: Some(rng.uniform_tensor((batch_size, 9, h, w), 0.0, 1.0, DType::F32, &dev)?),
        state: rng.normal_tensor((batch_size, state_dim), DType::F32, &dev)?,
        next_state: rng.normal_tensor((batch_size, state_dim), DType::F32, &dev)?,
        action: rng.normal_tensor((batch_size, action_dim), DType::F32, &dev)?,
        reward: rng.uniform_tensor((batch_size, 1), 0.0, 1.0, DType::F32, &dev)?,
        done: Tensor::zeros((batch_size, 1), DType::F32, &dev)?,
        privileged: None,
    };
    println!("candle {}-thread CPU, batch {batch_size}, 9x{h}x{w}, ResNet18", candle_core::utils::get_num_threads());
    lapo.train_step(&batch, false)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        lapo.train_step(&batch, false)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Where the time goes: the encoder passes dominate; measure them alone.
    let time = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let fwd = time(&|| {
        lapo.encoder.forward_t(batch.images.as_ref(), &batch.state, true)?;
        Ok(())
    })?;
    let fwd_bwd = time(&|| {
        let s = lapo.encoder.forward_t(batch.images.as_ref(), &batch.state, true)?;
        s.sqr()?.mean_all()?.backward()?;
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    println!("lapo_iteration_ms median {:.1} (min {:.1}, {} runs)", times[times.len() / 2], times[0], times.len());
    println!("  encoder forward (train-mode BN)      {fwd:.1} ms");
    println!("  encoder forward + backward           {fwd_bwd:.1} ms  (backward {:.1} ms)", fwd_bwd - fwd);
    println!(
        "  rest (target encoder fwd, MLPs, Adam over 11M params, 4 Polyak updates) ≈ {:.1} ms",
        times[times.len() / 2] - fwd_bwd - fwd
    );
    Ok(())
}
