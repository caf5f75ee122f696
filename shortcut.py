"""Shortcut models in one file: the method, then the networks.

"One Step Diffusion via Shortcut Models", Frans, Hafner, Levine, Abbeel, ICLR 2025
(arXiv:2410.12557). Official JAX code: https://github.com/kvfrans/shortcut-models.

Path (flow matching, eq. 1). Noise x0 ~ N(0, I) at t = 0, data x1 at t = 1:

    x_t = (1 - t) x0 + t x1,        v = x1 - x0.

Shortcut (eq. 3). One network s(x_t, t, d) is told the step size d and predicts the
normalised jump over it, so that x_{t+d} ≈ x_t + d s(x_t, t, d). As d -> 0 the shortcut is
the velocity, which flow matching trains (eq. 4):

    L_FM = || s(x_t, t, 0) - (x1 - x0) ||².

Self-consistency (eq. 5). One jump of 2d equals two jumps of d:

    s(x_t, t, 2d) <- sg[ (s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2 ],
    x'_{t+d} = x_t + d s(x_t, t, d),

for 2d in {1, 1/2, ..., 1/64} and t on the grid of multiples of 2d; sg is the stop-gradient.
The recursion is grounded: the finest target, 2d = 1/64, is built from two queries at
d = 1/128, the flow-matching level. Eq. 5 alone is satisfied by trivial maps such as s = 0;
flow matching is what ties the chain of levels to the data.

Sampling. N = 2^k Euler steps of size d = 1/N, each told its d: x <- x + d s(x, t, d).
N = 1 is a single forward pass.

Conventions: t = 0 is noise, t = 1 is data, N = 1/d; every network is called as
model(x, t, d, y=None) with t, d, y of shape (B,). The file follows that order: the queries,
the targets and the loss, the sampler; the networks (the conditioning, an MLP for 2-D data, a
compact DiT); where this code departs from the official code; the scripts' plumbing.
"""
import argparse
import contextlib
import dataclasses
import errno
import io
import math
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import fcntl
except ImportError:      # Windows: no lock, so keep one run per folder by hand
    fcntl = None

MAX_STEPS = 128          # the finest step d = 1/128, the flow-matching level
BOOTSTRAP_LEVELS = 7     # the self-consistency levels 2d = 1, 1/2, ..., 1/64 (8 levels in all, with 1/128)


################################################################################
#                          The path and the queries                            #
################################################################################

def interpolate(x0, x1, t):
    """x_t = (1 - t) x0 + t x1 (eq. 1), for t of shape (B,)."""
    t = bcast(t, x1)
    return (1 - t) * x0 + t * x1


