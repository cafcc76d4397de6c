"""The PyTorch twin of sampler/benches/vae.rs: diffusers' Wan2.1 VAE (`AutoencoderKLWan()`, its
default config = the real architecture), random weights, float32, CPU; the decode (no_grad) and
the decode + backward of <video, r> w.r.t. the latents, at the same sizes as the Rust bench.

diffusers has no gradient checkpointing for this VAE (`_supports_gradient_checkpointing = False`
in diffusers 0.42.1), so the backward is plain autograd through the whole chunked decode. The
weights are frozen (`requires_grad_(False)`): only the latents' gradient is computed, as a
PyTorch user would write it. WAN_VAE_TORCH_WEIGHT_GRADS=1 leaves them trainable (autograd then
also computes and stores every decoder weight's gradient, as candle's backward always does).

Every configuration runs in a fresh process and reports, like the Rust side, its peak RSS above
its own baseline taken after the model is built and the inputs are allocated (Linux: VmHWM after
resetting it by writing 5 to /proc/self/clear_refs).

    python sampler/benches/vae_torch.py [--threads N] [--latent-hw 8] [--frames 2 4 8]
        runs every configuration (each in a subprocess) and prints a table
    python sampler/benches/vae_torch.py --case decode|backward --latent-frames N ...
        one configuration; prints `RESULT {json}` (what `cargo bench -p sampler --bench vae` runs)

Written for torch 2.15, diffusers 0.42.1.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

MB = 1024.0 * 1024.0


def status_bytes(field):
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else None


def reset_rss_peak():
    """Resets VmHWM to the current RSS and returns that baseline (None where impossible)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_bytes("VmRSS")
    except OSError:
        return None


def randomize(model, seed):
    """The scheme of the Rust side (tests/wan_vae_grad.rs, benches/vae.rs): conv weights
    N(0, 1/fan_in), biases N(0, 0.1^2), RMS gains 1 + N(0, 0.2^2), decoder.conv_out.weight x 0.15
    (the video mostly inside the clamp). The draws differ (another generator); the scale is the
    same, which is what matters for time and memory."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                gain = 0.15 if name == "decoder.conv_out.weight" else 1.0
                p.copy_(noise * (gain / p[0].numel() ** 0.5))


def run_case(case, frames, latent_hw, threads):
    import torch
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    randomize(vae, 1)
    if os.environ.get("WAN_VAE_TORCH_WEIGHT_GRADS") != "1":
        # Only the latents' gradient is wanted: frozen weights, as a PyTorch user would write it
        # (candle cannot skip them: its matmul backward computes both operands' gradients).
        vae.requires_grad_(False)
    cfg = vae.config
    g = torch.Generator().manual_seed(2)
    z = torch.randn((1, cfg.z_dim, frames, latent_hw, latent_hw), generator=g)
    side = 8 * latent_hw
    video_frames = 4 * (frames - 1) + 1
    r = torch.randn((1, 3, video_frames, side, side), generator=g)

    base = reset_rss_peak()
    start = time.perf_counter()
    grad_bytes = 0
    forward_seconds = None
    if case == "decode":
        with torch.no_grad():
            video = vae.decode(z).sample
    elif case == "backward":
        zv = z.clone().requires_grad_(True)
        video = vae.decode(zv).sample
        forward_seconds = time.perf_counter() - start
        (video * r).sum().backward()
        grad = zv.grad
        if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
            raise SystemExit("degenerate latent gradient")
        grad_bytes = grad.numel() * grad.element_size()
        video = video.detach()
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - start
    hwm = status_bytes("VmHWM")
    rss_peak = hwm - base if base is not None and hwm is not None else None
    assert video.shape == (1, 3, video_frames, side, side), video.shape
    result = {
        "seconds": seconds,
        "forward_seconds": forward_seconds,
        "rss_peak": rss_peak,
        "video_bytes": video.numel() * video.element_size(),
        "grad_bytes": grad_bytes,
        "clamped": (video.abs() >= 1.0).float().mean().item(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["decode", "backward"])
    ap.add_argument("--latent-frames", type=int, default=2)
    ap.add_argument("--latent-hw", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    if args.case:
        run_case(args.case, args.latent_frames, args.latent_hw, args.threads)
        return
    print(f"diffusers AutoencoderKLWan(), random weights, f32, CPU, {args.threads} threads, latents {args.latent_hw}x{args.latent_hw}")
    print("| latent frames | decode s | decode RSS MB | decode+backward s | decode+backward RSS MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.frames:
        res = {}
        for case in ["decode", "backward"]:
            cmd = [sys.executable, __file__, "--case", case, "--latent-frames", str(n),
                   "--latent-hw", str(args.latent_hw), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[case] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
        d, b = res["decode"], res["backward"]
        print(f"| {n} | {d['seconds']:.2f} | {d['rss_peak'] / MB:.0f} | {b['seconds']:.2f} | {b['rss_peak'] / MB:.0f} |", flush=True)


if __name__ == "__main__":
    main()
