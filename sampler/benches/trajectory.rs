//! Peak memory and seconds per optimisation iteration (value + gradient of z0) at 5/10/20/40
//! steps, per-step recomputation vs full graph, with a transformer-like test denoiser
//! (attention + MLP blocks over ~1k tokens, built from `shared::ops`, frozen weights as plain
//! tensors, EDM preconditioning) and the RES solver (which carries state between steps).
//!
//! `cargo bench -p sampler --bench trajectory`
//!
//! Memory is counted by a global allocator that tracks current and peak heap bytes; the peak
//! is reset to the current level before each configuration and reported as the excess over it.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use sampler::denoiser::{Conditioning, Network, Preconditioned};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::TargetMse;
use sampler::param::Parameterization;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::ops;
use shared::rng::SplitMix64;

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;

/// A small DiT-like network: tokens = T·H·W latent pixels, linear in, `blocks` × (pre-LN
/// self-attention + pre-LN GELU MLP), noise level added as a learned direction, linear out.
struct TinyDit {
    w_in: Tensor,
    w_noise: Tensor,
    blocks: Vec<[Tensor; 4]>, // w_qkv, w_o, w_1, w_2
    w_out: Tensor,
    heads: usize,
}

impl TinyDit {
    fn new(channels: usize, hidden: usize, heads: usize, blocks: usize, seed: u64) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let dev = Device::Cpu;
        let mut w =
            |i: usize, o: usize| -> Result<Tensor> { rng.normal_tensor((i, o), DType::F32, &dev)? / (i as f64).sqrt() };
        Ok(Self {
            w_in: w(channels, hidden)?,
            w_noise: w(1, hidden)?,
            blocks: (0..blocks)
                .map(|_| {
                    Ok([
                        w(hidden, 3 * hidden)?,
                        w(hidden, hidden)?,
                        w(hidden, 4 * hidden)?,
                        (w(4 * hidden, hidden)? * 0.5)?,
                    ])
                })
                .collect::<Result<_>>()?,
            w_out: (w(hidden, channels)? * 0.1)?,
            heads,
        })
    }
}

