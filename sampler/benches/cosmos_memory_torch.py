"""The PyTorch twin of sampler/benches/cosmos_memory.rs: one z0 optimisation iteration (value and
gradient of the initial noise) through the Cosmos-Predict2 Video2World loop, with diffusers'
CosmosTransformer3DModel (same narrow config as the Rust side: the 2B layout, random weights,
float32, CPU) — the way a PyTorch user saves memory: the transformer's own gradient
checkpointing (`enable_gradient_checkpointing()`, torch.utils.checkpoint per block) and every
denoising step under `torch.utils.checkpoint` (only each step's input is kept), one backward.

The loop is diffusers' Cosmos2VideoToWorldPipeline (as sampler/src/cosmos/pipeline.rs expresses
it): t = σ/(σ+1); the network reads the conditioning latents clean on the conditioning frame
(timestep σ_c/(σ_c+1), σ_c = 1e-4) and x·(1 − t) elsewhere; x0 = (1 − t)·x − t·F, forced to the
conditioning latents on that frame; CFG x0 = c + g·(c − u); Euler x ← x + (σ' − σ)(x − x0)/σ;
x_0 = σ_0·z0; loss = mean((x_N − target)²). The σ come from the Rust side (--sigmas).

Two iterations, as on the Rust side: the first one's peak RSS above the process's baseline after
the model and inputs are built (Linux: VmHWM after writing 5 to /proc/self/clear_refs), and the
second (warm) one's seconds.

    python sampler/benches/cosmos_memory_torch.py --layers 4 --latent-frames 2 --sigmas 80,...

prints `RESULT {json}`. Written for torch 2.15, diffusers 0.42.1.
"""
import argparse
import json
import re
import time

SIGMA_CONDITIONING = 1e-4


def status_bytes(field):
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else None


def reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_bytes("VmRSS")
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--latent-frames", type=int, required=True)
    ap.add_argument("--latent-hw", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=16)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--sigmas", required=True, help="comma-separated σ_0 … σ_N")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-checkpoint", action="store_true", help="plain autograd (no checkpointing)")
    args = ap.parse_args()

    import torch
    import torch.utils.checkpoint as ckpt
    from diffusers import CosmosTransformer3DModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CosmosTransformer3DModel(
        in_channels=17,
        out_channels=16,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_layers=args.layers,
        mlp_ratio=4.0,
        text_embed_dim=args.text_dim,
        adaln_lora_dim=32,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    ).eval()
    # Only z0's gradient is wanted: frozen weights, as the Rust side (no weight gradients).
    model.requires_grad_(False)
    checkpointing = not args.no_checkpoint
    if checkpointing:
        model.enable_gradient_checkpointing()

    sigmas = [float(s) for s in args.sigmas.split(",")]
    g = torch.Generator().manual_seed(2)
    t, hw = args.latent_frames, args.latent_hw
    shape = (1, 16, t, hw, hw)
    conditioning = torch.randn(shape, generator=g)
    prompt = torch.randn((1, args.context_tokens, args.text_dim), generator=g)
    negative = torch.randn((1, args.context_tokens, args.text_dim), generator=g)
    target = torch.randn(shape, generator=g)
    z0 = torch.randn(shape, generator=g)
    m = torch.zeros((1, 1, t, 1, 1))
    m[:, :, 0] = 1.0
    keep = 1.0 - m
    mask = m.expand(1, 1, t, hw, hw).contiguous()
    padding = torch.zeros((1, 1, hw, hw))
    t_cond = SIGMA_CONDITIONING / (SIGMA_CONDITIONING + 1.0)

    def denoise(x, sigma, context):
        t_flow = sigma / (sigma + 1.0)
        c_in = 1.0 - t_flow
        net_in = conditioning * m + x * c_in * keep
        timestep = m * t_cond + keep * t_flow
        f = model(net_in, timestep, context, condition_mask=mask, padding_mask=padding, return_dict=False)[0]
        x0 = x * c_in - f * t_flow
        return conditioning * m + x0 * keep

    def step(i, x):
        s, s_next = sigmas[i], sigmas[i + 1]
        d_c = denoise(x, s, prompt)
        d_u = denoise(x, s, negative)
        d = d_c + args.guidance * (d_c - d_u)
        return x + (s_next - s) * (x - d) / s

    def iteration():
        z = z0.clone().requires_grad_(True)
        x = z * sigmas[0]
        for i in range(len(sigmas) - 1):
            if checkpointing:
                x = ckpt.checkpoint(step, i, x, use_reentrant=False)
            else:
                x = step(i, x)
        loss = ((x - target) ** 2).mean()
        loss.backward()
        return loss, z.grad

    # Memory from the first iteration, seconds from the second, as on the Rust side.
    base = reset_rss_peak()
    iteration()
    hwm = status_bytes("VmHWM")
    start = time.perf_counter()
    loss, grad = iteration()
    seconds = time.perf_counter() - start
    if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
        raise SystemExit("degenerate gradient")
    result = {
        "seconds": seconds,
        "rss_peak": hwm - base if base is not None and hwm is not None else None,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