def draw_noise(x1, pair="independent", y=None):
    """Noise x0 ~ N(0, I) for a batch of data x1. pair="ot" re-pairs it within the batch by
    the assignment that minimises the total squared distance |x1 - x0|^2 (minibatch optimal
    transport, as in iSM, "Improved Training Technique for Shortcut Models"): straighter paths,
    which fewer steps can follow. With labels y the
    assignment is made within each class, so that the noise does not carry another class's
    position into a class-conditional model."""
    x0 = torch.randn_like(x1)
    if pair == "ot":
        from scipy.optimize import linear_sum_assignment      # scipy comes with scikit-learn
        groups = [torch.arange(len(x1), device=x1.device)] if y is None else \
            [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
        paired = x0.clone()
        for g in groups:
            cost = torch.cdist(x1[g].flatten(1).float(), x0[g].flatten(1).float()).pow(2)
            _, cols = linear_sum_assignment(cost.cpu().numpy())   # row i of x1 gets noise cols[i]
            paired[g] = x0[g[torch.as_tensor(cols, device=x0.device)]]
        return paired
    if pair != "independent":
        raise ValueError(f"pair must be 'independent' or 'ot', got {pair!r}")
    return x0


def dyadic_steps(n, device, levels=BOOTSTRAP_LEVELS):
    """n self-consistency queries (t, 2d): 2d = 2^-k for k = 0 .. levels-1, spread evenly over
    the rows (from a random offset, so that a small batch still reaches every level within a
    few steps), and t on the grid of multiples of 2d, so that t + 2d <= 1."""
    k = (torch.arange(n, device=device) + torch.randint(levels, (1,), device=device)) % levels
    d2 = 0.5 ** k.float()
    return torch.floor(torch.rand(n, device=device) * 2.0 ** k) * d2, d2


def uniform_steps(n, device, levels=BOOTSTRAP_LEVELS):
    """Exercise 6: 2d ~ U[2^-(levels-1), 1] and t ~ U[0, 1 - 2d], off any grid."""
    finest = 0.5 ** (levels - 1)
    d2 = finest + (1 - finest) * torch.rand(n, device=device)
    return torch.rand(n, device=device) * (1 - d2), d2


def bcast(v, x):
    """A per-row scalar (B,) shaped to broadcast against x (B, ...)."""
    return v.view((-1,) + (1,) * (x.ndim - 1))


################################################################################
#                            The targets and the loss                          #
################################################################################

def two_jumps(net, x_t, t, d, y=None, clip=4.0):
    """The right side of eq. 5: (s(x_t, t, d) + s(x'_{t+d}, t+d, d)) / 2 with
    x'_{t+d} = x_t + d s(x_t, t, d), the target for one jump of 2d. As in the official code,
    the intermediate point and the target are clipped to +-clip (4): a half-trained
    network's jump can overshoot far from the data, and one wild target would dominate the
    mean squared error (clip=None: no clipping)."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive (or None for no clipping), got {clip}")
    c = math.inf if clip is None else clip
    s1 = net(x_t, t, d, y)
    s2 = net((x_t + bcast(d, x_t) * s1).clamp(-c, c), t + d, d, y)
    return ((s1 + s2) / 2).clamp(-c, c)


@dataclass
class Targets:
    """One batch of regression problems: the network should answer s(x_t, t, d, y) = target.
    Every objective (baselines.py) is a way to build these. Rows [:n_boot] have targets built
    by a network (bootstrap, self-consistency); the rest come from the data."""
    x_t: torch.Tensor
    t: torch.Tensor
    d: torch.Tensor
    y: torch.Tensor | None
    target: torch.Tensor
    n_boot: int = 0


def shortcut_targets(model, x1, y=None, *, teacher=None, bootstrap_frac=0.25, clip=4.0, pair="independent",
                     grounded=True, stop_grad=True, d_sampling="dyadic"):
    """The queries and targets of the shortcut objective (eqs. 4-5) for a batch of data x1.

    The first round(bootstrap_frac * B) rows get self-consistency targets, built under no_grad
    by `teacher` (an EMA copy, say) or else by `model`; the rest get flow-matching targets, so
    bootstrap_frac=0 is plain flow matching. clip: two_jumps. pair="ot" couples noise and data
    by minibatch optimal transport (draw_noise). The last three keywords are ablations for the
    exercises (docs/EXERCISES.md); their defaults are the method:
      grounded=False  no target at 2d = 1/64: the level d = 1/64 is never supervised and the
                      1/32 targets are built on it;
      stop_grad=False gradients flow through the targets as well;
      d_sampling="uniform"  2d ~ U[1/64, 1] (1/32 ungrounded), t ~ U[0, 1 - 2d]: off the grid.
    """
    check_batch(x1, y)
    if not 0.0 <= bootstrap_frac <= 1.0:
        raise ValueError(f"bootstrap_frac must be in [0, 1], got {bootstrap_frac}")
    if d_sampling not in ("dyadic", "uniform"):
        raise ValueError(f"d_sampling must be 'dyadic' or 'uniform', got {d_sampling!r}")
    B, n_sc = len(x1), round(bootstrap_frac * len(x1))

    # 1. Draw the queries: the big step 2d and its t for the self-consistency rows; t ~ U[0, 1]
    #    and d = 0, the velocity, for the flow-matching rows.
    x0 = draw_noise(x1, pair, y)
    draw = dyadic_steps if d_sampling == "dyadic" else uniform_steps
    t_sc, d2 = draw(n_sc, x1.device, BOOTSTRAP_LEVELS if grounded else BOOTSTRAP_LEVELS - 1)
    t = torch.cat([t_sc, torch.rand(B - n_sc, device=x1.device)])
    d = torch.cat([d2, torch.zeros(B - n_sc, device=x1.device)])
    x_t = interpolate(x0, x1, t)                                            # eq. 1

    # 2. Build the targets: v = x1 - x0 (eq. 4), and two jumps of d for one of 2d (eq. 5).
    target = x1 - x0
    if n_sc:
        with torch.no_grad() if stop_grad else contextlib.nullcontext():    # sg[.] of eq. 5
            y_sc = None if y is None else y[:n_sc]
            s_sc = two_jumps(model if teacher is None else teacher, x_t[:n_sc], t_sc, d2 / 2, y_sc, clip)
        target = torch.cat([s_sc.to(target.dtype), target[n_sc:]])
    return Targets(x_t, t, d, y, target, n_sc)


def errors(model, targets):
    """The squared error of s(x_t, t, d, y) against the targets, averaged over each sample's
    elements: shape (B,). A training loop that must not wait on the GPU sums these itself."""
    tg = targets
    return (model(tg.x_t, tg.t, tg.d, tg.y) - tg.target.to(tg.x_t.dtype)).float().pow(2).flatten(1).mean(1)


def regress(model, targets, loss_power=0.0):
    """(loss, info): the loss of the network against the targets (`loss_of`), with each part's
    MSE in info as a float ('sc' for the bootstrap rows, 'fm' for the rest; nan if empty)."""
    err, n = errors(model, targets), targets.n_boot
    info = {"fm": err[n:].mean().item() if n < len(err) else float("nan"),
            "sc": err[:n].mean().item() if n else float("nan")}
    return loss_of(err, targets, loss_power), info


def loss_of(err, targets, loss_power=0.0):
    """The loss from the rows' errors (B,): their mean, the MSE, for loss_power = 0.

    loss_power p > 0 makes it robust, with MeanFlow's adaptive weight: each row's error e,
    summed over its elements, is divided by sg(e + 1e-3)^p (p = 1/2 is close to the pseudo-Huber
    loss of improved consistency training). The weights are normalised within each part, so the
    bootstrap and data rows keep their batch shares: over the whole batch the bootstrap rows,
    whose errors are the smallest, would take nearly all the weight and fall to a trivial
    self-consistent map such as s = 0, with flow matching, eq. 5's ground, left untrained."""
    if not loss_power:
        return err.mean()
    n = targets.n_boot
    w = (err.detach() * targets.target[0].numel() + 1e-3) ** -loss_power
    parts = [p for p in (slice(0, n), slice(n, None)) if len(err[p])]
    return sum(w[p] @ err[p] / w[p].sum() * len(err[p]) for p in parts) / len(err)


def shortcut_loss(model, x1, y=None, loss_power=0.0, **options):
    """The shortcut objective on a batch of data x1: (loss, info), where loss is the MSE over
    every element (or its robust form, loss_of), so that the two parts weigh by their batch
    share. The options are those of shortcut_targets."""
    return regress(model, shortcut_targets(model, x1, y, **options), loss_power)


def check_batch(x1, y):
    if len(x1) == 0:
        raise ValueError("the batch x1 is empty: the loss of no samples is undefined")
    if not x1.is_floating_point():
        raise ValueError(f"the data x1 must be a floating-point tensor, got {x1.dtype}")
    if y is not None and y.shape != x1.shape[:1]:
        raise ValueError(f"y must have shape ({x1.shape[0]},), got {tuple(y.shape)}")


################################################################################
#                                   Sampling                                   #
################################################################################

@torch.no_grad()
def sample(model, x0, steps, y=None, cfg_scale=1.0, *, flow=False, off_grid=False, trajectory=False):
    """Integrate from noise x0 at t=0 to t=1; returns x1 (and the trajectory).

    steps: the number N of shortcut steps, a power of two from 1 to 128, each of size d = 1/N
    and told its d; or a list of step sizes on the training grid (step_sizes), such as
    [1/2, 1/4, 1/4]. off_grid: any N and any sizes that sum to 1, for a model trained with
    continuous d (exercise 6). flow: the flow-matching ODE, with the velocity (d = 0) at every
    step, so any N or list. y, cfg_scale: class labels and the guidance scale w of
    s_u + w (s_c - s_u); w = 1 is the conditional model alone. trajectory: also return the
    (N+1, *x0.shape) stack of points visited.
    """
    sizes = step_sizes(steps, off_grid=off_grid or flow)
    B = x0.shape[0]
    x, t, path = x0, 0.0, [x0]
    for size in sizes:
        tt = torch.full((B,), t, device=x0.device)
        dd = torch.full((B,), 0.0 if flow else size, device=x0.device)
        x = x + size * guided(model, x, tt, dd, y, cfg_scale)
        t += size
        path.append(x)
    return (x, torch.stack(path)) if trajectory else x


def step_sizes(steps, off_grid=False):
    """The step sizes that `sample` takes for `steps` (a count or a list); ValueError if they
    leave the training grid, where every d is a power of two in [1/128, 1] and every step
    starts at a multiple of its d: [1/2, 1/4, 1/4], not [1/4, 1/2, 1/4]. off_grid allows any
    count and any sizes that sum to 1."""
    if isinstance(steps, (list, tuple)):
        sizes = [float(s) for s in steps]
        if not all(map(math.isfinite, sizes)):
            raise ValueError(f"step sizes must be finite numbers, got {steps}")
        if not sizes or min(sizes) <= 0 or abs(sum(sizes) - 1.0) > 1e-9:
            raise ValueError(f"a list of step sizes must be positive and sum to 1 (on the grid: powers "
                             f"of two, such as [0.5, 0.25, 0.25]); got {steps}")
        t = 0.0
        for d in sizes if not off_grid else []:
            if 2.0 ** round(math.log2(d)) != d or d * MAX_STEPS < 1 or not (t / d).is_integer():
                raise ValueError(f"step {d} at t = {t} is off the training grid: each step must be a power "
                                 f"of two in [1/{MAX_STEPS}, 1] that starts at a multiple of itself, such as "
                                 f"[0.5, 0.25, 0.25] (off_grid=True allows any split); got {steps}")
            t += d
        return sizes
    allowed = f"a power of two from 1 to {MAX_STEPS} (1, 2, 4, ..., {MAX_STEPS})"
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be {allowed}, got {steps!r}")
    if not off_grid and (steps > MAX_STEPS or steps & (steps - 1)):
        raise ValueError(f"steps must be {allowed}, got {steps}: a shortcut model is trained for those "
                         "step sizes only (off_grid=True allows any count, for a model trained with continuous d)")
    return [1.0 / steps] * int(steps)


def guided(model, x, t, d, y, w):
    """s_u + w (s_c - s_u), classifier-free guidance; the conditional model alone when w = 1."""
    if y is None or w == 1.0:
        return model(x, t, d, y)
    null = torch.full_like(y, model.num_classes)
    s_c, s_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([d, d]),
                     torch.cat([y, null])).chunk(2)
    return s_u + w * (s_c - s_u)


