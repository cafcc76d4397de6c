//! `cargo run -p rl --release --bin diagnose` — cheap sanity checks of the state-only LAPO
//! pipeline, each through the same evaluation path as training (normalise obs → policy →
//! un-normalise action → clamp → env):
//! 1. dataset statistics (state/action z-scoring, rewards, terminals);
//! 2. a nearest-neighbour replay of the dataset's own actions on the dataset's own env seeds:
//!    if the eval-time normalised states match the training ones, the distance is ~0 and the
//!    episodes' returns are reproduced;
//! 3. behaviour cloning: the VAE alone (uniform weights), decoded with z = 0.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rl::encoders::EncoderKind;
use rl::env::EnvConfig;
use rl::lapo::{Lapo, LapoConfig};
use rl::trainer::{evaluate, Actor, Normalization, Replay};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "datasets/mixed")]
    dataset: PathBuf,
    #[arg(long, default_value_t = 10)]
    episodes: usize,
    /// Behaviour-cloning iterations (0 skips the check).
    #[arg(long, default_value_t = 2000)]
    bc_iterations: u64,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Clone only the successful episodes (filtered BC).
    #[arg(long)]
    success_only: bool,
    /// A training run directory: evaluate its checkpoint's actor policy and its decoders at z = 0.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
}

/// Replays the action of the nearest (normalised) dataset state.
struct NearestNeighbour {
    states: Vec<Vec<f32>>,
    actions: Vec<Vec<f32>>,
    norm: Normalization,
    max_distance: std::cell::Cell<f32>,
}

