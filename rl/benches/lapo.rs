//! ms per multimodal LAPO iteration: batch 64, 9×84×84 (three cameras), ResNet18 encoder owned
//! by the critic, train-mode batch norm — the configuration of the source system — then the same
//! iteration in PyTorch eager (`rl/benches/lapo_torch.py`, run from here with the same thread
//! count: `python3`, or `$WORLDGRAD_PYTHON`; skipped with a note when torch is missing) and the
//! ratio. Each Rust phase also prints the process's user and system CPU time: the system share is
//! the allocator's (large buffers mapped and unmapped per op).
//!
//! The Rust iterations run three ways: with the allocator's defaults, then after
//! `shared::memory::keep_freed_memory` (what the binaries do), with the in-place optimisers and
//! with their tensor-op path.
//!
//! `cargo bench -p rl --bench lapo [-- ITERS [BATCH]]`
//!
//! `WORLDGRAD_BENCH_DEVICE` (default `cpu`; `cuda` in a `--features cuda` build, as
//! `scripts/gpu-check.sh` runs it) picks the device; every timing then waits for the device to
//! finish. The PyTorch twin runs on the CPU, so it is skipped on any other device (its ratio
//! would compare two devices).

use std::time::Instant;

use candle_core::{DType, Tensor};
use rl::encoders::EncoderKind;
use rl::lapo::{Batch, Dims, EncoderOwner, Lapo, LapoConfig, ValueBounds};
use shared::rng::SplitMix64;

/// User and system CPU seconds of this process so far (`/proc/self/stat`; zeros elsewhere).
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Field 3 (the state letter) is the first after it, so field n is token n − 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (ticks(11), ticks(12))
}

/// Median ms of `iters` LAPO iterations, with the CPU user and system seconds they took.
fn iterations(lapo: &mut Lapo, batch: &Batch, iters: usize) -> anyhow::Result<(f64, f64, f64)> {
    let (u0, s0) = cpu_seconds();
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        lapo.train_step(batch, false)?;
        lapo.device().synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (u1, s1) = cpu_seconds();
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], u1 - u0, s1 - s0))
}

