"""Shortcut models in one file: the networks, the loss and the sampler.

"One Step Diffusion via Shortcut Models", Frans, Hafner, Levine, Abbeel, ICLR 2025
(arXiv:2410.12557). Official JAX code: https://github.com/kvfrans/shortcut-models.

The method
----------
Path (flow matching, eq. 1). Noise x0 ~ N(0, I) at t=0, data x1 at t=1:

    x_t = (1 - t) x0 + t x1,        v = x1 - x0.

Shortcut (eq. 3). One network s(x_t, t, d) is told the step size d and predicts the
normalised jump over it, so that

    x_{t+d} ≈ x_t + d s(x_t, t, d).

At d -> 0 the shortcut is the velocity, and it is trained by flow matching (eq. 4):

    L_FM = || s(x_t, t, 0) - (x1 - x0) ||².

Self-consistency (eq. 5). One jump of 2d equals two jumps of d:

    s(x_t, t, 2d) <- sg[ (s(x_t, t, d) + s(x'_{t+d}, t+d, d)) / 2 ],
    x'_{t+d} = x_t + d s(x_t, t, d),

for 2d in {1, 1/2, ..., 1/64} and t on the grid of multiples of 2d, where sg is the
stop-gradient. The recursion is grounded: the finest target (2d = 1/64) is built from
two queries at d = 1/128, the flow-matching level. Eq. 5 alone is satisfied by trivial
maps such as s = 0; flow matching is what ties the chain of levels to the data.

Sampling. N = 2^k Euler steps of size d = 1/N, each told its d: x <- x + d s(x, t, d).
N = 1 is a single forward pass.

Conventions: t = 0 is noise and t = 1 is data; d is a step size in [0, 1]; N = 1/d.

Where this file follows the official code and where it departs
--------------------------------------------------------------
Follows:
* d is embedded as its level log2(1/d) (0 for d = 1, 7 for d = 1/128) by a sinusoidal
  embedder of its own, and c = t_emb + d_emb + label_emb.
* The flow-matching level is d = 1/128. The public argument d = 0 ("the velocity")
  maps to that level: the network cannot tell d = 0 from d = 1/128, so the paper's
  d = 0 and the official 1/128 are the same query here, and 128 shortcut steps are
  128 flow-matching Euler steps.
* The bootstrap levels are spread evenly over the bootstrap part of the batch (with a
  random offset, so that a small batch still reaches every level over a few steps;
  the official code's fixed split sends a small batch to level 0 only).
* Bootstrap targets and the intermediate point x'_{t+d} are clipped to +-4.
* The loss is the MSE over all elements, so the two parts weigh by their batch share.
* The DiT: fixed 2-D sin-cos positions, affine-free LayerNorm, tanh-GELU, a zero
  final layer, and a null class (index num_classes) for classifier-free guidance.
Departs:
* Flow-matching times are t ~ U[0, 1] (the paper), not the official grid {0..127}/128.
* t is scaled by 1000 before its sinusoidal embedding, as in DiT and ADM; the official
  code feeds t in [0, 1] unscaled, which leaves most frequencies nearly constant.
* The block adaLN layers are zero-initialised (adaLN-Zero, as in DiT), so a fresh
  model outputs exactly 0; the official code zero-initialises only the final layer.
* bootstrap_frac defaults to 1/4 (the paper) rather than the official 1/8.
* Classifier-free guidance inside bootstrap targets (official, ImageNet only) is not
  done; guidance is applied at sampling time only.
"""
import contextlib
import errno
import io
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_STEPS = 128                      # the finest step is d = 1/128, level 7
LEVELS = int(math.log2(MAX_STEPS))   # bootstrap steps 2d = 2^-k for k = 0 .. LEVELS-1


################################################################################
#                                 Conditioning                                 #
################################################################################

def step_level(d):
    """The level log2(1/d) of a step size; d = 0 (the velocity) is the finest level."""
    return -torch.log2(d.clamp(min=1.0 / MAX_STEPS))


class SinusoidalEmbedder(nn.Module):
    """A scalar -> sin/cos features at geometric frequencies -> a 2-layer MLP (DiT's), or
    a single linear layer (mlp=False), which is enough for the 2-D toys at a third of the cost."""

    def __init__(self, width, scale=1.0, freq_dim=256, max_period=10_000, mlp=True):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half),
                             persistent=False)
        self.scale = scale
        self.mlp = (nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
                    if mlp else nn.Linear(freq_dim, width))

    def forward(self, s):
        args = (self.scale * s.float())[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Conditioning(nn.Module):
    """c = t_emb(t) + d_emb(log2 1/d) + y_emb(y), with y = num_classes the null class."""

    def __init__(self, width, num_classes=0, freq_dim=256, mlp=True):
        super().__init__()
        self.num_classes = num_classes
        self.t_emb = SinusoidalEmbedder(width, scale=1000.0, freq_dim=freq_dim, mlp=mlp)
        self.d_emb = SinusoidalEmbedder(width, freq_dim=freq_dim, mlp=mlp)
        self.y_emb = nn.Embedding(num_classes + 1, width) if num_classes else None

    def forward(self, t, d, y=None):
        c = self.t_emb(t) + self.d_emb(step_level(d))
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
    B = x.shape[0]
    for name, v in (("t", t), ("d", d), ("y", y)):
        if v is not None and v.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},) to match x of shape "
                             f"{tuple(x.shape)}, got {tuple(v.shape)}")


