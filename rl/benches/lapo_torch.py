"""The multimodal LAPO iteration of rl/benches/lapo.rs in PyTorch eager, for the ratio.

batch 64, 9x84x84, ResNet18 (9-ch conv1, train-mode BN) owned by the critic optimiser,
target encoder on s', critic / VAE / actor MLPs 3x256, Adam, Polyak. CPU, default threads.
    python rl/benches/lapo_torch.py [ITERS] [BATCH] [THREADS]
"""
import copy
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class Encoder(nn.Module):
    def __init__(self, state_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(9, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, w in enumerate([64, 128, 256, 512]):
            s = 1 if i == 0 else 2
            layers += [Block(cin, w, s), Block(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.proj = nn.Linear(512, 256)
        self.joint = nn.Sequential(nn.Linear(state_dim, 256), nn.ReLU(), nn.Linear(256, 256))
        self.fuse = nn.Linear(512, 256)

    def forward(self, img, state):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(img))), 3, 2, 1)
        x = self.layers(x).mean((2, 3))
        return self.fuse(torch.cat([F.relu(self.proj(x)), F.relu(self.joint(state))], -1))


def mlp(i, o):
    return nn.Sequential(nn.Linear(i, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, o))


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    if len(sys.argv) > 3:
        # The Rust side's thread count, so the ratio compares like with like.
        torch.set_num_threads(int(sys.argv[3]))
    S, A, L, H = 16, 8, 16, 84
    torch.manual_seed(0)
    enc = Encoder(S)
    q1, q2, v = mlp(256 + A, 1), mlp(256 + A, 1), mlp(256, 1)
    vae_e, vae_d = mlp(256 + A, 2 * L), mlp(256 + L, A)
    actor = mlp(256, L)
    t_enc, t_q1, t_q2, t_vae_d, t_actor = (copy.deepcopy(m) for m in (enc, q1, q2, vae_d, actor))
    critic_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters(), *v.parameters(), *enc.parameters()], lr=2e-4)
    vae_opt = torch.optim.Adam([*vae_e.parameters(), *vae_d.parameters()], lr=2e-4)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=2e-4)
    img, nimg = torch.rand(B, 9, H, H), torch.rand(B, 9, H, H)
    st, nst, a = torch.randn(B, S), torch.randn(B, S), torch.randn(B, A)
    r, d = torch.rand(B, 1), torch.zeros(B, 1)

    def step():
        s = enc(img, st)
        sd = s.detach()
        with torch.no_grad():
            sn = t_enc(nimg, nst)
            tq = r + (1 - d) * 0.99 * v(sn)
            z = 2 * torch.tanh(t_actor(sd)) + (0.1 * torch.randn(B, L)).clamp(-0.2, 0.2)
            ta = t_vae_d(torch.cat([sd, z], -1))
            sa = torch.cat([sd, ta], -1)
            tv = torch.min(t_q1(sa), t_q2(sa))
        sa = torch.cat([s, a], -1)
        loss = F.mse_loss(q1(sa), tq) + F.mse_loss(q2(sa), tq) + F.mse_loss(v(s), tv.clamp(0, 100))
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        with torch.no_grad():
            na = t_vae_d(torch.cat([sn, 2 * torch.tanh(t_actor(sn))], -1))
            nsa = torch.cat([sn, na], -1)
            adv = r + 0.99 * torch.min(t_q1(nsa), t_q2(nsa)) - v(sd)
            w = torch.where(adv > 0, 0.9, 0.1)
        stats = vae_e(torch.cat([sd, a], -1))
        mu, lv = stats[:, :L], stats[:, L:]
        zz = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        rec = vae_d(torch.cat([sd, zz], -1))
        kl = -0.5 * (1 + lv - mu ** 2 - lv.exp()).sum(1, keepdim=True)
        vae_loss = (w * (((rec - a) ** 2).sum(1, keepdim=True) + kl)).mean()
        vae_opt.zero_grad()
        vae_loss.backward()
        vae_opt.step()
        act = t_vae_d(torch.cat([sd, 2 * torch.tanh(actor(sd))], -1))
        actor_loss = -q1(torch.cat([sd, act], -1)).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        with torch.no_grad():
            for src, dst in ((enc, t_enc), (q1, t_q1), (q2, t_q2), (vae_d, t_vae_d), (actor, t_actor)):
                for p, tp in zip(src.state_dict().values(), dst.state_dict().values()):
                    if p.dtype.is_floating_point:
                        tp.mul_(0.995).add_(0.005 * p)

    step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, 9x{H}x{H}, ResNet18")
    print(f"lapo_iteration_ms median {times[len(times) // 2]:.1f} (min {times[0]:.1f}, {len(times)} runs)")


if __name__ == "__main__":
    main()