impl Network for TinyDit {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, _cond: &Conditioning) -> Result<Tensor> {
        let (b, c, t, h, w) = x_in.dims5()?;
        let n = t * h * w;
        let hidden = self.w_in.dim(1)?;
        let hd = hidden / self.heads;
        let tokens = x_in.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?; // (B, N, C)
        let noise_tok = c_noise.reshape((b, t, 1))?.broadcast_as((b, t, h * w))?.reshape((b, n, 1))?;
        let mut z = (tokens.broadcast_matmul(&self.w_in)? + noise_tok.broadcast_matmul(&self.w_noise)?)?;
        for [w_qkv, w_o, w_1, w_2] in &self.blocks {
            let qkv = ops::layer_norm(&z, None, None, 1e-6)?.broadcast_matmul(w_qkv)?;
            let split = |i: usize| -> Result<Tensor> {
                qkv.narrow(D::Minus1, i * hidden, hidden)?
                    .reshape((b, n, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let att = ops::sdpa(&split(0)?, &split(1)?, &split(2)?, None, None)?;
            let att = att.transpose(1, 2)?.reshape((b, n, hidden))?;
            z = (z + att.broadcast_matmul(w_o)?)?;
            let mlp = ops::gelu_tanh(&ops::layer_norm(&z, None, None, 1e-6)?.broadcast_matmul(w_1)?)?
                .broadcast_matmul(w_2)?;
            z = (z + mlp)?;
        }
        let out = ops::layer_norm(&z, None, None, 1e-6)?.broadcast_matmul(&self.w_out)?; // (B, N, C)
        out.transpose(1, 2)?.contiguous()?.reshape((b, c, t, h, w))
    }

    fn describe(&self) -> String {
        format!(
            "tiny DiT: {} blocks, hidden {}, {} heads",
            self.blocks.len(),
            self.w_in.dim(1).unwrap_or(0),
            self.heads
        )
    }
}

struct Row {
    steps: usize,
    mode: GradMode,
    seconds: f64,
    peak: usize,
    stored: usize,
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let shape = [1usize, 4, 4, 16, 16]; // 1024 tokens
    let param = Parameterization::Edm { sigma_data: 0.5 };
    let den = Preconditioned { net: TinyDit::new(shape[1], 32, 2, 2, 1)?, param };
    let target = SplitMix64::new(99).normal_tensor(&shape[..], DType::F32, &dev)?;
    let obj = TargetMse { target, label: "random target".into() };
    let cond = Conditioning::default();
    let solver = SolverKind::Res.build();
    let iterations = 2;
    println!(
        "denoiser: {} (EDM), latent {:?} = {} tokens, f32, RES solver, {iterations} iterations per configuration",
        den.net.describe(),
        shape,
        shape[2] * shape[3] * shape[4]
    );
    let mut rows = Vec::new();
    for steps in [5usize, 10, 20, 40] {
        for mode in [GradMode::Recompute, GradMode::FullGraph] {
            let schedule = Schedule::karras(steps, 0.002, 80.0, 7.0)?;
            let plan = Churn::default().plan(&schedule.sigmas, false);
            let noise = NoiseState::draw(0, &shape, &plan, NoiseMode::Ode, true, DType::F32, &dev)?;
            let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
            let (z0, xi) = noise.tensors();
            let base = shared::memory::reset_peak();
            let started = Instant::now();
            let mut stored = 0;
            for _ in 0..iterations {
                let vg = traj.value_and_grad(&z0, &xi, &obj, mode)?;
                stored = vg.checkpoint_bytes;
                std::hint::black_box(vg.grad_z0);
            }
            let seconds = started.elapsed().as_secs_f64() / iterations as f64;
            let peak = shared::memory::peak_bytes().saturating_sub(base);
            println!(
                "  steps {steps:>2} {mode:?}: {seconds:.3} s/iter, peak +{:.1} MB (stored x_i/state {:.2} MB)",
                peak as f64 / MB,
                stored as f64 / MB
            );
            rows.push(Row { steps, mode, seconds, peak, stored });
        }
    }
    println!();
    println!("| steps | mode | s / iteration | peak heap (MB) | stored x_i + state (MB) | peak − stored (MB) | time vs full graph |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let full = rows
            .iter()
            .find(|f| f.steps == r.steps && f.mode == GradMode::FullGraph)
            .map(|f| f.seconds)
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {:?} | {:.3} | {:.1} | {:.2} | {:.1} | {:.2}× |",
            r.steps,
            r.mode,
            r.seconds,
            r.peak as f64 / MB,
            r.stored as f64 / MB,
            (r.peak - r.stored) as f64 / MB,
            r.seconds / full
        );
    }
    let rec = |s: usize| rows.iter().find(|r| r.steps == s && r.mode == GradMode::Recompute).expect("row");
    let growth = (rec(40).peak - rec(40).stored) as f64 / (rec(5).peak - rec(5).stored) as f64 - 1.0;
    let worst_ratio = [5, 10, 20, 40]
        .iter()
        .map(|&s| {
            rec(s).seconds / rows.iter().find(|r| r.steps == s && r.mode == GradMode::FullGraph).expect("row").seconds
        })
        .fold(0.0, f64::max);
    println!();
    println!(
        "recomputation: memory beyond the stored x_i/state grows {:+.1}% from 5 to 40 steps (target ≤ +10%): {}",
        growth * 100.0,
        if growth <= 0.10 { "met" } else { "NOT met" }
    );
    println!(
        "recomputation: worst time ratio to the full-graph backward {worst_ratio:.2}× (target ≤ 1.5×): {}",
        if worst_ratio <= 1.5 { "met" } else { "NOT met" }
    );
    Ok(())
}