################################################################################
#                          MLP for vectors (2-D toys)                          #
################################################################################

class MLP(nn.Module):
    """s(x, t, d) for x of shape (B, dim): residual SiLU blocks, each reading c."""

    def __init__(self, dim=2, width=128, depth=3, num_classes=0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.cond = Conditioning(width, num_classes, freq_dim=64, mlp=False)
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
        self.cond = Conditioning(cfg.width, cfg.num_classes)
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
        for emb in (self.cond.t_emb, self.cond.d_emb):
            for layer in emb.mlp[0], emb.mlp[2]:
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
#                                    Losses                                    #
################################################################################

def shortcut_loss(model, x1, y=None, *, teacher=None, bootstrap_frac=0.25, clip=4.0, **ablations):
    """The shortcut objective (eqs. 4-5) on a batch of data x1; returns (loss, info).

    The first round(bootstrap_frac * B) rows get self-consistency targets and the rest
    flow-matching targets; bootstrap_frac=0 is plain flow matching. The targets come
    from `teacher` (an EMA copy, say) or else from `model`, under no_grad. `loss` is the
    MSE over every element of the batch; info holds each part's MSE as a float ('fm' and
    'sc', nan for an empty part). clip bounds the bootstrap targets and the intermediate
    point (None: no clipping). The ablations, for the exercises, are those of shortcut_errors.
    """
    err, n_sc = shortcut_errors(model, x1, y, teacher=teacher, bootstrap_frac=bootstrap_frac, clip=clip,
                                **ablations)
    info = {"fm": err[n_sc:].mean().item() if n_sc < len(err) else float("nan"),
            "sc": err[:n_sc].mean().item() if n_sc else float("nan")}
    return err.mean(), info


def shortcut_errors(model, x1, y=None, *, teacher=None, bootstrap_frac=0.25, clip=4.0, rows=None,
                    grounded=True, stop_grad=True, d_sampling="dyadic"):
    """The per-sample squared errors of shortcut_loss, and n_sc: rows [:n_sc] are the
    self-consistency part. A training loop that must not wait on the GPU uses this directly.

    rows (a slice) is for data parallelism: every process draws the randomness of the whole
    batch x1 alike and computes only its rows, so P processes reproduce one exactly.
    Ablations for the exercises (docs/EXERCISES.md); the defaults are the method:
      grounded=False  no target at 2d = 1/64, so the level d = 1/64 is never supervised and
                      the 1/32 targets are built on it;
      stop_grad=False gradients flow through the targets as well;
      d_sampling="uniform"  2d ~ U[1/64, 1] and t ~ U[0, 1 - 2d] instead of the dyadic grid.
    """
    if not 0.0 <= bootstrap_frac <= 1.0:
        raise ValueError(f"bootstrap_frac must be in [0, 1], got {bootstrap_frac}")
    if d_sampling not in ("dyadic", "uniform"):
        raise ValueError(f"d_sampling must be 'dyadic' or 'uniform', got {d_sampling!r}")
    if y is not None and y.shape != x1.shape[:1]:
        raise ValueError(f"y must have shape ({x1.shape[0]},), got {tuple(y.shape)}")
    if len(x1) == 0:
        raise ValueError("the batch x1 is empty: the loss of no samples is undefined")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive (or None for no clipping), got {clip}")
    teacher = model if teacher is None else teacher
    B, dev = x1.shape[0], x1.device
    n_sc = round(bootstrap_frac * B)
    x0 = torch.randn_like(x1)
    bshape = (B,) + (1,) * (x1.ndim - 1)

    # Self-consistency rows: the big step 2d = 2^-k, levels spread evenly over the rows;
    # t on the grid of multiples of 2d so that t + 2d <= 1. Flow-matching rows: d = 0.
    levels = LEVELS if grounded else LEVELS - 1
    k = (torch.arange(n_sc, device=dev) + torch.randint(levels, (1,), device=dev)) % levels
    d2 = 0.5 ** k.float()
    t_sc = torch.floor(torch.rand(n_sc, device=dev) * 2.0 ** k) * d2
    if d_sampling == "uniform":
        d2 = 2 / MAX_STEPS + (1 - 2 / MAX_STEPS) * torch.rand(n_sc, device=dev)
        t_sc = torch.rand(n_sc, device=dev) * (1 - d2)
    t = torch.cat([t_sc, torch.rand(B - n_sc, device=dev)])
    d_query = torch.cat([d2, torch.zeros(B - n_sc, device=dev)])
    if rows is not None:      # the SC rows stay first: a slice keeps the order
        n_sc, B = len(range(n_sc)[rows]), len(range(B)[rows])
        x0, x1, t, d_query = x0[rows], x1[rows], t[rows], d_query[rows]
        y, bshape = None if y is None else y[rows], (B,) + bshape[1:]
    tb = t.view(bshape)
    x_t = (1 - tb) * x0 + tb * x1                                  # eq. 1

    target = x1 - x0                                               # v, eq. 4
    if n_sc:
        x_sc, t_sc, d = x_t[:n_sc], t[:n_sc], d_query[:n_sc] / 2
        y_sc, db = None if y is None else y[:n_sc], d.view((-1,) + bshape[1:])
        with torch.no_grad() if stop_grad else contextlib.nullcontext():      # sg[.] of eq. 5
            s1 = teacher(x_sc, t_sc, d, y_sc)
            x_mid = _clip(x_sc + db * s1, clip)
            s2 = teacher(x_mid, t_sc + d, d, y_sc)
            target = torch.cat([_clip((s1 + s2) / 2, clip), target[n_sc:]])

    err = (model(x_t, t, d_query, y) - target.to(x_t.dtype)).float().pow(2)
    return err.flatten(1).mean(1), n_sc


def _clip(x, clip):
    return x if clip is None else x.clamp(-clip, clip)


################################################################################
#                                   Sampler                                    #
################################################################################

@torch.no_grad()
def sample(model, x0, steps, y=None, cfg_scale=1.0, *, flow=False, trajectory=False):
    """Integrate from noise x0 at t=0 to t=1; returns x1 (and the trajectory).

    steps: the number N of shortcut steps, a power of two from 1 to 128, each of size
    d = 1/N and told its d. It may also be a list of step sizes, each a power of two in
    [1/128, 1], that sum to 1, such as [1/2, 1/4, 1/4].
    flow: sample as the plain flow-matching ODE, with the velocity (d = 0) at every
    step; then N may be any positive integer.
    y, cfg_scale: class labels and the guidance scale w of s_u + w (s_c - s_u); w = 1
    is the conditional model alone.
    trajectory: also return the (N+1, *x0.shape) stack of points visited.
    """
    sizes = step_sizes(steps, flow)
    B = x0.shape[0]
    x, t, path = x0, 0.0, [x0]
    for size in sizes:
        tt = torch.full((B,), t, device=x0.device)
        dd = torch.full((B,), 0.0 if flow else size, device=x0.device)
        x = x + size * _guided(model, x, tt, dd, y, cfg_scale)
        t += size
        path.append(x)
    return (x, torch.stack(path)) if trajectory else x


def step_sizes(steps, flow=False):
    """The list of step sizes that `sample` takes for `steps`; ValueError if not allowed."""
    allowed = "a power of two from 1 to 128 (1, 2, 4, ..., 128)"
    if isinstance(steps, (list, tuple)):
        ok = [s > 0 and 2.0 ** round(math.log2(s)) == s and s * MAX_STEPS >= 1 for s in steps]
        if not steps or not all(ok) or abs(sum(steps) - 1.0) > 1e-9:
            raise ValueError(f"a list of step sizes must hold powers of two in [1/{MAX_STEPS}, 1] "
                             f"that sum to 1, such as [0.5, 0.25, 0.25]; got {steps}")
        return [float(s) for s in steps]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be {allowed}, got {steps!r}")
    if not flow and (steps > MAX_STEPS or steps & (steps - 1)):
        raise ValueError(f"steps must be {allowed}, got {steps}: a shortcut model is trained "
                         "for those step sizes only (pass a list of step sizes for other splits)")
    return [1.0 / steps] * int(steps)


def _guided(model, x, t, d, y, w):
    if y is None or w == 1.0:
        return model(x, t, d, y)
    null = torch.full_like(y, model.num_classes)
    s_c, s_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([d, d]),
                     torch.cat([y, null])).chunk(2)
    return s_u + w * (s_c - s_u)


################################################################################
#                        Helpers that both scripts need                        #
################################################################################

@torch.no_grad()
def ema_update(ema, model, decay=0.999):
    """ema <- decay * ema + (1 - decay) * model, as one foreach op over all parameters."""
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is checked and returned."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but this torch has no MPS backend")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def write_atomic(path, write):
    """write(f) fills an in-memory binary file f (np.savez, torch.save, fig.savefig, ...); its
    bytes then reach `path` through a temporary file beside it and a rename, so a failed or
    interrupted write (a full disk, Ctrl-C, kill -9) leaves the old file whole."""
    buf = io.BytesIO()
    write(buf)
    tmp = path + ".tmp"
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