/// The PyTorch twin's median ms, or why there is none.
fn torch_median(iters: usize, batch_size: usize, threads: usize) -> Result<f64, String> {
    let python = std::env::var("WORLDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/lapo_torch.py");
    let out = std::process::Command::new(&python)
        .args([script, &iters.to_string(), &batch_size.to_string(), &threads.to_string()])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{python} {script} failed: {}", err.lines().last().unwrap_or("")));
    }
    print!("{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("lapo_iteration_ms median "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no median in the twin's output: {text}"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let iters: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(3);
    let batch_size: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let (h, w, state_dim, action_dim) = (84, 84, 16, 8);
    let device_name = std::env::var("WORLDGRAD_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = shared::device::parse_device(&device_name)
        .map_err(|e| anyhow::anyhow!("WORLDGRAD_BENCH_DEVICE={device_name}: {e}"))?;
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
    let threads = candle_core::utils::get_num_threads();
    let on = if dev.is_cpu() { format!("{threads}-thread CPU") } else { shared::device::describe(&dev) };
    println!("candle {on}, batch {batch_size}, 9x{h}x{w}, ResNet18");
    lapo.train_step(&batch, false)?; // warm-up
    let (default_alloc, default_user, default_system) = iterations(&mut lapo, &batch, iters)?;
    shared::memory::keep_freed_memory();
    lapo.train_step(&batch, false)?; // the heap grows to its working set
    let (median, user, system) = iterations(&mut lapo, &batch, iters)?;
    // The same iterations with the optimisers' tensor-op path (≈10 temporaries per parameter).
    for opt in [&mut lapo.critic_opt, &mut lapo.actor_vae_opt, &mut lapo.actor_opt] {
        opt.fused = false;
    }
    let (unfused, unfused_user, unfused_system) = iterations(&mut lapo, &batch, iters)?;
    for opt in [&mut lapo.critic_opt, &mut lapo.actor_vae_opt, &mut lapo.actor_opt] {
        opt.fused = true;
    }
    // Where the time goes: the encoder passes dominate; measure them alone.
    let time = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // The optimisers alone: Adam over every trained parameter with fixed gradients, 5 steps
    // each way (their share of an iteration is too small to see under machine noise).
    let adam_ms = |fused: bool| -> anyhow::Result<f64> {
        let mut total = 0.0;
        for opt in [&lapo.critic_opt, &lapo.actor_vae_opt, &lapo.actor_opt] {
            let vars: Vec<_> = opt.vars().to_vec();
            let grads: Vec<Tensor> =
                vars.iter().map(|(_, v)| v.as_tensor().ones_like()).collect::<candle_core::Result<_>>()?;
            let mut copy = shared::params::GroupOptimizer::new("bench", vars.clone(), opt.config.clone())?;
            copy.fused = fused;
            let t = Instant::now();
            for _ in 0..5 {
                copy.step_with(|v| {
                    vars.iter().position(|(_, w)| w.as_tensor().id() == v.as_tensor().id()).map(|i| grads[i].clone())
                })?;
            }
            dev.synchronize()?;
            total += t.elapsed().as_secs_f64() * 1e3 / 5.0;
        }
        Ok(total)
    };
    // Copies: the in-place steps write into the vars' own buffers.
    let snapshot: std::collections::HashMap<String, Tensor> = shared::weights::varmap_tensors(&lapo.varmap)
        .into_iter()
        .map(|(name, t)| Ok((name, t.copy()?)))
        .collect::<candle_core::Result<_>>()?;
    let (adam_fused, adam_tensor_ops) = (adam_ms(true)?, adam_ms(false)?);
    // Back to the weights before the timing steps (they only move the parameters).
    for (name, var) in lapo.varmap.data().lock().expect("VarMap lock").iter() {
        var.set(&snapshot[name])?;
    }
    let fwd = time(&|| {
        lapo.encoder.forward_t(batch.images.as_ref(), &batch.state, true)?;
        Ok(())
    })?;
    let fwd_bwd = time(&|| {
        let s = lapo.encoder.forward_t(batch.images.as_ref(), &batch.state, true)?;
        s.sqr()?.mean_all()?.backward()?;
        Ok(())
    })?;
    let per = |x: f64| x / iters as f64;
    println!(
        "with the allocator's defaults           {default_alloc:.1} ms (user {:.2} s, system {:.2} s)",
        per(default_user),
        per(default_system)
    );
    println!("after keep_freed_memory (as the binaries run):");
    println!(
        "lapo_iteration_ms median {median:.1} ({iters} runs; CPU per iteration: user {:.2} s, system {:.2} s)",
        per(user),
        per(system)
    );
    println!(
        "  with the optimisers' tensor-op path   {unfused:.1} ms (user {:.2} s, system {:.2} s)",
        per(unfused_user),
        per(unfused_system)
    );
    println!("  Adam over every parameter, one step: in place {adam_fused:.1} ms, tensor ops {adam_tensor_ops:.1} ms");
    println!("  encoder forward (train-mode BN)      {fwd:.1} ms");
    println!("  encoder forward + backward           {fwd_bwd:.1} ms  (backward {:.1} ms)", fwd_bwd - fwd);
    // The parts are timed apart from the iteration, so on a noisy machine their sum can exceed
    // the iteration's median: then the rest is within that noise.
    let rest = median - fwd_bwd - fwd;
    if rest > 0.0 {
        println!("  rest (target encoder fwd, MLPs, Adam over 11M params, 4 Polyak updates) ≈ {rest:.1} ms");
    } else {
        println!(
            "  rest (target encoder fwd, MLPs, Adam, Polyak): within the timing noise (median − parts = {rest:.1} ms)"
        );
    }
    if !dev.is_cpu() {
        println!("PyTorch twin skipped: it runs on the CPU, this run on {}", shared::device::describe(&dev));
        return Ok(());
    }
    match torch_median(iters, batch_size, threads) {
        Ok(torch) => println!("ratio Rust / PyTorch eager: {:.2}x ({median:.1} ms / {torch:.1} ms)", median / torch),
        Err(why) => println!("PyTorch twin skipped: {why}"),
    }
    Ok(())
}
