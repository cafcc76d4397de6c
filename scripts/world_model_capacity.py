"""How much of the future can a network of a given size predict? A capacity diagnostic for the
embedded world model (sampler/src/world_model): deterministic regressors of frames 1..T-1 from
frame 0 and the actions, trained with MSE in PyTorch — the posterior mean a diffusion model's
high-σ denoiser (the stress test samples σ 80 → 3) can at best reach — scored by PSNR against the
copy-the-first-frame baseline, as `train-world-model` scores the world model.

  cargo run -p sampler --release --example dump_world_model_clips -- /tmp/clips.safetensors
  python scripts/world_model_capacity.py /tmp/clips.safetensors --arch dit --width 128 --layers 4

`--arch dit` is diffusers' CosmosTransformer3DModel configured as `WorldModelConfig` configures
ours (4×4 patches, AdaLN-LoRA 16, learnable position embedding; 7 input channels: the noisy
frames — zeros here —, the condition frame, the mask) with the action embedding of
`world_model::WorldModelNet` (linear 8 → width + a learned per-transition position), so its
parameter count equals ours (small: 154 688, medium: 981 120). `--arch conv` is a small U-Net
(the actions broadcast as input channels), for contrast. Needs torch, diffusers, safetensors.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
from diffusers import CosmosTransformer3DModel
from safetensors.torch import load_file


def psnr(pred, real):
    """dB over frames 1.., pixels in [0, 1] (as sampler::world_model::psnr)."""
    mse = ((pred.clamp(-1, 1) - real)[:, :, 1:] * 0.5).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


class DiT(nn.Module):
    def __init__(self, width, layers, frames, h, w):
        super().__init__()
        self.frames, self.h, self.w = frames, h, w
        self.net = CosmosTransformer3DModel(
            in_channels=7, out_channels=3, num_attention_heads=width // 16, attention_head_dim=16,
            num_layers=layers, mlp_ratio=2.0, text_embed_dim=width, adaln_lora_dim=16,
            max_size=(frames, h, w), patch_size=(1, 4, 4), rope_scale=(1.0, 1.0, 1.0),
            concat_padding_mask=False, extra_pos_embed_type="learnable")
        self.action = nn.Linear(8, width)
        self.pos = nn.Parameter(torch.randn(frames - 1, width) * 0.02)

    def forward(self, frame0, actions):
        b = frame0.shape[0]
        cond = frame0.repeat(1, 1, self.frames, 1, 1)
        mask = torch.zeros(b, 1, self.frames, self.h, self.w)
        mask[:, :, 0] = 1
        x = torch.cat([torch.zeros_like(cond), cond, mask], 1)
        ctx = self.action(actions[:, : self.frames - 1]) + self.pos
        return self.net(x, torch.ones(b), ctx, return_dict=False)[0]


class ConvUNet(nn.Module):
    def __init__(self, width, layers, frames, h, w):
        super().__init__()
        self.frames, self.h, self.w = frames, h, w

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        c_in = 3 + 8 * (frames - 1)
        self.enc1 = nn.Sequential(block(c_in, width), block(width, width))
        self.enc2 = nn.Sequential(block(width, 2 * width), *[block(2 * width, 2 * width) for _ in range(layers + 1)])
        self.dec = nn.Sequential(block(3 * width, width), block(width, width))
        self.out = nn.Conv2d(width, 3 * (frames - 1), 3, padding=1)

    def forward(self, frame0, actions):
        b, t = frame0.shape[0], self.frames
        acts = actions[:, : t - 1].reshape(b, -1, 1, 1).expand(-1, -1, self.h, self.w)
        h1 = self.enc1(torch.cat([frame0[:, :, 0], acts], 1))
        h2 = self.enc2(nn.functional.avg_pool2d(h1, 2))
        h = self.dec(torch.cat([h1, nn.functional.interpolate(h2, scale_factor=2)], 1))
        out = self.out(h).reshape(b, t - 1, 3, self.h, self.w).permute(0, 2, 1, 3, 4)
        return torch.cat([torch.zeros(b, 3, 1, self.h, self.w), out], 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("clips")
    p.add_argument("--arch", choices=["dit", "conv"], default="dit")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    d = load_file(a.clips)
    frames, actions = d["train_frames"], d["train_actions"]
    _, _, t, h, w = frames.shape
    net = (DiT if a.arch == "dit" else ConvUNet)(a.width, a.layers, t, h, w)
    print(f"{a.arch} width {a.width} layers {a.layers}: {sum(p.numel() for p in net.parameters())} parameters, "
          f"{frames.shape[0]} training clips", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.02)
    gen = torch.Generator().manual_seed(a.seed)
    start = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, frames.shape[0], (a.batch_size,), generator=gen)
        f, act = frames[idx], actions[idx]
        loss = (net(f[:, :, :1], act)[:, :, 1:] - (f[:, :, 1:] - f[:, :, :1])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, a.steps // 5) == 0:
            net.eval()
            cells = []
            with torch.no_grad():
                for name in ["eval", "evalall"]:
                    f, act = d[f"{name}_frames"], d[f"{name}_actions"]
                    model, copy = psnr(f[:, :, :1] + net(f[:, :, :1], act), f), psnr(f[:, :, :1].repeat(1, 1, t, 1, 1), f)
                    cells.append(f"{name} ({f.shape[0]} clips) {model:.2f} dB vs copy {copy:.2f} ({model - copy:+.2f})")
            net.train()
            print(f"step {step}: loss {loss.item():.5f}, {time.time() - start:.0f} s; " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
