//! Peak memory and seconds of one z0 optimisation iteration — value + ∇z0 through a few Euler
//! flow steps of the Cosmos-Predict2 loop (`Predict2Denoiser`, one conditioning frame, CFG:
//! two DiT calls per step, per-step recomputation) over a narrow random-weight DiT with the 2B
//! model's layout — against DiT layers (2, 4, 8) and latent frames (2, 4, 8), with the
//! low-memory DiT (blocks and their branches checkpointed, tiled attention) and the plain graph;
//! the same iteration in PyTorch (`benches/cosmos_memory_torch.py`: diffusers'
//! `CosmosTransformer3DModel` with gradient checkpointing, each step under
//! `torch.utils.checkpoint`), and `cosmos::memory_plan`'s prediction beside the measured heap.
//!
//! `cargo bench -p sampler --bench cosmos_memory`
//!
//! Every configuration runs in a fresh process (this binary re-executed with
//! `COSMOS_MEMORY_BENCH_CASE=mode:layers:frames`, the Python script likewise) for two
//! iterations, and both sides report the same metrics: the first iteration's peak RSS above the
//! process's baseline taken after the model and inputs are built (Linux: `VmHWM` after resetting
//! it through `/proc/self/clear_refs`; one-time allocations included, as a user sees them), and
//! the second (warm) iteration's seconds. The Rust
//! side also reports its exact heap peak above the baseline (a counting global allocator): the
//! flatness criterion and the plan's validation are judged on it.
//!
//! Environment: `RAYON_NUM_THREADS` (default: all cores) sets both sides' threads;
//! `WORLDGRAD_PYTHON` the interpreter with torch + diffusers (default `python3`; the PyTorch
//! columns are skipped with a note when the import fails).

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use sampler::cosmos::memory_plan::{MemoryPlan, PlanRequest};
use sampler::cosmos::pipeline::{Predict2Denoiser, PREDICT2_SIGMA_MAX, PREDICT2_SIGMA_MIN};
use sampler::cosmos::transformer::{Config, CosmosTransformer3DModel, MemoryMode};
use sampler::cosmos::vae::Config as VaeConfig;
use sampler::denoiser::{ClassifierFreeGuidance, Conditioning};
use sampler::noise::Churn;
use sampler::objective::TargetMse;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::rng::SplitMix64;

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;
const CASE_ENV: &str = "COSMOS_MEMORY_BENCH_CASE";
/// Denoising steps (Karras flow-match levels; the last step has length zero, as in diffusers).
const STEPS: usize = 3;
/// Latent height and width: 16×16 latents = 128×128 pixels, 64 tokens per latent frame.
const LATENT_HW: usize = 16;
const HEADS: usize = 8;
const HEAD_DIM: usize = 32;
const CONTEXT_TOKENS: usize = 16;
const TEXT_DIM: usize = 64;
const GUIDANCE: f64 = 7.0;
/// Flatness criterion: the low-memory heap peak grows ≤ 15 % from 2 to 8 layers.
const FLATNESS_LIMIT: f64 = 0.15;

/// The DiT: the 2B Predict2 layout (17 input channels with the condition mask, padding mask,
/// patch 1×2×2, no learnable positional embedding, MLP ratio 4), narrow.
fn dit_config(layers: usize) -> Config {
    Config {
        in_channels: 17,
        out_channels: 16,
        num_attention_heads: HEADS,
        attention_head_dim: HEAD_DIM,
        num_layers: layers,
        text_embed_dim: TEXT_DIM,
        adaln_lora_dim: 32,
        extra_pos_embed_type: None,
        ..Config::default()
    }
}

fn sigmas() -> anyhow::Result<Vec<f64>> {
    Ok(Schedule::karras_flow_match(STEPS, PREDICT2_SIGMA_MIN, PREDICT2_SIGMA_MAX, 7.0)?.sigmas)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Low,
    Plain,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Low => "low",
            Mode::Plain => "plain",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "low" => Mode::Low,
            "plain" => Mode::Plain,
            _ => bail!("unknown mode '{s}'"),
        })
    }

    fn memory(self) -> MemoryMode {
        match self {
            Mode::Low => MemoryMode { attention_tile: Some(128), ..MemoryMode::low_memory() },
            Mode::Plain => MemoryMode::default(),
        }
    }
}

