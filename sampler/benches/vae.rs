//! Seconds and peak memory of the Wan2.1 VAE decode (`AutoencoderKLWan`, the real architecture:
//! `Config::default()`, random weights, f32, CPU) and of its gradient w.r.t. the latents — the
//! recomputing backward (`decode_taped` + `DecodeTape::vjp`) and the full graph (`decode` on a
//! `Var` + `backward`) — at 2, 4 and 8 latent frames; and the same decode and plain-autograd
//! backward in diffusers (`benches/vae_torch.py`) for the ratios.
//!
//! `cargo bench -p sampler --bench vae` (optionally `-- 2 4` for other latent frame counts)
//!
//! Every configuration runs in a fresh process (this binary re-executed with
//! `WAN_VAE_BENCH_CASE=mode:frames`, the Python script likewise), so both sides report the same
//! metric: peak RSS above the process's own baseline taken after the model is built and the
//! inputs are allocated (Linux: `VmHWM` after resetting it through `/proc/self/clear_refs`).
//! The Rust side also reports its exact heap peak above the baseline (a counting global
//! allocator), which is what the flatness criterion is judged on.
//!
//! Environment: `RAYON_NUM_THREADS` (default: all available cores) sets the thread count of
//! both sides (candle's rayon pool and gemm, `torch.set_num_threads`); `WORLDGRAD_PYTHON` the
//! interpreter with torch + diffusers (default `python3`; skipped with a note when the import
//! fails); `WAN_VAE_BENCH_LATENT_HW` the latent side (default 4: 32×32 pixels, see below);
//! `WAN_VAE_BENCH_FULL_LIMIT_GB` the largest predicted full-graph peak that is run (default 12).
//!
//! Why 32×32 pixels (4×4 latents): the whole bench then takes about 4–5 minutes on a 2-core
//! CPU. At 64×64 (8×8 latents) one recompute chunk alone took 48 s and 5.7 GB of heap at 2
//! latent frames (the conv backward keeps im2col columns), and the bench would take ~20 min.
//! The per-chunk structure — what the flatness criterion is about — is the same at any size.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use sampler::cosmos::vae::{AutoencoderKLWan, Config};
use shared::rng::SplitMix64;

#[global_allocator]
static ALLOCATOR: shared::memory::CountingAllocator = shared::memory::CountingAllocator;

const MB: f64 = 1024.0 * 1024.0;
const CASE_ENV: &str = "WAN_VAE_BENCH_CASE";
/// The criterion: recompute peak beyond the stored tensors grows ≤ 15 % from 2 to 8.
const FLATNESS_LIMIT: f64 = 0.15;

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: usize =
        line.trim_start_matches(field).trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Resets the RSS high-water mark to the current RSS (Linux ≥ 4.0) and returns that baseline;
/// `None` where that is not possible, so no RSS figure is reported rather than a wrong one.
fn reset_rss_peak() -> Option<usize> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    proc_status_bytes("VmRSS")
}

fn bytes_of(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// `AutoencoderKLWan::random`'s weights (the scheme `vae_torch.py` draws too).
fn random_model(cfg: &Config, seed: u64) -> anyhow::Result<AutoencoderKLWan> {
    AutoencoderKLWan::random(cfg, seed, DType::F32, &Device::Cpu)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Decode,
    Recompute,
    FullGraph,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Decode => "decode",
            Mode::Recompute => "recompute",
            Mode::FullGraph => "full",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "decode" => Mode::Decode,
            "recompute" => Mode::Recompute,
            "full" => Mode::FullGraph,
            _ => bail!("unknown bench mode '{s}'"),
        })
    }
}

/// One configuration's measurement, from a child process (Rust or Python).
#[derive(Clone, Debug, Default)]
struct Measured {
    seconds: f64,
    /// Of `seconds`, the part before the backward: the taped decode (recompute) or the decode
    /// that records the graph (full graph, PyTorch's decode with autograd).
    forward_seconds: Option<f64>,
    /// Exact heap peak above the baseline (Rust only).
    heap_peak: Option<usize>,
    /// Peak RSS above the baseline.
    rss_peak: Option<usize>,
    tape_bytes: usize,
    video_bytes: usize,
    grad_bytes: usize,
    clamped: f64,
}

