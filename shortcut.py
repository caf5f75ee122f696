"""Shortcut models in one file: the method, then the networks.

"One Step Diffusion via Shortcut Models", Frans, Hafner, Levine, Abbeel, ICLR 2025
(arXiv:2410.12557). Official JAX code: https://github.com/kvfrans/shortcut-models.

Path (flow matching, eq. 1). Noise x0 ~ N(0, I) at t = 0, data x1 at t = 1:

    x_t = (1 - t) x0 + t x1,        v = x1 - x0.

Shortcut (eq. 3). One network s(x_t, t, d) is told the step size d and predicts the normalised jump over it, so that
x_{t+d} ≈ x_t + d s(x_t, t, d). As d -> 0 the shortcut is the velocity, which flow matching trains (eq. 4):

    L_FM = || s(x_t, t, 0) - (x1 - x0) ||².

Self-consistency (eq. 5). One jump of 2d equals two jumps of d:

    s(x_t, t, 2d) <- sg[ (s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2 ],
    x'_{t+d} = x_t + d s(x_t, t, d),

for 2d in {1, 1/2, ..., 1/64} and t on the grid of multiples of 2d; sg is the stop-gradient. The recursion is grounded:
the finest target, 2d = 1/64, is built from two queries at d = 1/128, the flow-matching level. Eq. 5 alone is satisfied
by trivial maps such as s = 0; flow matching is what ties the chain of levels to the data.

Sampling. N = 2^k Euler steps of size d = 1/N, each told its d: x <- x + d s(x, t, d).

Conventions: t = 0 is noise, t = 1 is data, N = 1/d; every network is called as model(x, t, d, y=None)
with t, d, y of shape (B,). The file ends with where it departs from the official code.
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

MAX_STEPS = 128          # the finest step d = 1/128, the flow-matching level
BOOTSTRAP_LEVELS = 7     # the self-consistency levels 2d = 1, 1/2, ..., 1/64 (8 levels in all, with 1/128)
D_EMBEDS = ("level", "end", "gap")    # how d is told to a network (Conditioning)


########################### The path and the queries ###########################

def require(ok, message):
    """The library trusts its caller except where a mistake would give a silent wrong answer: ValueError then."""
    if not ok:
        raise ValueError(message)


def bcast(v, x):
    """A per-row scalar (B,) shaped to broadcast against x (B, ...)."""
    return v.view((-1,) + (1,) * (x.ndim - 1))


def interpolate(x0, x1, t):
    """x_t = (1 - t) x0 + t x1 (eq. 1), for t of shape (B,)."""
    return (1 - bcast(t, x1)) * x0 + bcast(t, x1) * x1


def draw_noise(x1, pair="independent", y=None):
    """Noise x0 ~ N(0, I) for data x1. pair="ot" re-pairs it by the assignment of least total
    |x1 - x0|^2 (minibatch optimal transport, as in iSM): straighter paths, which fewer steps can
    follow; with labels y, within each class, so no noise carries another class's position."""
    require(pair in ("independent", "ot"), f"pair must be 'independent' or 'ot', got {pair!r}")
    x0 = torch.randn_like(x1)
    if pair == "independent":
        return x0
    from scipy.optimize import linear_sum_assignment      # scipy comes with scikit-learn
    groups = [torch.arange(len(x1), device=x1.device)] if y is None else \
        [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    paired = x0.clone()
    for g in groups:
        cost = torch.cdist(x1[g].flatten(1).float(), x0[g].flatten(1).float()).pow(2)
        _, cols = linear_sum_assignment(cost.cpu().numpy())   # row i of x1 gets noise cols[i]
        paired[g] = x0[g[torch.as_tensor(cols, device=x0.device)]]
    return paired


def dyadic_steps(n, device, levels=BOOTSTRAP_LEVELS):
    """n self-consistency queries (t, 2d): 2d = 2^-k, k = 0 .. levels-1, spread evenly over the rows from a
    random offset (so a small batch reaches every level in a few steps), t on the multiples of 2d (t + 2d <= 1)."""
    k = (torch.arange(n, device=device) + torch.randint(levels, (1,), device=device)) % levels
    d2 = 0.5 ** k.float()
    return torch.floor(torch.rand(n, device=device) * 2.0 ** k) * d2, d2


def uniform_steps(n, device, levels=BOOTSTRAP_LEVELS):
    """Exercise 6: 2d ~ U[2^-(levels-1), 1] and t ~ U[0, 1 - 2d], off any grid."""
    d2 = 0.5 ** (levels - 1) + (1 - 0.5 ** (levels - 1)) * torch.rand(n, device=device)
    return torch.rand(n, device=device) * (1 - d2), d2


########################### The targets and the loss ###########################

def two_jumps(net, x_t, t, d, y=None, clip=4.0):
    """The right side of eq. 5, the target for one jump of 2d: (s(x_t, t, d) + s(x'_{t+d}, t+d, d)) / 2.
    As in the official code, x' and the target are clipped to +-clip (None: not at all): a half-trained
    network's jump can overshoot far, and one wild target would dominate the MSE."""
    require(clip is None or clip > 0, f"clip must be positive (or None for no clipping), got {clip}")
    c = math.inf if clip is None else clip
    s1 = net(x_t, t, d, y)
    s2 = net((x_t + bcast(d, x_t) * s1).clamp(-c, c), t + d, d, y)
    return ((s1 + s2) / 2).clamp(-c, c)


@dataclass
class Targets:
    """One batch of regression problems, s(x_t, t, d, y) = target, as every objective (baselines.py)
    builds them: rows [:n_boot] have targets built by a network (bootstrap), the rest from data."""
    x_t: torch.Tensor
    t: torch.Tensor
    d: torch.Tensor
    y: torch.Tensor | None
    target: torch.Tensor
    n_boot: int = 0


def shortcut_targets(model, x1, y=None, *, teacher=None, bootstrap_frac=0.25, clip=4.0, pair="independent",
                     grounded=True, stop_grad=True, d_sampling="dyadic"):
    """The queries and targets of the shortcut objective (eqs. 4-5) for a batch of data x1. The first
    round(bootstrap_frac * B) rows get self-consistency targets, built under no_grad by `teacher` (an EMA copy, say)
    or else by `model`; the rest get flow-matching targets. clip: two_jumps; pair: draw_noise. The last three keywords
    are the exercises' ablations: grounded=False drops the 2d = 1/64 targets (so d = 1/64 is never supervised),
    stop_grad=False lets gradients through the targets, d_sampling="uniform" draws 2d ~ U[1/64, 1] off the grid."""
    require(0 <= bootstrap_frac <= 1, f"bootstrap_frac must be in [0, 1], got {bootstrap_frac}")
    B, n_sc = len(x1), round(bootstrap_frac * len(x1))
    # 1. The queries: 2d and t on its grid for the self-consistency rows; t ~ U[0, 1], d = 0 for the rest.
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


def regress(model, targets, loss_power=0.0, per_part=True, boot_power=0.0):
    """(loss, parts): the loss of s(x_t, t, d, y) against the targets, and the detached MSE of the bootstrap rows ("sc")
    and of the rest ("fm"), nan if none. loss_power = 0: the MSE over every element, so the parts weigh by their batch
    share (official). p > 0: MeanFlow's adaptive weight, each row's summed squared error e over sg(e + 1e-3)^p, then the
    plain mean (per_part=False, MeanFlow's authors) or, per_part=True, the weights renormalised within each part: over
    the whole batch the bootstrap rows, with the smallest errors, would take all the weight and fall to s = 0.
    boot_power q > 0 weighs each bootstrap row by sg(e + 1e-3)^q too, for more signal on the worst-fit jumps: eq. 5's
    target is a function of (x_t, t, d, y), so no weight moves a minimiser s can reach (on x1 - x0 one would)."""
    require(0 <= loss_power < math.inf, f"loss_power must be 0 (the MSE) or more, got {loss_power}")
    require(0 <= boot_power < math.inf, f"boot_power must be 0 (the MSE) or more, got {boot_power}")
    tg, n = targets, targets.n_boot
    err = (model(tg.x_t, tg.t, tg.d, tg.y) - tg.target.to(tg.x_t.dtype)).float().pow(2).flatten(1).mean(1)  # (B,)
    parts = {"sc": err[:n].detach().mean(), "fm": err[n:].detach().mean()}
    if not (loss_power or boot_power):
        return err.mean(), parts
    e = err * tg.target[0].numel()
    w = (e.detach() + 1e-3) ** -loss_power
    w[:n] *= (e[:n].detach() + 1e-3) ** boot_power
    if not per_part:
        return (w * e).mean(), parts
    rows = [r for r in (slice(0, n), slice(n, None)) if len(err[r])]
    return sum(w[r] @ err[r] / w[r].sum() * len(err[r]) for r in rows) / len(err), parts


@torch.no_grad()
def ema_update(ema, model, decay=0.999):
    """ema <- decay * ema + (1 - decay) * model, as one foreach op over all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


################################### Sampling ###################################

def guided(model, x, t, d, y, w):
    """s_u + w (s_c - s_u), classifier-free guidance; the conditional model alone when w = 1."""
    if y is None or w == 1.0:
        return model(x, t, d, y)
    null = torch.full_like(y, model.num_classes)
    s_c, s_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([d, d]), torch.cat([y, null])).chunk(2)
    return s_u + w * (s_c - s_u)


def jump(model, x, t, d, y=None, w=1.0):
    """The shortcut step: x + d s(x, t, d)."""
    return x + bcast(d, x) * guided(model, x, t, d, y, w)


def velocity(model, x, t, d, y=None, w=1.0):
    """The Euler step of the flow-matching ODE: x + d s(x, t, 0), the velocity at every step."""
    return x + bcast(d, x) * guided(model, x, t, torch.zeros_like(d), y, w)


@torch.no_grad()
def sample(model, x0, steps, y=None, cfg_scale=1.0, *, rule=jump, off_grid=False, trajectory=False):
    """x1 from noise x0 by x <- rule(model, x, t, d, y, cfg_scale) from t = 0 to 1, and with trajectory=True
    the (N+1, *x0.shape) stack of the points visited. steps: N = 2^k steps of d = 1/N, or sizes such as
    [1/2, 1/4, 1/4] (step_sizes); off_grid allows any split, for a velocity or a model trained with
    continuous d (exercise 6). rule: `jump` (default), `velocity` or one of baselines.py's. cfg_scale: guided()'s w."""
    require(math.isfinite(cfg_scale), f"cfg_scale must be a finite number, got {cfg_scale}")
    x, t, path, rows = x0, 0.0, [x0], (len(x0),)
    for d in step_sizes(steps, off_grid):
        x = rule(model, x, torch.full(rows, t, device=x0.device), torch.full(rows, d, device=x0.device), y, cfg_scale)
        t += d
        path.append(x)
    return (x, torch.stack(path)) if trajectory else x


def step_sizes(steps, off_grid=False):
    """The step sizes of `steps`, a count N (N steps of 1/N) or a list. On the training grid every d
    is a power of two in [1/128, 1] and starts at a multiple of itself: [1/2, 1/4, 1/4], not
    [1/4, 1/2, 1/4]; off_grid allows any positive sizes that sum to 1. ValueError otherwise."""
    count = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
    sizes = [1.0 / steps] * int(steps) if count and steps >= 1 else \
        [float(s) for s in steps] if isinstance(steps, (list, tuple)) else []
    starts = np.cumsum([0.0] + sizes)[:-1]
    on_grid = all(2.0 ** round(math.log2(d)) == d >= 1 / MAX_STEPS and (t / d).is_integer()
                  for d, t in zip(sizes, starts) if d > 0)
    require(sizes and all(d > 0 for d in sizes) and abs(sum(sizes) - 1) < 1e-9 and (off_grid or on_grid),
            f"steps={steps!r} is off the training grid: a count must be a power of two from 1 to {MAX_STEPS}, and a "
            f"list's sizes positive, summing to 1, each a power of two from 1/{MAX_STEPS} that starts at a multiple "
            "of itself, such as [0.5, 0.25, 0.25] (off_grid=True allows any positive split)")
    return sizes


########################## The networks: conditioning ##########################

def step_level(d):
    """The level log2(1/d): 0 for d = 1, 7 for d = 1/128 and any d below, so the paper's d = 0 (the velocity)
    and the official flow-matching step 1/128 are one query: 128 shortcut steps are 128 velocity Euler steps."""
    return -torch.log2(d.clamp(min=1.0 / MAX_STEPS))


class SinusoidalEmbedder(nn.Module):
    """A scalar -> sin/cos features at periods up to 10^4 -> DiT's 2-layer MLP (mlp=False: one linear layer)."""

    def __init__(self, width, scale=1.0, freq_dim=256, mlp=True):
        super().__init__()
        self.scale, half = scale, freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / half), persistent=False)
        self.proj = (nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
                     if mlp else nn.Linear(freq_dim, width))

    def forward(self, s):
        args = (self.scale * s.float())[:, None] * self.freqs[None]
        return self.proj(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Conditioning(nn.Module):
    """c = t_emb(t) + d_emb(log2 1/d) + y_emb(y), y = num_classes the null class; t_scale multiplies t.
    d_embed="end" (exercise 14) embeds the jump's end time t + d at t's scale, as Consistency Trajectory Models do;
    "gap" embeds d at t's scale, as MeanFlow's authors embed t - r: continuous, so its target's d-derivative exists."""

    def __init__(self, width, num_classes=0, freq_dim=256, mlp=True, t_scale=1000.0, d_embed="level"):
        super().__init__()
        require(d_embed in D_EMBEDS, f"d_embed must be 'level', 'end' or 'gap', got {d_embed!r}")
        self.num_classes, self.d_embed = num_classes, d_embed
        self.t_emb = SinusoidalEmbedder(width, t_scale, freq_dim, mlp)
        self.d_emb = SinusoidalEmbedder(width, 1.0 if d_embed == "level" else t_scale, freq_dim, mlp)
        self.y_emb = nn.Embedding(num_classes + 1, width) if num_classes else None

    def forward(self, t, d, y=None):
        s = d if self.d_embed == "gap" else step_level(d)
        c = self.t_emb(t) + self.d_emb(t + 2.0 ** -s if self.d_embed == "end" else s)
        require(self.y_emb is not None or y is None, "this model has no classes (num_classes=0) but got labels y")
        return c if self.y_emb is None else c + self.y_emb(
            torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y)


########################## MLP for vectors (2-D toys) ##########################

class MLP(nn.Module):
    """s(x, t, d) for x of shape (B, dim): residual SiLU blocks, each reading c."""

    def __init__(self, dim=2, width=128, depth=3, num_classes=0, t_scale=1000.0, d_embed="level"):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.cond = Conditioning(width, num_classes, freq_dim=64, mlp=False, t_scale=t_scale, d_embed=d_embed)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)   # s = 0 at init, as for the DiT
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x, t, d, y=None):
        c, h = self.cond(t, d, y), self.inp(x)      # (B, width) each
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)                          # (B, dim)