fn plan_request(frames: usize, mode: Mode) -> PlanRequest {
    let vae = VaeConfig::default();
    PlanRequest {
        steps: STEPS,
        guidance: true,
        dtype: DType::F32,
        dit: mode.memory(),
        decode: false,
        context_tokens: CONTEXT_TOKENS,
        ..PlanRequest::new(
            LATENT_HW * vae.spatial_factor(),
            LATENT_HW * vae.spatial_factor(),
            vae.decoded_frames(frames),
        )
    }
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: usize =
        line.trim_start_matches(field).trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Resets the RSS high-water mark to the current RSS and returns that baseline.
fn reset_rss_peak() -> Option<usize> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    proc_status_bytes("VmRSS")
}

/// One measurement, from a child process (Rust or Python).
#[derive(Clone, Debug, Default)]
struct Measured {
    seconds: f64,
    /// The second (warm) iteration's exact heap peak.
    heap_peak: Option<usize>,
    /// The first iteration's exact heap peak (one-time allocations included).
    first_heap: Option<usize>,
    /// The first iteration's peak RSS above the baseline.
    rss_peak: Option<usize>,
    predicted: Option<f64>,
    /// The plan's stored block inputs (the part that must grow with layers).
    stored_blocks: Option<f64>,
}

/// The child: builds the model and the trajectory, takes the baselines, runs one iteration and
/// prints one `RESULT {json}` line.
fn child(case: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = case.split(':').collect();
    let [mode, layers, frames] = parts.as_slice() else { bail!("{CASE_ENV}='{case}': expected mode:layers:frames") };
    let mode = Mode::parse(mode)?;
    let layers: usize = layers.parse().with_context(|| format!("{CASE_ENV}='{case}': layers"))?;
    let frames: usize = frames.parse().with_context(|| format!("{CASE_ENV}='{case}': latent frames"))?;
    let dev = Device::Cpu;
    let cfg = dit_config(layers);
    let mut model = CosmosTransformer3DModel::random(&cfg, 1, DType::F32, &dev)?;
    model.set_memory_mode(mode.memory())?;
    let shape = [1, 16, frames, LATENT_HW, LATENT_HW];
    let mut rng = SplitMix64::new(2);
    let conditioning = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let prompt = rng.normal_tensor((1, CONTEXT_TOKENS, TEXT_DIM), DType::F32, &dev)?;
    let negative = rng.normal_tensor((1, CONTEXT_TOKENS, TEXT_DIM), DType::F32, &dev)?;
    let target = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let z0 = rng.normal_tensor(&shape[..], DType::F32, &dev)?;
    let inner = Predict2Denoiser::new(&model, conditioning, 1, None)?;
    let denoiser = ClassifierFreeGuidance { inner, scale: GUIDANCE, uncond_context: Some(negative) };
    let schedule = Schedule::karras_flow_match(STEPS, PREDICT2_SIGMA_MIN, PREDICT2_SIGMA_MAX, 7.0)?;
    let plan = Churn::default().plan(&schedule.sigmas, false);
    let solver = SolverKind::Euler.build();
    let cond = Conditioning { frames: None, mask: None, context: Some(prompt), initial_noise: None };
    let traj = Trajectory { denoiser: &denoiser, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let objective = TargetMse { target, label: "random target".into() };
    let noises = vec![None; traj.num_steps()];
    let predicted = MemoryPlan::new(&cfg, &VaeConfig::default(), &plan_request(frames, mode))?;

    // Memory from the first iteration (peak RSS above the post-setup baseline: comparable across
    // the two sides, one-time allocations included, as a user sees them); seconds and the heap
    // the plan is checked against from the second (warm: what every further iteration costs).
    let rss_base = reset_rss_peak();
    let heap_base = shared::memory::reset_peak();
    traj.value_and_grad(&z0, &noises, &objective, GradMode::Recompute)?;
    let first_heap = shared::memory::peak_bytes().saturating_sub(heap_base);
    let rss_peak = rss_base.and_then(|base| Some(proc_status_bytes("VmHWM")?.saturating_sub(base)));
    let heap_base = shared::memory::reset_peak();
    let started = Instant::now();
    let vg = traj.value_and_grad(&z0, &noises, &objective, GradMode::Recompute)?;
    let seconds = started.elapsed().as_secs_f64();
    let heap_peak = shared::memory::peak_bytes().saturating_sub(heap_base);
    let norm = vg.grad_z0.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    if !norm.is_finite() || norm == 0.0 {
        bail!("degenerate gradient (norm {norm})");
    }
    let stored = predicted.step_vjp.iter().find(|t| t.name == "block inputs").map(|t| t.bytes);
    let result = serde_json::json!({
        "seconds": seconds,
        "heap_peak": heap_peak,
        "first_heap": first_heap,
        "rss_peak": rss_peak,
        "predicted": predicted.working_bytes(),
        "stored_blocks": stored,
        "loss": vg.loss,
    });
    println!("RESULT {result}");
    Ok(())
}

fn run_child(mut cmd: Command, what: &str) -> anyhow::Result<Measured> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{what} failed ({}):\n{}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("{what}: no RESULT line in\n{stdout}"))?;
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{what}: '{line}'"))?;
    let size = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).map(|x| x as usize);
    let float = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    Ok(Measured {
        seconds: float("seconds").context("seconds")?,
        heap_peak: size("heap_peak"),
        first_heap: size("first_heap"),
        rss_peak: size("rss_peak"),
        predicted: float("predicted"),
        stored_blocks: float("stored_blocks"),
    })
}