/// The child: builds the model and inputs, takes the baselines, runs one configuration once and
/// prints one `RESULT {json}` line.
fn child(case: &str, latent_hw: usize) -> anyhow::Result<()> {
    let (mode, frames) = case.split_once(':').with_context(|| format!("{CASE_ENV}='{case}': expected mode:frames"))?;
    let mode = Mode::parse(mode)?;
    let frames: usize = frames.parse().with_context(|| format!("{CASE_ENV}='{case}': latent frames"))?;
    let cfg = Config::default();
    let vae = random_model(&cfg, 1)?;
    let dev = Device::Cpu;
    let z = SplitMix64::new(2).normal_tensor((1, cfg.z_dim, frames, latent_hw, latent_hw), DType::F32, &dev)?;
    let s = cfg.spatial_factor() * latent_hw;
    let video_shape = (1, cfg.out_channels, cfg.decoded_frames(frames), s, s);
    let probe = SplitMix64::new(3).normal_tensor(video_shape, DType::F32, &dev)?;

    let rss_base = reset_rss_peak();
    let heap_base = shared::memory::reset_peak();
    let started = Instant::now();
    let mut forward_seconds = None;
    let (video, grad, tape_bytes) = match mode {
        Mode::Decode => (vae.decode(&z)?, None, 0),
        Mode::Recompute => {
            let (video, tape) = vae.decode_taped(&z)?;
            forward_seconds = Some(started.elapsed().as_secs_f64());
            let grad = tape.vjp(&vae, &probe)?;
            (video, Some(grad), tape.bytes())
        }
        Mode::FullGraph => {
            let z_var = Var::from_tensor(&z)?;
            let video = vae.decode(z_var.as_tensor())?;
            forward_seconds = Some(started.elapsed().as_secs_f64());
            let grads = (&video * &probe)?.sum_all()?.backward()?;
            let grad = grads.get(z_var.as_tensor()).context("no gradient reached the latents")?.clone();
            // The graph (held by `video`) is what the full-graph backward costs: keep it counted.
            (video.detach(), Some(grad), 0)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let heap_peak = shared::memory::peak_bytes().saturating_sub(heap_base);
    let rss_peak = rss_base.and_then(|base| Some(proc_status_bytes("VmHWM")?.saturating_sub(base)));
    let values: Vec<f32> = video.flatten_all()?.to_vec1()?;
    let clamped = values.iter().filter(|v| v.abs() >= 1.0).count() as f64 / values.len() as f64;
    if let Some(g) = &grad {
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        if !norm.is_finite() || norm == 0.0 {
            bail!("degenerate latent gradient (norm {norm})");
        }
    }
    let result = serde_json::json!({
        "seconds": seconds,
        "forward_seconds": forward_seconds,
        "heap_peak": heap_peak,
        "rss_peak": rss_peak,
        "tape_bytes": tape_bytes,
        "video_bytes": bytes_of(&video),
        "grad_bytes": grad.as_ref().map(bytes_of).unwrap_or(0),
        "clamped": clamped,
    });
    println!("RESULT {result}");
    Ok(())
}

/// Runs one configuration in a child process and parses its `RESULT` line.
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
    Ok(Measured {
        seconds: v.get("seconds").and_then(serde_json::Value::as_f64).context("seconds")?,
        forward_seconds: v.get("forward_seconds").and_then(serde_json::Value::as_f64),
        heap_peak: size("heap_peak"),
        rss_peak: size("rss_peak"),
        tape_bytes: size("tape_bytes").unwrap_or(0),
        video_bytes: size("video_bytes").unwrap_or(0),
        grad_bytes: size("grad_bytes").unwrap_or(0),
        clamped: v.get("clamped").and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN),
    })
}

fn mb(x: Option<usize>) -> String {
    x.map(|b| format!("{:.0}", b as f64 / MB)).unwrap_or_else(|| "n/a".into())
}