################################################################################
#                         The networks: conditioning                           #
################################################################################

def step_level(d):
    """The level log2(1/d) of a step size: 0 for d = 1, 7 for d = 1/128. Any d below 1/128,
    d = 0 among them, is clamped to the finest level, 7. So the paper's d = 0, the velocity,
    and the official code's flow-matching step d = 1/128 are one query here: the network
    cannot tell them apart, and 128 shortcut steps are 128 Euler steps of the velocity."""
    return -torch.log2(d.clamp(min=1.0 / MAX_STEPS))


class SinusoidalEmbedder(nn.Module):
    """A scalar -> sin/cos features at geometric frequencies (periods up to 10^4) -> a
    projection to the width: DiT's 2-layer MLP, or with mlp=False a single linear layer,
    which is enough for the 2-D toys at a third of the cost."""

    def __init__(self, width, scale=1.0, freq_dim=256, mlp=True):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / half), persistent=False)
        self.scale = scale
        self.proj = (nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
                     if mlp else nn.Linear(freq_dim, width))

    def forward(self, s):
        args = (self.scale * s.float())[:, None] * self.freqs[None]
        return self.proj(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Conditioning(nn.Module):
    """c = t_emb(t) + d_emb(log2 1/d) + y_emb(y), with y = num_classes the null class.

    t_scale multiplies t before its embedding. d_embed="end" (exercise 14) embeds the end time
    t + d of the jump instead of its level, with t's scale: the same query in the coordinates
    of Consistency Trajectory Models, whose network is told where a jump starts and ends."""

    def __init__(self, width, num_classes=0, freq_dim=256, mlp=True, t_scale=1000.0, d_embed="level"):
        super().__init__()
        if d_embed not in ("level", "end"):
            raise ValueError(f"d_embed must be 'level' or 'end', got {d_embed!r}")
        self.num_classes, self.d_embed = num_classes, d_embed
        self.t_emb = SinusoidalEmbedder(width, scale=t_scale, freq_dim=freq_dim, mlp=mlp)
        self.d_emb = SinusoidalEmbedder(width, scale=1.0 if d_embed == "level" else t_scale, freq_dim=freq_dim,
                                        mlp=mlp)
        self.y_emb = nn.Embedding(num_classes + 1, width) if num_classes else None

    def forward(self, t, d, y=None):
        level = step_level(d)
        c = self.t_emb(t) + self.d_emb(level if self.d_embed == "level" else t + 2.0 ** -level)
        if self.y_emb is not None:
            if y is None:   # unconditional query: every row gets the null class
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            elif y.device.type == "cpu" and len(y) and not 0 <= int(y.min()) <= int(y.max()) <= self.num_classes:
                # On an accelerator this check would stall every forward on a host sync;
                # there the embedding's own device-side assert catches the bad label.
                raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is the "
                                 f"null class), got {int(y.min())} .. {int(y.max())}")
            c = c + self.y_emb(y)
        elif y is not None:
            raise ValueError("this model has no classes (num_classes=0) but got labels y")
        return c