fn mb(x: Option<usize>) -> String {
    x.map(|b| format!("{:.1}", b as f64 / MB)).unwrap_or_else(|| "n/a".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

fn main() -> anyhow::Result<()> {
    if let Ok(case) = std::env::var(CASE_ENV) {
        // As the sampler binary runs (glibc keeps freed memory instead of unmapping it per op).
        shared::memory::keep_freed_memory();
        return child(&case);
    }
    let threads: usize = match std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()) {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let python = std::env::var("WORLDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/cosmos_memory_torch.py");
    let python_ok = Command::new(&python)
        .args(["-c", "import torch, diffusers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let exe = std::env::current_exe()?;
    let sigma_list: Vec<String> = sigmas()?.iter().map(|s| format!("{s:.17e}")).collect();
    let sigma_arg = sigma_list.join(",");

    println!(
        "One z0 optimisation iteration: Predict2 loop (1 conditioning frame, CFG {GUIDANCE}: 2 DiT calls per step), \
         {STEPS} Euler flow steps (Karras flow-match σ), TargetMse on the latents; DiT {HEADS}×{HEAD_DIM} = {} wide, \
         2B layout, random weights, f32, CPU; latents 16×n×{LATENT_HW}×{LATENT_HW} ({} tokens per latent frame), \
         {CONTEXT_TOKENS} context tokens; {threads} threads on both sides; each configuration in a fresh process: memory of the first iteration, seconds of the second",
        HEADS * HEAD_DIM,
        LATENT_HW * LATENT_HW / 4
    );
    println!("Rust modes: low = blocks and their branches checkpointed + tiled attention (tile 128); plain = one graph per step (materialised attention)");
    if python_ok {
        println!("PyTorch: {python} {script} (diffusers CosmosTransformer3DModel, enable_gradient_checkpointing(), every step under torch.utils.checkpoint, SDPA)");
    } else {
        println!("PyTorch SKIPPED: `{python} -c \"import torch, diffusers\"` failed (set WORLDGRAD_PYTHON)");
    }

    let rust_cmd = |mode: Mode, layers: usize, frames: usize| {
        let mut cmd = Command::new(&exe);
        cmd.env(CASE_ENV, format!("{}:{layers}:{frames}", mode.key()))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string());
        cmd
    };
    let torch_cmd = |layers: usize, frames: usize| {
        let mut cmd = Command::new(&python);
        cmd.arg(script)
            .args(["--layers", &layers.to_string(), "--latent-frames", &frames.to_string()])
            .args(["--latent-hw", &LATENT_HW.to_string(), "--heads", &HEADS.to_string()])
            .args(["--head-dim", &HEAD_DIM.to_string(), "--context-tokens", &CONTEXT_TOKENS.to_string()])
            .args(["--text-dim", &TEXT_DIM.to_string(), "--guidance", &GUIDANCE.to_string()])
            .args(["--sigmas", &sigma_arg, "--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        cmd
    };

    struct Row {
        layers: usize,
        frames: usize,
        low: Measured,
        plain: Measured,
        torch: Option<Measured>,
    }
    // Layers at 2 latent frames, and frames at 4 layers (the two sweeps share (4, 2)).
    let mut grid: Vec<(usize, usize)> = [2, 4, 8].iter().map(|&l| (l, 2)).collect();
    grid.extend([4, 8].iter().map(|&f| (4, f)));
    let mut rows = Vec::new();
    for (layers, frames) in grid {
        let report = |what: &str, m: &Measured| {
            println!(
                "  L={layers} n={frames} {what:<14} {:>7.2} s  RSS +{:>7} MB  heap +{:>7} MB (warm +{:>7} MB){}",
                m.seconds,
                mb(m.rss_peak),
                mb(m.first_heap),
                mb(m.heap_peak),
                m.predicted.map(|p| format!("  plan {:.1} MB", p / MB)).unwrap_or_default()
            )
        };
        let low = run_child(rust_cmd(Mode::Low, layers, frames), "rust low-memory")?;
        report("rust low", &low);
        let plain = run_child(rust_cmd(Mode::Plain, layers, frames), "rust plain")?;
        report("rust plain", &plain);
        let torch = if python_ok {
            let m = run_child(torch_cmd(layers, frames), "torch")?;
            report("torch ckpt", &m);
            Some(m)
        } else {
            None
        };
        rows.push(Row { layers, frames, low, plain, torch });
    }

    let heap = |m: &Measured| m.heap_peak.map(|b| b as f64);
    println!();
    println!(
        "Peak memory, first iteration (MB above the post-setup baseline; RSS on both sides, and Rust's exact heap):"
    );
    println!();
    println!("| layers | latent frames | tokens | Rust low RSS | Rust plain RSS | torch ckpt RSS | Rust low / torch | Rust plain / torch | Rust low heap | Rust plain heap |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let t = r.torch.as_ref().and_then(|m| m.rss_peak).map(|b| b as f64);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.layers,
            r.frames,
            r.frames * LATENT_HW * LATENT_HW / 4,
            mb(r.low.rss_peak),
            mb(r.plain.rss_peak),
            mb(r.torch.as_ref().and_then(|m| m.rss_peak)),
            ratio(r.low.rss_peak.map(|b| b as f64), t),
            ratio(r.plain.rss_peak.map(|b| b as f64), t),
            mb(r.low.first_heap),
            mb(r.plain.first_heap),
        );
    }
    println!();
    println!("cosmos::memory_plan against the measured heap peak of the warm (second) iteration, MB:");
    println!();
    println!("| layers | latent frames | Rust low heap | plan (low) | plan / heap | Rust plain heap | plan (plain) | plan / heap |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {} |",
            r.layers,
            r.frames,
            mb(r.low.heap_peak),
            r.low.predicted.unwrap_or(f64::NAN) / MB,
            ratio(r.low.predicted, heap(&r.low)),
            mb(r.plain.heap_peak),
            r.plain.predicted.unwrap_or(f64::NAN) / MB,
            ratio(r.plain.predicted, heap(&r.plain)),
        );
    }
    println!();
    println!("Seconds of the warm (second) iteration:");
    println!();
    println!(
        "| layers | latent frames | Rust low s | Rust plain s | torch ckpt s | Rust low / torch | Rust plain / torch |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let t = r.torch.as_ref().map(|m| m.seconds);
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {} | {} |",
            r.layers,
            r.frames,
            r.low.seconds,
            r.plain.seconds,
            t.map(|s| format!("{s:.2}")).unwrap_or_else(|| "n/a".into()),
            ratio(Some(r.low.seconds), t),
            ratio(Some(r.plain.seconds), t),
        );
    }

    println!();
    let at = |layers: usize| rows.iter().find(|r| r.layers == layers && r.frames == 2);
    if let (Some(a), Some(b)) = (at(2), at(8)) {
        let growth = |m: fn(&Row) -> &Measured| -> Option<(f64, f64)> { Some((heap(m(a))?, heap(m(b))?)) };
        if let Some((h2, h8)) = growth(|r| &r.low) {
            let g = h8 / h2 - 1.0;
            println!(
                "low-memory heap peak: {:.1} MB at 2 layers, {:.1} MB at 8 ({:+.1} %, limit +{:.0} %): {}",
                h2 / MB,
                h8 / MB,
                100.0 * g,
                100.0 * FLATNESS_LIMIT,
                if g <= FLATNESS_LIMIT { "PASS" } else { "FAIL" }
            );
            let beyond = |r: &Row| heap(&r.low).zip(r.low.stored_blocks).map(|(h, s)| h - s);
            if let (Some(x2), Some(x8)) = (beyond(a), beyond(b)) {
                println!(
                    "  beyond the stored segment inputs (2 calls × (⌈L/⌈√L⌉⌉ + 1) × N·D, what checkpointing must keep): {:.1} MB → {:.1} MB ({:+.1} %)",
                    x2 / MB,
                    x8 / MB,
                    100.0 * (x8 / x2 - 1.0)
                );
            }
        }
        if let Some((h2, h8)) = growth(|r| &r.plain) {
            println!(
                "plain-graph heap peak: {:.1} MB at 2 layers, {:.1} MB at 8 ({:+.1} %)",
                h2 / MB,
                h8 / MB,
                100.0 * (h8 / h2 - 1.0)
            );
        }
    }
    Ok(())
}