##################### DiT: a compact Diffusion Transformer #####################

@dataclass
class DiTConfig:
    img_size: int = 32
    channels: int = 3
    patch: int = 2                 # img_size must be a multiple of it
    width: int = 384               # a multiple of heads and of 4
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    num_classes: int = 0           # 0: unconditional
    t_scale: float = 1000.0        # t is multiplied by this before its embedding
    d_embed: str = "level"         # how d is told (Conditioning)


# (width, depth, heads). S and B are DiT-S and DiT-B (Peebles & Xie, 2023).
DIT_SIZES = {"tiny": (32, 2, 2), "XS": (64, 3, 4), "S": (384, 12, 6), "B": (768, 12, 12)}


def dit_config(size, **kw):
    width, depth, heads = DIT_SIZES[size]
    return DiTConfig(width=width, depth=depth, heads=heads, **kw)


def sincos_2d(width, grid):
    """Fixed 2-D sin-cos position embeddings, (grid*grid, width), as in MAE and DiT."""
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    axis = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    parts = [f(pos.flatten()[:, None] * omega[None]) for pos in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


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
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C/heads)
        x = x + gate1 * self.proj(h.transpose(1, 2).reshape(B, T, C))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """s(x, t, d, y) for images (B, C, H, W): patchify, adaLN-Zero blocks, unpatchify."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, self.num_classes = cfg, cfg.num_classes
        p, grid = cfg.patch, cfg.img_size // cfg.patch
        self.patchify = nn.Conv2d(cfg.channels, cfg.width, kernel_size=p, stride=p)
        self.register_buffer("pos", sincos_2d(cfg.width, grid)[None], persistent=False)
        self.cond = Conditioning(cfg.width, cfg.num_classes, t_scale=cfg.t_scale, d_embed=cfg.d_embed)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.final = nn.Linear(cfg.width, p * p * cfg.channels)
        for m in self.modules():                                    # DiT's initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.cfg.width, -1))
        nn.init.zeros_(self.patchify.bias)
        for layer in [*self.cond.t_emb.proj[::2], *self.cond.d_emb.proj[::2]]:     # the embedders' two Linears
            nn.init.normal_(layer.weight, std=0.02)
        if self.cond.y_emb is not None:
            nn.init.normal_(self.cond.y_emb.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so s = 0.
        for layer in [b.adaLN[1] for b in self.blocks] + [self.final_adaLN[1], self.final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, d, y=None):
        (B, C, H, W), p = x.shape, self.cfg.patch
        c = self.cond(t, d, y)                                      # (B, width)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, width)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c)[:, None].chunk(2, dim=-1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)    # (B, T, p*p*C)
        return h.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


####### Where this file follows the official code, and where it departs ########
# Follows:
# * d enters as its level log2(1/d) (step_level), by a sinusoidal embedder of its own: c = t_emb + d_emb + y_emb.
# * The bootstrap targets and the intermediate point are clipped to +-4 (two_jumps).
# * The loss is the MSE over all elements, so the two parts weigh by their batch share.
# * DiT: fixed 2-D sin-cos positions, affine-free LayerNorm, tanh-GELU, zero final layer, CFG's null class num_classes.
# * AdamW with weight decay 0.1 and an EMA of decay 0.999 (train_images.py).
# Departs, each for the reason given:
# * Flow-matching times are t ~ U[0, 1] (the paper), not the official grid {0..127}/128, on the plain
#   path (1 - t) x0 + t x1 rather than the official (1 - (1 - 1e-5) t) x0 + t x1.
# * t is embedded as 1000 t (t_scale), as in DiT and ADM (official: t in [0, 1]): measured better (docs/RESULTS.md).
# * The bootstrap levels are spread evenly over the bootstrap rows from a random offset; the official
#   code's fixed split sends the whole bootstrap part of a small batch to level 0.
# * The block adaLN layers are zero-initialised too (adaLN-Zero, as in DiT): a fresh model gives 0.
# * Attention scales q.k by 1/sqrt(d_head) (scaled_dot_product_attention); the official code by 1/d_head.
# * bootstrap_frac defaults to 1/4 (the paper; official: 1/8), and the model builds its own targets unless
#   a teacher (an EMA copy) is passed: the official default, the EMA, lags badly in short runs (exercise 8).
# * No classifier-free guidance inside the bootstrap targets (official: on ImageNet) nor in live
#   reflow's pairs (baselines.py; official: with it): the runs here sample at cfg_scale 1 unless told.
# * Label dropout reaches the bootstrap rows too; the official code keeps their labels.
# * train_images.py clips the gradient norm at 1.0, warms the lr up over 5,000 steps (200 on digits) and the
#   EMA as min(decay, (1 + step) / (10 + step)) (official: none, none, constant), to keep a fresh DiT-B stable
#   and a short run's EMA worth sampling; --grad-clip inf --warmup 0 turn the first two off.
# * Progressive distillation's next-stage teacher is the student, not its EMA (official): a short
#   run's stage (430 steps on digits) is shorter than the EMA's horizon of 1,000 steps.