def _check_inputs(x, t, d, y):
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, v in (("t", t), ("d", d), ("y", y)):
        if v is not None and v.shape != x.shape[:1]:
            raise ValueError(f"{name} must have shape ({x.shape[0]},) to match x of shape "
                             f"{tuple(x.shape)}, got {tuple(v.shape)}")
        if v is not None and v.is_floating_point() == (name == "y"):
            kind = "integer class labels" if name == "y" else "a floating-point tensor"
            raise ValueError(f"{name} must be {kind}, got {v.dtype}")


################################################################################
#                          MLP for vectors (2-D toys)                          #
################################################################################

class MLP(nn.Module):
    """s(x, t, d) for x of shape (B, dim): residual SiLU blocks, each reading c."""

    def __init__(self, dim=2, width=128, depth=3, num_classes=0, t_scale=1000.0, d_embed="level"):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.cond = Conditioning(width, num_classes, freq_dim=64, mlp=False, t_scale=t_scale, d_embed=d_embed)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width))
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)   # s = 0 at init, as for the DiT
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x, t, d, y=None):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP(dim={self.dim}) expects x of shape (B, {self.dim}), "
                             f"got samples of shape {tuple(x.shape[1:])}")
        _check_inputs(x, t, d, y)
        c = self.cond(t, d, y)                      # (B, width)
        h = self.inp(x)                             # (B, width)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)                          # (B, dim)