fn secs(x: Option<f64>) -> String {
    x.map(|s| format!("{s:.2}")).unwrap_or_else(|| "n/a".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

fn main() -> anyhow::Result<()> {
    let latent_hw: usize = match std::env::var("WAN_VAE_BENCH_LATENT_HW") {
        Ok(s) => s.parse().with_context(|| format!("WAN_VAE_BENCH_LATENT_HW='{s}'"))?,
        Err(_) => 4,
    };
    if let Ok(case) = std::env::var(CASE_ENV) {
        return child(&case, latent_hw);
    }
    // `cargo bench` passes `--bench`; any numbers are the latent frame counts to measure.
    let mut frame_counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if frame_counts.is_empty() {
        frame_counts = vec![2, 4, 8];
    }
    let threads: usize = match std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()) {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let full_limit_gb: f64 =
        std::env::var("WAN_VAE_BENCH_FULL_LIMIT_GB").ok().and_then(|s| s.parse().ok()).unwrap_or(12.0);
    let python = std::env::var("WORLDGRAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/vae_torch.py");
    let python_ok = Command::new(&python)
        .args(["-c", "import torch, diffusers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let exe = std::env::current_exe()?;
    let cfg = Config::default();
    let px = cfg.spatial_factor() * latent_hw;

    println!(
        "Wan2.1 VAE decoder (Config::default(), random weights, f32, CPU), latents 1×{}×n×{latent_hw}×{latent_hw} → \
         video 1×3×(4n−3)×{px}×{px}; {threads} threads on both sides (RAYON_NUM_THREADS = CANDLE_NUM_THREADS = \
         torch.set_num_threads = {threads}); each configuration once, in a fresh process",
        cfg.z_dim
    );
    if python_ok {
        println!("PyTorch twin: {python} {script} (diffusers AutoencoderKLWan(), plain autograd: diffusers has no gradient checkpointing for this VAE)");
    } else {
        println!("PyTorch twin SKIPPED: `{python} -c \"import torch, diffusers\"` failed (set WORLDGRAD_PYTHON to an interpreter that has them)");
    }

    let rust_cmd = |mode: Mode, frames: usize| {
        let mut cmd = Command::new(&exe);
        cmd.env(CASE_ENV, format!("{}:{frames}", mode.key()))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .env("WAN_VAE_BENCH_LATENT_HW", latent_hw.to_string());
        cmd
    };
    let torch_cmd = |mode: &str, frames: usize| {
        let mut cmd = Command::new(&python);
        cmd.arg(script)
            .args(["--case", mode, "--latent-frames", &frames.to_string(), "--latent-hw", &latent_hw.to_string()])
            .args(["--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        cmd
    };

    struct Row {
        frames: usize,
        decode: Measured,
        recompute: Measured,
        full: Option<Measured>,
        full_note: String,
        torch_decode: Option<Measured>,
        torch_backward: Option<Measured>,
    }
    let mut rows: Vec<Row> = Vec::new();
    for &frames in &frame_counts {
        let report = |what: &str, m: &Measured| {
            println!(
                "  n={frames} {what:<26} {:>7.2} s (before backward {:>6}) heap +{:>5} MB  RSS +{:>5} MB  tape {:>3} MB  clamped {:.1} %",
                m.seconds,
                secs(m.forward_seconds),
                mb(m.heap_peak),
                mb(m.rss_peak),
                mb(Some(m.tape_bytes)),
                100.0 * m.clamped
            )
        };
        let decode = run_child(rust_cmd(Mode::Decode, frames), "rust decode")?;
        report("rust decode", &decode);
        let recompute = run_child(rust_cmd(Mode::Recompute, frames), "rust recompute backward")?;
        report("rust decode+vjp recompute", &recompute);
        // The full graph grows about linearly in latent frames: predict from the two largest
        // runs so far and skip what would not fit.
        let fulls: Vec<(usize, usize)> =
            rows.iter().filter_map(|r| Some((r.frames, r.full.as_ref()?.heap_peak?))).collect();
        let predicted = match fulls.as_slice() {
            [.., (f1, p1), (f2, p2)] if f2 > f1 => {
                let per_frame = (*p2 as f64 - *p1 as f64) / (*f2 - *f1) as f64;
                Some(*p2 as f64 + per_frame * (frames as f64 - *f2 as f64))
            }
            _ => None,
        };
        let (full, full_note) = match predicted {
            Some(p) if p > full_limit_gb * 1024.0 * MB => {
                let note = format!(
                    "full graph at n={frames} skipped: predicted peak {:.1} GB > {full_limit_gb} GB (linear in n from the smaller runs)",
                    p / (1024.0 * MB)
                );
                println!("  {note}");
                (None, note)
            }
            _ => {
                let m = run_child(rust_cmd(Mode::FullGraph, frames), "rust full-graph backward")?;
                report("rust decode+bwd full", &m);
                (Some(m), String::new())
            }
        };
        let (torch_decode, torch_backward) = if python_ok {
            let d = run_child(torch_cmd("decode", frames), "torch decode")?;
            report("torch decode", &d);
            let b = run_child(torch_cmd("backward", frames), "torch decode+backward")?;
            report("torch decode+backward", &b);
            (Some(d), Some(b))
        } else {
            (None, None)
        };
        rows.push(Row { frames, decode, recompute, full, full_note, torch_decode, torch_backward });
    }

    // Heap beyond what the recompute backward must hold whatever n is: the tape (latent frames
    // and caches), the output video and the latent gradient (z and the probe r are in the
    // baseline).
    let beyond = |m: &Measured| m.heap_peak.map(|p| p.saturating_sub(m.tape_bytes + m.video_bytes + m.grad_bytes));

    println!();
    println!("Rust (seconds; exact heap peak above baseline, MB; peak RSS above baseline, MB):");
    println!();
    println!("| latent frames | video frames | decode s | decode heap | decode RSS | recompute s | recompute heap | recompute RSS | tape | heap − (tape + video + grad) | full graph s | full graph heap | full graph RSS |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (fs, fh, fr) = match &r.full {
            Some(m) => (format!("{:.2}", m.seconds), mb(m.heap_peak), mb(m.rss_peak)),
            None => ("skipped".into(), "—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {:.2} | {} | {} | {:.2} | {} | {} | {} | {} | {fs} | {fh} | {fr} |",
            r.frames,
            cfg.decoded_frames(r.frames),
            r.decode.seconds,
            mb(r.decode.heap_peak),
            mb(r.decode.rss_peak),
            r.recompute.seconds,
            mb(r.recompute.heap_peak),
            mb(r.recompute.rss_peak),
            mb(Some(r.recompute.tape_bytes)),
            mb(beyond(&r.recompute)),
        );
    }
    for r in rows.iter().filter(|r| !r.full_note.is_empty()) {
        println!("\n{}", r.full_note);
    }

    // Where the time goes: the part before the backward vs the backward itself.
    let split = |m: Option<&Measured>| match m {
        Some(m) => match m.forward_seconds {
            Some(f) => format!("{} + {}", secs(Some(f)), secs(Some(m.seconds - f))),
            None => secs(Some(m.seconds)),
        },
        None => "—".into(),
    };
    println!();
    println!("Seconds split (before the backward + the backward):");
    println!();
    println!("| latent frames | Rust decode | Rust recompute: taped decode + vjp | Rust full graph: decode + backward | torch decode (no_grad) | torch: decode + backward |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.frames,
            split(Some(&r.decode)),
            split(Some(&r.recompute)),
            split(r.full.as_ref()),
            split(r.torch_decode.as_ref()),
            split(r.torch_backward.as_ref()),
        );
    }

    if python_ok {
        println!();
        println!("Rust vs PyTorch (same metric: peak RSS above each process's post-setup baseline, MB; ratio = Rust / PyTorch):");
        println!();
        println!("| latent frames | torch decode s | Rust/torch decode s | torch decode RSS | Rust/torch decode RSS | torch backward s | Rust recompute/torch s | torch backward RSS | Rust recompute/torch RSS | Rust full/torch s | Rust full/torch RSS |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let rss = |m: Option<&Measured>| m.and_then(|m| m.rss_peak).map(|b| b as f64);
        let secs_of = |m: Option<&Measured>| m.map(|m| m.seconds);
        for r in &rows {
            let (td, tb) = (r.torch_decode.as_ref(), r.torch_backward.as_ref());
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.frames,
                secs(secs_of(td)),
                ratio(Some(r.decode.seconds), secs_of(td)),
                mb(td.and_then(|m| m.rss_peak)),
                ratio(r.decode.rss_peak.map(|b| b as f64), rss(td)),
                secs(secs_of(tb)),
                ratio(Some(r.recompute.seconds), secs_of(tb)),
                mb(tb.and_then(|m| m.rss_peak)),
                ratio(r.recompute.rss_peak.map(|b| b as f64), rss(tb)),
                ratio(secs_of(r.full.as_ref()), secs_of(tb)),
                ratio(rss(r.full.as_ref()), rss(tb)),
            );
        }
    }

    println!();
    let first = rows.iter().find(|r| r.frames == 2);
    let last = rows.iter().find(|r| r.frames == 8);
    match (first.and_then(|r| beyond(&r.recompute)), last.and_then(|r| beyond(&r.recompute))) {
        (Some(a), Some(b)) if a > 0 => {
            let growth = b as f64 / a as f64 - 1.0;
            println!(
                "recompute backward: heap peak beyond tape + video + grad {:.0} MB at 2 latent frames, {:.0} MB at 8: \
                 ratio {:.3} ({:+.1} %, limit +{:.0} %): {}",
                a as f64 / MB,
                b as f64 / MB,
                b as f64 / a as f64,
                100.0 * growth,
                100.0 * FLATNESS_LIMIT,
                if growth <= FLATNESS_LIMIT { "PASS" } else { "FAIL" }
            );
        }
        _ => println!("recompute backward: the flatness criterion needs the 2 and 8 latent-frame runs"),
    }
    Ok(())
}