impl Actor for NearestNeighbour {
    fn encoder(&self) -> EncoderKind {
        EncoderKind::None
    }
    fn normalization(&self) -> &Normalization {
        &self.norm
    }
    fn act_batch(&self, _images: Option<&Tensor>, state: &Tensor) -> candle_core::Result<Tensor> {
        let rows: Vec<Vec<f32>> = state.to_vec2()?;
        let mut out = Vec::new();
        for r in &rows {
            let (mut best, mut best_d) = (0, f32::INFINITY);
            for (i, s) in self.states.iter().enumerate() {
                let d: f32 = s.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum();
                if d < best_d {
                    best_d = d;
                    best = i;
                }
            }
            self.max_distance.set(self.max_distance.get().max(best_d.sqrt()));
            out.extend_from_slice(&self.actions[best]);
        }
        Tensor::from_vec(out, (rows.len(), self.actions[0].len()), &Device::Cpu)
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

/// Activation memory of one behaviour-cloning sample: the VAE's encoder and decoder (three layers
/// of 256 f32 units each), forward and backward, with room for the optimiser's temporaries.
const BC_BYTES_PER_SAMPLE: u128 = 32 << 10;

/// Every out-of-range argument, by flag, before any work.
fn check_args(args: &Args) -> Result<()> {
    let mut c = shared::checks::ArgChecks::new();
    c.count("--episodes", args.episodes as u64);
    if args.bc_iterations > 0 && args.checkpoint.is_none() {
        c.count("--batch-size", args.batch_size as u64);
        c.positive("--lr", args.lr);
    }
    c.finish()?;
    if let Some(dir) = &args.checkpoint {
        anyhow::ensure!(dir.is_dir(), "--checkpoint {}: not a training run directory", dir.display());
    }
    if args.bc_iterations > 0 && args.checkpoint.is_none() {
        shared::checks::ensure_fits(
            &Device::Cpu,
            (args.batch_size as u128).saturating_mul(BC_BYTES_PER_SAMPLE),
            &format!("--batch-size {}", args.batch_size),
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let args = Args::parse();
    check_args(&args)?;
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let replay = Replay::open(&args.dataset, EncoderKind::None, 0.99)
        .with_context(|| format!("--dataset {}", args.dataset.display()))?;
    let meta = replay.dataset.meta();
    let environment = meta
        .environment()
        .map_err(|e| anyhow::anyhow!("--dataset {}: {e}; diagnose scores in the environment", args.dataset.display()))?
        .clone();
    // A collected dataset's seed is there (the loader checks it).
    let seed = meta.seed.unwrap_or(0);
    // Evaluation seeds run from the dataset's seed (and from 0) for --episodes.
    anyhow::ensure!(
        seed.checked_add(args.episodes as u64).is_some(),
        "--dataset {}: its seed {} + --episodes {} is beyond the seed range (u64)",
        args.dataset.display(),
        seed,
        args.episodes
    );
    anyhow::ensure!(
        !(args.success_only && args.bc_iterations > 0 && args.checkpoint.is_none())
            || meta.episodes.iter().any(|e| e.success),
        "--success-only: the dataset {} has no successful episode to clone",
        args.dataset.display()
    );
    let n = &replay.norm;
    println!("state mean {:?}\nstate std  {:?}", fmt(&n.state_mean), fmt(&n.state_std));
    println!("action mean {:?}\naction std  {:?}", fmt(&n.action_mean), fmt(&n.action_std));
    let (mut terminals, mut dones, mut r_small) = (0, 0, Vec::new());
    for tr in replay.dataset.transitions() {
        terminals += tr.terminal as usize;
        dones += tr.done as usize;
        if !tr.terminal {
            r_small.push(tr.reward);
        }
    }
    let mean_r = r_small.iter().sum::<f32>() / r_small.len().max(1) as f32;
    println!(
        "reward scale {:.3}, bounds {:?}, terminals {terminals}, dones {dones}, mean non-terminal reward {mean_r:.4}",
        n.reward_scale, replay.bounds
    );

    if let Some(dir) = &args.checkpoint {
        let info = rl::trainer::read_checkpoint_info(dir)?;
        let mut lapo = Lapo::new(info.config.clone(), info.dims, info.bounds, DType::F32, &Device::Cpu)?;
        rl::trainer::load_checkpoint(&mut lapo, dir)?;
        let env = EnvConfig { render: false, ..environment.clone() };
        for (label, which) in [("actor→target decoder", 0), ("target decoder z=0", 1), ("online decoder z=0", 2)] {
            let policy = Decoder(&lapo, &info.normalization, which);
            let e = evaluate(&policy, &env, args.episodes, 0, |_| {})?;
            println!(
                "{label}: score {:.2} ± {:.2}, success {:.2}",
                e.normalized_score, e.normalized_score_std, e.success_rate
            );
        }
        return Ok(());
    }

    // 2. Nearest-neighbour replay on the dataset's own seeds.
    let mut states = Vec::new();
    let mut actions = Vec::new();
    for tr in replay.dataset.transitions() {
        states.push(n.state(&rl::trainer::model_state(EncoderKind::None, tr.state, tr.environment_state)));
        actions.push(tr.action.iter().zip(&n.action_mean).zip(&n.action_std).map(|((a, m), s)| (a - m) / s).collect());
    }
    let nn = NearestNeighbour { states, actions, norm: n.clone(), max_distance: std::cell::Cell::new(0.0) };
    let env = EnvConfig { render: false, ..environment.clone() };
    let k = args.episodes.min(meta.episodes.len());
    let eval = evaluate(&nn, &env, k, seed, |_| {})?;
    let data_scores: Vec<f32> = meta.episodes[..k].iter().map(|e| e.normalized_score.unwrap_or(f32::NAN)).collect();
    let data_mean = data_scores.iter().sum::<f32>() / k as f32;
    println!(
        "NN replay on dataset seeds {}..{}: score {:.2} (dataset episodes {data_mean:.2}), success {:.2}, max NN distance {:.2e}",
        seed,
        seed + k as u64,
        eval.normalized_score,
        eval.success_rate,
        nn.max_distance.get()
    );

    // 3. Behaviour cloning: the VAE alone with uniform weights.
    if args.bc_iterations > 0 {
        let config =
            LapoConfig { batch_size: args.batch_size, actor_vae_lr: args.lr, kl_beta: 0.5, ..LapoConfig::reference() };
        let dev = Device::Cpu;
        let mut lapo = Lapo::new(config.clone(), replay.dims.clone(), replay.bounds, DType::F32, &dev)?;
        let mut rng = shared::rng::SplitMix64::new(7);
        let ones = Tensor::ones((args.batch_size, 1), DType::F32, &dev)?;
        let pool: Vec<(usize, usize)> =
            replay.index().iter().copied().filter(|(e, _)| !args.success_only || meta.episodes[*e].success).collect();
        println!("BC on {} transitions", pool.len());
        for it in 0..args.bc_iterations {
            let picks: Vec<(usize, usize)> =
                (0..args.batch_size).map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize]).collect();
            let batch = replay.batch(&picks, DType::F32, &dev)?;
            let eps = rng.normal_tensor((args.batch_size, lapo.actor_vae.latent_dim()), DType::F32, &dev)?;
            let loss = lapo.actor_vae_loss(&batch.state, &batch.action, &ones, &eps)?;
            let grads = loss.total.backward()?;
            lapo.actor_vae_opt.step(&grads)?;
            if it % 500 == 0 {
                println!(
                    "bc {it}: recon {:.4} kl {:.4}",
                    loss.reconstruction.to_scalar::<f32>()?,
                    loss.kl.to_scalar::<f32>()?
                );
            }
        }
        // Unseen layouts (evaluation seeds from 0) and the dataset's own layouts (its seeds).
        for seed in [0, seed] {
            let eval = evaluate(&Decoder(&lapo, n, 2), &env, args.episodes, seed, |_| {})?;
            println!(
                "BC decoder(z=0) after {} iterations, env seeds {seed}..: score {:.2} ± {:.2}, success {:.2}",
                args.bc_iterations, eval.normalized_score, eval.normalized_score_std, eval.success_rate
            );
        }
    }
    Ok(())
}

fn fmt(v: &[f32]) -> Vec<String> {
    v.iter().map(|x| format!("{x:.3}")).collect()
}

/// 0: the LAPO policy (actor latent, target decoder); 1: target decoder at z = 0; 2: online
/// decoder at z = 0.
struct Decoder<'a>(&'a Lapo, &'a Normalization, u8);

impl Actor for Decoder<'_> {
    fn encoder(&self) -> EncoderKind {
        EncoderKind::None
    }
    fn normalization(&self) -> &Normalization {
        self.1
    }
    fn act_batch(&self, i: Option<&Tensor>, s: &Tensor) -> candle_core::Result<Tensor> {
        let z = Tensor::zeros((s.dim(0)?, self.0.actor_vae.latent_dim()), s.dtype(), s.device())?;
        match self.2 {
            0 => self.0.act(i, s),
            1 => self.0.target_actor_vae.decode(s, &z),
            _ => self.0.actor_vae.decode(s, &z),
        }
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}