################################################################################
#                     DiT: a compact Diffusion Transformer                     #
################################################################################

@dataclass
class DiTConfig:
    img_size: int = 32
    channels: int = 3
    patch: int = 2
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    num_classes: int = 0
    t_scale: float = 1000.0        # t is multiplied by this before its embedding

    def __post_init__(self):
        for name in ("img_size", "channels", "patch", "width", "depth", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig.num_classes must be 0 (unconditional) or more, got {self.num_classes}")
        if self.img_size % self.patch or self.width % self.heads or self.width % 4:
            raise ValueError(f"bad DiT config {self}: img_size must be a multiple of patch, "
                             "width a multiple of heads and of 4")


# (width, depth, heads). S and B are DiT-S and DiT-B (Peebles & Xie, 2023).
DIT_SIZES = {"tiny": (32, 2, 2), "XS": (64, 3, 4), "S": (384, 12, 6), "B": (768, 12, 12)}


def dit_config(size, **kw):
    """A DiTConfig of a named size ('tiny', 'XS', 'S', 'B') with other fields from kw."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    width, depth, heads = DIT_SIZES[size]
    return DiTConfig(width=width, depth=depth, heads=heads, **kw)


def sincos_2d(width, grid):
    """Fixed 2-D sin-cos position embeddings, (grid*grid, width), as in MAE and DiT."""
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = [f(pos.flatten()[:, None] * omega[None]) for pos in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        B, T, C = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)              # (B, heads, T, C/heads)
        x = x + gate1 * self.proj(h.transpose(1, 2).reshape(B, T, C))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """s(x, t, d, y) for images (B, C, H, W): patchify, adaLN-Zero blocks, unpatchify."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, self.num_classes = cfg, cfg.num_classes
        p, grid = cfg.patch, cfg.img_size // cfg.patch
        self.patchify = nn.Conv2d(cfg.channels, cfg.width, kernel_size=p, stride=p)
        self.register_buffer("pos", sincos_2d(cfg.width, grid)[None], persistent=False)
        self.cond = Conditioning(cfg.width, cfg.num_classes, t_scale=cfg.t_scale)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.final = nn.Linear(cfg.width, p * p * cfg.channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for layer in [*self.cond.t_emb.proj.modules(), *self.cond.d_emb.proj.modules()]:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.cond.y_emb is not None:
            nn.init.normal_(self.cond.y_emb.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so s = 0.
        for layer in [b.adaLN[1] for b in self.blocks] + [self.final_adaLN[1], self.final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, d, y=None):
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1:] != (cfg.channels, cfg.img_size, cfg.img_size):
            raise ValueError(f"DiT expects x of shape (B, {cfg.channels}, {cfg.img_size}, "
                             f"{cfg.img_size}), got samples of shape {tuple(x.shape[1:])}")
        _check_inputs(x, t, d, y)
        B, C, H, W = x.shape
        p = cfg.patch
        c = self.cond(t, d, y)                                    # (B, width)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, width)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c)[:, None].chunk(2, dim=-1)
        h = self.final(modulate(self.final_norm(h), shift, scale))  # (B, T, p*p*C)
        h = h.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, H, W)


################################################################################
#         Where this file follows the official code, and where it departs       #
################################################################################
#
# Follows:
# * d enters as its level log2(1/d), by a sinusoidal embedder of its own, c = t_emb + d_emb
#   + label_emb; flow matching is the finest level (step_level).
# * The bootstrap targets and the intermediate point are clipped to +-4 (two_jumps).
# * The loss is the MSE over all elements, so the two parts weigh by their batch share.
# * The DiT: fixed 2-D sin-cos positions, affine-free LayerNorm, tanh-GELU, a zero final
#   layer, and a null class (index num_classes) for classifier-free guidance.
# Departs:
# * Flow-matching times are t ~ U[0, 1] (the paper), not the official grid {0..127}/128, on
#   the plain path (1 - t) x0 + t x1 rather than the official (1 - (1 - 1e-5) t) x0 + t x1.
# * t is scaled by t_scale = 1000 before its embedding, as in DiT and ADM; the official code
#   feeds t in [0, 1] unscaled.
# * The bootstrap levels are spread evenly over the bootstrap rows from a random offset; the
#   official code's fixed split sends the whole bootstrap part of a small batch to level 0.
# * The block adaLN layers are zero-initialised (adaLN-Zero, as in DiT), so that a fresh
#   model outputs exactly 0; the official code zero-initialises only the final layer.
# * Attention scales q.k by 1/sqrt(d_head) (F.scaled_dot_product_attention); the official
#   code scales by 1/d_head.
# * bootstrap_frac defaults to 1/4 (the paper) rather than the official 1/8, and the targets
#   come from the model itself unless a teacher (an EMA copy) is passed; the official default
#   is the EMA, which lags badly in short runs (docs/EXERCISES.md, exercise 8).
# * Classifier-free guidance inside the bootstrap targets (official, ImageNet only) is not
#   done; guidance is applied at sampling time only.


################################################################################
#                 Plumbing that the two training scripts share                 #
################################################################################

class UserError(Exception):
    """A problem with the user's input: one line on stderr, exit code 2, nothing overwritten."""


class TrainingDiverged(Exception):
    """The loss or the weights became non-finite: exit code 1; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, after what was trained has been saved: exit code 128 + the signal's number."""

    def __init__(self, message, signal_name="SIGINT"):
        super().__init__(message)
        self.code = 128 + signal.Signals[signal_name].value


def cli(main, argv=None):
    """Runs a script's main(argv): its errors become one line on stderr and an exit code."""
    try:
        main(argv)
    except (UserError, TrainingDiverged, Interrupted) as e:
        print(f"error: {e}" if not isinstance(e, Interrupted) else e, file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1 if isinstance(e, TrainingDiverged) else e.code)
    except (MemoryError, RuntimeError) as e:       # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:100]}); lower --batch-size (or, in train_images.py, "
              "--eval-batch-size)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                           # a full disk, an --out that is a file
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (UserError), like every other bad input."""

    def error(self, message):
        raise UserError(message)


def setting(default, help, **flag):
    """A field of a run record (a frozen dataclass), with the help and argparse options of its
    flag --NAME (or flag=...): the record is the one place where a setting is defined."""
    return dataclasses.field(default=default, metadata=dict(help=help, **flag))


def add_settings(parser, record, default=None):
    """A flag for each field of `record` made by `setting`; with default=argparse.SUPPRESS, a
    flag that is not given leaves no attribute, so that the caller can tell it was not given."""
    for f in dataclasses.fields(record):
        if "help" in f.metadata:
            options = dict(f.metadata)
            name = options.pop("flag", "--" + f.name.replace("_", "-"))
            if f.type is bool and "action" not in options:
                options["action"] = "store_true"
            parser.add_argument(name, dest=f.name, default=f.default if default is None else default, **options)


def checked(kind, ok, need):
    """An argparse type: kind(text), which must satisfy ok, or argparse's error 'must be NEED'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value
    return parse


as_count = checked(int, lambda v: v >= 1, "at least 1")
as_share = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
as_positive = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number above 0")
as_seed = checked(int, lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)")
as_power = checked(float, lambda v: 0 <= v <= 2, "in [0, 2]")


@contextlib.contextmanager
def claim(folder):
    """Holds `folder` for one run. The file folder/run.lock carries the pid of the run that
    holds it, under an flock that the kernel drops when that process dies: a lock left by a
    dead run is taken over, and one held by a live run is refused (UserError)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.lock")
    if fcntl is None:
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{folder!r} is in use by another run (pid {f.read().strip() or '?'}); wait for it "
                            "to finish or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            os.remove(path)


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C (SIGINT) and SIGTERM (what timeout, Slurm and docker send) append the signal's
    name to the yielded list instead of stopping the process, so that a training loop can
    finish its step, save and stop."""
    requests = []
    previous = {sig: signal.signal(sig, lambda n, _: requests.append(signal.Signals(n).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_atomic(path, write):
    """write(f) fills an in-memory binary file f (np.savez, torch.save, fig.savefig, ...); its
    bytes then reach `path` through a temporary file of this process's own beside it and a
    rename, so a failed or interrupted write (a full disk, Ctrl-C, kill -9) leaves the old file
    whole, and two writers never share a temporary file."""
    buf = io.BytesIO()
    write(buf)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left in {os.path.dirname(os.path.abspath(path))}") from None
        raise


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is checked and returned."""
    usable = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name != "auto" and not usable.get(name):
        raise ValueError(f"device {name!r} was asked for but this torch cannot use it here" if name in usable
                         else f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name if name != "auto" else next(kind for kind, ok in usable.items() if ok))


@torch.no_grad()
def ema_update(ema, model, decay=0.999):
    """ema <- decay * ema + (1 - decay) * model, as one foreach op over all parameters."""
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)
