"""Shortcut models on 2-D data: the paper's Figure 1 and Table 1 on a laptop CPU.

    python train_toy.py                      # 8 Gaussians on a ring, writes out/toy/ (~45 s)
    python train_toy.py --dataset moons --steps 6000
    python train_toy.py --objective consistency-training     # any objective of baselines.py
    python train_toy.py --table1             # every objective at one budget (< 3 minutes)

Trains a model on --objective (default: shortcut) and a flow-matching baseline with the same
network, budget and seed, then writes to --out:
  samples.png      one row per model, one column per step count, plus the data
  trajectories.png sample paths at 1, 4 and 128 steps (Euler samplers)
  losses.png       the data rows' and the bootstrap rows' parts of the loss during training
  exact.png        (Gaussian mixtures) the learned shortcut against the exact jump
                   (Phi_{t->t+d}(x) - x)/d of the true flow map, for each d
  samples.npz      data and NAME_N for N = 1 .. 128, from the same noise
  metrics.json     per N: sliced Wasserstein-2 distance to fresh data (and data vs data)
                   and, for mixtures, the share of samples more than 3 sigma from every mode
  NAME.pt          the trained model, to sample again without training
--table1 writes table1.md, table1.png, table1.npz, table1.json and a checkpoint per objective.

The ablation flags (--ungrounded, --no-stop-grad, --d-sampling, --ema-teacher, --no-curriculum,
--track-exact, --sweep) serve the exercises in docs/EXERCISES.md.
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

import baselines as B
from shortcut import MAX_STEPS, MLP, ema_update, pick_device, regress, sample, seed_everything, write_atomic

STEP_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128]


################################################################################
#              Gaussian mixtures and their exact flow (the truth)              #
################################################################################

class GaussianMixture:
    """x1 ~ sum_k pi_k N(mu_k, Sigma_k), with the exact velocity and flow map of the path.

    Given component k, x_t ~ N(t mu_k, C_k) with C_k(t) = (1-t)^2 I + t^2 Sigma_k, and
    E[x1 - x0 | x_t, k] = mu_k + (t Sigma_k - (1-t) I) C_k^-1 (x_t - t mu_k). The velocity is
    the mixture of these regressions weighted by the posterior w_k ∝ pi_k N(x_t; t mu_k, C_k).
    """

    def __init__(self, weights, means, covs):
        self.pi = torch.as_tensor(weights, dtype=torch.float64)
        self.pi = self.pi / self.pi.sum()
        self.mu = torch.as_tensor(np.asarray(means), dtype=torch.float64)          # (K, D)
        self.cov = torch.as_tensor(np.asarray(covs), dtype=torch.float64)          # (K, D, D)
        self.lam, self.U = torch.linalg.eigh(self.cov)                  # (K, D), (K, D, D)

    def sample(self, n, rng):
        k = rng.choice(len(self.pi), size=n, p=self.pi.numpy())
        L = np.linalg.cholesky(self.cov.numpy())
        z = rng.standard_normal((n, self.mu.shape[1]))
        return self.mu.numpy()[k] + np.einsum("nij,nj->ni", L[k], z)

    def velocity(self, x, t):
        """v(x, t) for x (B, D) and t (B,), in float64.

        With Sigma_k = U diag(lam) U^T, C_k is diagonal in the same basis, so the solve
        and the log-determinant are elementwise there.
        """
        t = t.double()[:, None, None]                                   # (B, 1, 1)
        r = x.double()[:, None] - t * self.mu                           # (B, K, D)
        r_u = (r[..., None, :] @ self.U)[..., 0, :]                     # U^T r
        c = (1 - t) ** 2 + t ** 2 * self.lam                            # eigenvalues of C_k
        gain = (t * self.lam - (1 - t)) / c                             # of (t Sigma - (1-t) I) C^-1
        v_k = self.mu + ((gain * r_u)[..., None, :] @ self.U.mT)[..., 0, :]
        logp = -0.5 * (r_u ** 2 / c + torch.log(c)).sum(-1)
        w = torch.softmax(torch.log(self.pi) + logp, dim=1)             # (B, K)
        return (w[:, None] @ v_k)[:, 0]

    def flow_map(self, x, t, d, h=1.0 / 1024):
        """Phi_{t -> t+d}(x) by RK4 on a grid of step h (rows share d, not t)."""
        n = max(1, math.ceil(d / h - 1e-9))
        x, t, dt = x.double(), t.double(), d / n
        for _ in range(n):
            k1 = self.velocity(x, t)
            k2 = self.velocity(x + dt / 2 * k1, t + dt / 2)
            k3 = self.velocity(x + dt / 2 * k2, t + dt / 2)
            k4 = self.velocity(x + dt * k3, t + dt)
            x, t = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + dt
        return x


class ExactShortcut(torch.nn.Module):
    """The true shortcut (Phi_{t->t+d}(x) - x)/d of a GaussianMixture; the velocity at d=0.
    Phi is RK4 on a grid of step h, whose discrete flow still composes exactly on that grid."""

    def __init__(self, gm, h=1.0 / 1024):
        super().__init__()
        self.gm, self.h = gm, h

    def forward(self, x, t, d, y=None):
        out = torch.empty_like(x, dtype=torch.float64)
        for dv in torch.unique(d).tolist():
            rows = d == dv
            xr, tr = x[rows], t[rows]
            out[rows] = (self.gm.velocity(xr, tr) if dv == 0 else
                         (self.gm.flow_map(xr, tr, dv, self.h) - xr.double()) / dv)
        return out.to(x.dtype)


def ring(n=8, radius=1.5, std=0.15):
    angles = 2 * np.pi * np.arange(n) / n
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(np.ones(n), means, np.tile(std ** 2 * np.eye(2), (n, 1, 1)))


def skewed_mixture():
    """Four anisotropic components of unequal weight: a harder, lopsided target."""
    def cov(sx, sy, angle):
        R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return R @ np.diag([sx ** 2, sy ** 2]) @ R.T
    return GaussianMixture([0.4, 0.3, 0.2, 0.1],
                           [[-1.0, -0.6], [1.0, 1.0], [1.1, -1.2], [-1.2, 1.3]],
                           [cov(0.5, 0.12, 0.6), cov(0.3, 0.3, 0.0), cov(0.4, 0.1, -1.0),
                            cov(0.15, 0.15, 0.0)])


################################################################################
#                                   Datasets                                   #
################################################################################

def sample_data(name, n, rng):
    """n points (float32, roughly unit scale) of a named 2-D dataset."""
    seed = int(rng.integers(2 ** 31))
    if name in MIXTURES:
        return MIXTURES[name]().sample(n, rng).astype(np.float32)
    if name == "moons":
        from sklearn.datasets import make_moons
        x = make_moons(n, noise=0.05, random_state=seed)[0]
        return ((x - [0.5, 0.25]) / [0.87, 0.5] * 0.8).astype(np.float32)
    if name == "swissroll":
        from sklearn.datasets import make_swiss_roll
        x = make_swiss_roll(n, noise=0.3, random_state=seed)[0][:, [0, 2]]
        return (x / 7.0).astype(np.float32)
    if name == "checkerboard":      # the 8 cells of a 4x4 board whose row + column is even
        x = rng.uniform(-2, 2, size=(n, 2))
        x[:, 1] = rng.uniform(0, 1, size=n) + 2 * rng.integers(-1, 1, size=n) + np.floor(x[:, 0]) % 2
        return (x * 0.7).astype(np.float32)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


MIXTURES = {"ring": ring, "mixture": skewed_mixture}
DATASETS = list(MIXTURES) + ["moons", "swissroll", "checkerboard"]


def sliced_w2(a, b, n_proj=512, seed=0):
    """Sliced Wasserstein-2 distance between two equal-sized point clouds."""
    g = np.random.default_rng(seed)
    theta = g.standard_normal((a.shape[1], n_proj))
    theta /= np.linalg.norm(theta, axis=0)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


################################################################################
#                                   Training                                   #
################################################################################

def train(label, data, args, device, *, objective="shortcut", bootstrap_frac=None, pair=None, teacher=None,
          track=None):
    """Trains one MLP on an objective of baselines.OBJECTIVES; returns it and its log (losses
    per step, seconds, and the exact errors every --track-exact steps when `track` is given).
    teacher: the flow-matching model of a two-phase objective; pair: noise-data pairing
    (default --pair). The learning rate decays to 0, so the model itself is sampled;
    --ema-teacher keeps an EMA only to build the targets."""
    seed_everything(args.seed)
    model = MLP(width=args.width, depth=args.depth).to(device)
    if objective == "progressive-distillation":       # the student starts as its teacher, which then changes
        model.load_state_dict(teacher.state_dict())
        teacher = copy.deepcopy(teacher)
    elif args.ema_teacher and not B.objective(objective).two_phase:
        teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / args.steps)))
    options = {}
    if objective == "shortcut":
        options = dict(bootstrap_frac=args.bootstrap_frac if bootstrap_frac is None else bootstrap_frac,
                       grounded=not args.ungrounded, stop_grad=not args.no_stop_grad, d_sampling=args.d_sampling)
    elif objective == "consistency-training":
        options = dict(curriculum=not args.no_curriculum)
    if objective != "reflow":
        options["pair"] = pair or args.pair
    data = torch.as_tensor(data, device=device)
    log = {"fm": [], "sc": [], "exact": {}}
    t0 = last = time.time()
    for step in range(args.steps):
        x1 = data[torch.randint(len(data), (args.batch_size,), device=device)]
        progress = step / args.steps
        loss, info = regress(model, B.make_targets(objective, model, x1, teacher=teacher, progress=progress, **options))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if args.ema_teacher and teacher is not None and not B.objective(objective).two_phase:
            ema_update(teacher, model, args.ema_decay)
        if B.new_stage(objective, progress, (step + 1) / args.steps):
            teacher.load_state_dict(model.state_dict())
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{label}: the loss became {loss.item()} at step {step + 1}; try a lower --lr")
        log["fm"].append(info["fm"])
        log["sc"].append(info["sc"])
        if track is not None and ((step + 1) % args.track_exact == 0 or step == 0):
            log["exact"][step + 1] = track(model)
        now = time.time()
        if now - last > args.log_every or step + 1 == args.steps:
            rate = (step + 1) / (now - t0)
            print(f"  {label:24s} step {step + 1:6d}/{args.steps}  fm {info['fm']:.4f}  sc {info['sc']:.4f}"
                  f"  {rate:6.0f} it/s  ETA {(args.steps - step - 1) / rate:5.1f}s", flush=True)
            last = now
    log["seconds"] = time.time() - t0
    return model.eval(), log


def save_model(path, model, objective, seconds, args):
    """A toy checkpoint: enough to sample and plot again without training (--reuse)."""
    state = {"objective": objective, "width": args.width, "depth": args.depth, "steps": args.steps,
             "seed": args.seed, "dataset": args.dataset, "seconds": seconds, "model": model.state_dict()}
    write_atomic(path, lambda f: torch.save(state, f))


def load_model(path, args, objective=None):
    """The MLP of a toy checkpoint, or None if it is missing or was trained with other settings."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = MLP(width=state["width"], depth=state["depth"])
        model.load_state_dict(state["model"])
    except Exception as e:
        raise SystemExit(f"train_toy.py: error: {path} is not a toy checkpoint ({type(e).__name__}: {e})") from None
    same = (state["width"], state["depth"], state["steps"], state["seed"], state["dataset"]) == \
        (args.width, args.depth, args.steps, args.seed, args.dataset)
    if objective is not None and not (same and state["objective"] == objective):
        return None
    return model.eval(), state["seconds"]


################################################################################
#                                   Figures                                    #
################################################################################

def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def save_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def plot_samples(path, data, samples, counts, off=None):
    import matplotlib.pyplot as plt
    rows = list(samples)
    fig, axes = plt.subplots(len(rows), len(counts) + 1, figsize=(2.2 * (len(counts) + 1), 2.3 * len(rows)),
                             squeeze=False)
    lim = np.abs(data).max() * 1.15
    for r, model in enumerate(rows):
        for c, n in enumerate(counts + ["data"]):
            ax = axes[r, c]
            pts = data if n == "data" else samples[model][n]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="k" if n == "data" else f"C{r}")
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
            title = "data" if n == "data" else f"{n} step{'s' * (n > 1)}" if r == 0 else ""
            if off is not None:      # the share of points more than 3 sigma from every mode
                title += f"\n{100 * (off['data'] if n == 'data' else off[model][n]):.1f}% off-mode"
            ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(model)
    save_figure(fig, path)


def plot_trajectories(path, data, trajectories, counts, n_paths=250):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    rows = list(trajectories)
    fig, axes = plt.subplots(len(rows), len(counts), figsize=(3 * len(counts), 3 * len(rows)), squeeze=False)
    lim = max(np.abs(data).max() * 1.3, 3.0)     # wide enough to show where the noise starts
    for r, model in enumerate(rows):
        for c, n in enumerate(counts):
            ax = axes[r, c]
            traj = trajectories[model][n][:, :n_paths]                  # (N+1, n_paths, 2)
            ax.scatter(data[:2000, 0], data[:2000, 1], s=1, color="0.8")
            ax.add_collection(LineCollection(traj.transpose(1, 0, 2), lw=0.5, alpha=0.5, color=f"C{r}"))
            ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, color="k", zorder=3)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal",
                   title=f"{model}, {n} step{'s' * (n > 1)}")
    save_figure(fig, path)


@functools.lru_cache(maxsize=None)
def mixture_paths(dataset):
    """true_paths of a named mixture, computed once per process (a few seconds)."""
    return true_paths(MIXTURES[dataset]())


def true_paths(gm, n=512, seed=0):
    """n noise points carried along the exact flow by fine RK4, recorded at every multiple
    of 1/128: (129, n, 2). Points on true paths follow the true marginals p_t."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    path = [x]
    for i in range(MAX_STEPS):
        path.append(gm.flow_map(path[-1], torch.full((n,), i / MAX_STEPS), 1 / MAX_STEPS))
    return torch.stack(path)


@torch.no_grad()
def exact_errors(model, path, told="step"):
    """RMS error of s(x_t, t, d) against the exact jump (x_{t+d} - x_t)/d, for each d = 1/N.

    The pairs (x_t, x_{t+d}) at t = 0, d, 2d, ... along the true paths give inputs and exact
    jumps for every d at once. told is the d the network is told (baselines.Objective.told):
    "0" queries the velocity (a flow model's only answer); "1 - t" compares the jump to the end,
    (x_1 - x_t)/(1 - t), at the same points.
    """
    n, errors = path.shape[1], {}
    for n_steps in STEP_COUNTS:
        stride, d = MAX_STEPS // n_steps, 1.0 / n_steps
        x_t, x_next = path[:-1:stride].reshape(-1, 2), path[stride::stride].reshape(-1, 2)
        t = (torch.arange(n_steps).repeat_interleave(n) * d).double()
        if told == "1 - t":
            query, exact = 1 - t, (path[-1].repeat(n_steps, 1) - x_t) / (1 - t)[:, None]
        else:
            query, exact = torch.full_like(t, 0.0 if told == "0" else d), (x_next - x_t) / d
        pred = model(x_t.float(), t.float(), query.float())
        errors[n_steps] = float((pred.double() - exact).pow(2).sum(1).mean().sqrt())
    return errors


def plot_exact(path, errors, models, one_step, n_points=300):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(13, 4))
    ax = axes[0]
    for name, errs in errors.items():
        ax.plot(list(errs), list(errs.values()), "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="step size d", ylabel="RMS error of s(x_t, t, d)",
           title="learned vs exact shortcut (Phi(x)-x)/d")
    ax.set_xticks(STEP_COUNTS, [f"1/{n}" for n in STEP_COUNTS])
    ax.legend()
    x0, exact = one_step[0][:n_points], one_step[1][:n_points]
    for i, (ax, name) in enumerate(zip(axes[1:], models)):
        obj, model = models[name]
        with torch.no_grad():
            d = torch.full((len(x0),), 0.0 if B.objective(obj).told == "0" else 1.0)
            jump = x0 + model(x0, torch.zeros(len(x0)), d)
        ax.add_collection(LineCollection(torch.stack([exact, jump], 1).numpy(), color="r", lw=0.4))
        ax.scatter(*exact.T, s=4, color="0.5", label="exact Phi_{0->1}(x0)")
        ax.scatter(*jump.T, s=4, color=f"C{i}", label="x0 + s(x0, 0, 1)")
        ax.set(aspect="equal", xticks=[], yticks=[], title=f"{name}: one step of size 1 (red: error)")
        ax.legend(loc="lower left", fontsize=7)
    save_figure(fig, path)


def plot_losses(path, logs, window=50):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, (name, log) in enumerate(logs.items()):
        for ax, part in zip(axes, ("fm", "sc")):
            v = np.asarray(log[part])
            window = min(window, max(1, len(v) // 5))
            kernel = np.ones(window) / window
            if not np.isnan(v).all():      # an empty part is all nan; an all-zero one is drawn at 0
                ax.plot(np.arange(window, len(v) + 1), np.convolve(v, kernel, "valid"), color=f"C{i}", label=name)
    for ax, title in zip(axes, ("data rows (flow matching)", "bootstrap rows (self-consistency)")):
        # symlog: logarithmic above 1e-4 and linear below, so a loss of exactly 0 shows
        ax.set(xlabel="training step", title=f"{title}, running mean")
        ax.set_yscale("symlog", linthresh=1e-4)
        if ax.lines:
            ax.set_ylim(bottom=0)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no rows of this kind", ha="center", transform=ax.transAxes)
    save_figure(fig, path)


def plot_exact_training(path, history):
    """The exact error of s(x_t, t, d) against training steps, one line per d."""
    import matplotlib.pyplot as plt
    steps = sorted(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, n in enumerate(STEP_COUNTS):
        ax.plot(steps, [history[s][n] for s in steps], color=plt.cm.viridis(i / 7), label=f"d = 1/{n}")
    ax.set(xlabel="training step", ylabel="RMS error vs exact jump", yscale="log",
           title="learning the shortcut at each step size")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


################################################################################
#                                     Main                                     #
################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ring", choices=DATASETS,
                   help="2-D data: ring (8 Gaussians), mixture (4 skewed Gaussians), moons, "
                        "swissroll, checkerboard (default: ring)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per model (default: 3000; 1200 with --table1, to fit 3 minutes)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, cosine decay (default: 2e-3)")
    p.add_argument("--bootstrap-frac", type=float, default=0.25,
                   help="share of each batch with self-consistency targets for the shortcut model (default: 0.25)")
    p.add_argument("--width", type=int, default=128, help="MLP width (default: 128)")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks (default: 3)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="samples per step count (default: 4000; 3000 with --table1, to fit 3 minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, noise and weights (default: 0)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu; the toy is too small to gain from a GPU)")
    p.add_argument("--out", default="out/toy", help="output folder (default: out/toy)")
    p.add_argument("--objective", default="shortcut", choices=list(B.OBJECTIVES),
                   help="what the first model trains on (default: shortcut); see baselines.py. The two-phase "
                        "ones (consistency-distillation, progressive-distillation, reflow) first train a "
                        "flow-matching teacher, or load --teacher")
    p.add_argument("--teacher", metavar="PATH", help="a toy checkpoint of a flow-matching model (such as "
                   "out/toy/flow.pt) to teach a two-phase objective, instead of training one")
    p.add_argument("--pair", default="independent", choices=["independent", "ot"],
                   help="how noise and data are paired in a batch: independently (default) or by minibatch "
                        "optimal transport, which straightens the paths (not for reflow, paired by its teacher)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not train the flow-matching baseline beside the model (faster ablations)")
    p.add_argument("--table1", action="store_true",
                   help="train every objective of the paper's Table 1 at one budget and seed, with one shared "
                        "flow-matching teacher; writes table1.md, table1.png, table1.npz and a checkpoint each")
    p.add_argument("--reuse", action="store_true",
                   help="with --table1: load the checkpoints of an earlier run with the same settings from --out "
                        "instead of training again")
    p.add_argument("--log-every", type=float, default=3.0, help="seconds between progress lines (default: 3)")
    e = p.add_argument_group("ablations for the exercises (docs/EXERCISES.md); the defaults are the method")
    e.add_argument("--ungrounded", action="store_true",
                   help="drop the 2d = 1/64 targets, so the level d = 1/64 is never supervised")
    e.add_argument("--no-stop-grad", action="store_true", help="let gradients flow through the targets")
    e.add_argument("--d-sampling", default="dyadic", choices=["dyadic", "uniform"],
                   help="dyadic: 2d in {1, ..., 1/64}, t on its grid (default); uniform: 2d ~ U[1/64, 1], any t")
    e.add_argument("--ema-teacher", action="store_true",
                   help="build the targets with an EMA copy (the official default) instead of the model itself")
    e.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of --ema-teacher (default: 0.999)")
    e.add_argument("--no-curriculum", action="store_true",
                   help="--objective consistency-training: the final step dt = 1/64 from the first step on")
    e.add_argument("--track-exact", type=int, default=0, metavar="K",
                   help="every K steps, measure the shortcut's error against the exact flow (mixtures) "
                        "and draw exact_training.png")
    e.add_argument("--sweep", choices=["bootstrap-frac"],
                   help="train shortcut models at bootstrap fractions 1/16, 1/8, 1/4, 1/2 and draw "
                        "sweep_bootstrap_frac.png instead of the usual run")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 1200 if args.table1 else 3000
    if args.n_samples is None:
        args.n_samples = 3000 if args.table1 else 4000
    if args.pair == "ot" and args.objective == "reflow":
        p.error("--pair ot does not apply to reflow, whose pairs come from its teacher")
    for flag in ("steps", "batch_size", "n_samples", "width", "depth"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.bootstrap_frac <= 1.0:
        p.error("--bootstrap-frac must be in [0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number above 0, got {args.lr}")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be in [0, 2^32), got {args.seed}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not args.out or os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} must name a folder, not a file")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        p.error(f"--device: {e}")
    return args


def sample_all(models, x0, counts=STEP_COUNTS):
    """Samples of each model (name -> (objective, model)) for every N, from the same noise x0,
    each by its objective's sampler."""
    return {name: {n: B.objective(obj).sample(model, x0, n).numpy() for n in counts}
            for name, (obj, model) in models.items()}


def trajectories_of(models, x0, counts):
    """Sample paths of the models whose objective samples by Euler (shortcut.sample)."""
    return {name: {n: sample(model, x0, n, flow=B.objective(obj).told == "0", trajectory=True)[1].numpy()
                   for n in counts}
            for name, (obj, model) in models.items() if B.objective(obj).told != "1 - t"}


def evaluate(models, x0, data, data_b, gm, path, counts=STEP_COUNTS):
    """Samples and the metrics of each model: sliced W2 and (mixtures) the off-mode fraction
    per N, and the RMS error of its one-step jump against the exact flow map."""
    samples = sample_all(models, x0, counts)
    metrics = {"sliced_w2": {"data vs data": sliced_w2(data, data_b)}}
    metrics["sliced_w2"].update({name: {n: sliced_w2(samples[name][n], data) for n in counts} for name in models})
    if gm is not None:
        metrics["off_mode"] = {"data": off_mode_fraction(data_b, gm)}
        metrics["off_mode"].update({name: {n: off_mode_fraction(samples[name][n], gm) for n in counts}
                                    for name in models})
        metrics["jump_error"] = {name: jump_error(model, obj, path) for name, (obj, model) in models.items()}
    return samples, metrics


def off_mode_fraction(x, gm, k=3.0):
    """The share of points more than k sigma (in Mahalanobis distance) from every component of
    a mixture: the smear between modes that sliced W2 hardly sees. In 2-D, fresh data scores
    exp(-k^2/2), 1.1% for k = 3."""
    r = torch.as_tensor(np.asarray(x), dtype=torch.float64)[:, None] - gm.mu          # (n, K, D)
    r_u = (r[..., None, :] @ gm.U)[..., 0, :]                                         # U^T r
    return float(((r_u ** 2 / gm.lam).sum(-1).min(1).values > k * k).double().mean())


@torch.no_grad()
def jump_error(model, objective, path):
    """RMS error of the one-step jump x0 + s(x0, 0, d) against the exact Phi_{0->1}(x0), with d as
    the objective tells it (0 for a velocity: one Euler step). None for diffusion, whose
    cosine path has another flow map."""
    if objective == "diffusion":
        return None
    x0, x1 = path[0].float(), path[-1]
    d = torch.full((len(x0),), 0.0 if B.objective(objective).told == "0" else 1.0)
    return float((x0.double() + model(x0, torch.zeros(len(x0)), d).double() - x1).pow(2).sum(1).mean().sqrt())


def sweep(args, train_data, data, x0):
    """Exercise 5: the 1-step and 128-step distance against the bootstrap fraction."""
    import matplotlib.pyplot as plt
    fracs = [1 / 16, 1 / 8, 1 / 4, 1 / 2]
    dist = {}
    for frac in fracs:
        model, _ = train(f"frac {frac:g}", train_data, args, args.device, bootstrap_frac=frac)
        dist[frac] = {n: sliced_w2(sample(model.cpu(), x0, n).numpy(), data) for n in (1, 128)}
    print("\nbootstrap fraction   SW2, 1 step   SW2, 128 steps")
    for frac in fracs:
        print(f"  {frac:16.4f}  {dist[frac][1]:12.4f}  {dist[frac][128]:14.4f}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in (1, 128):
        ax.plot(fracs, [dist[f][n] for f in fracs], "o-", label=f"{n} step{'s' * (n > 1)}")
    ax.axhline(sliced_w2(data, sample_data(args.dataset, len(data), np.random.default_rng(args.seed + 7))),
               color="0.6", ls="--", label="data vs data")
    ax.set(xscale="log", xlabel="bootstrap fraction", ylabel="sliced W2 to data", title="sweep of bootstrap_frac")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xticks(fracs, ["1/16", "1/8", "1/4", "1/2"])
    ax.legend()
    save_figure(fig, os.path.join(args.out, "sweep_bootstrap_frac.png"))
    save_json(os.path.join(args.out, "sweep.json"), {str(k): v for k, v in dist.items()})
    return dist


def teacher_for(args, train_data):
    """The flow-matching teacher of the two-phase objectives: --teacher, or trained now (and
    saved as flow.pt). Returns (model, seconds it took to train)."""
    if args.teacher:
        loaded = load_model(args.teacher, args)
        if loaded is None:
            raise SystemExit(f"train_toy.py: error: no toy checkpoint at {args.teacher}")
        return loaded
    model, log = train("flow (teacher)", train_data, args, args.device, objective="flow")
    save_model(os.path.join(args.out, "flow.pt"), model, "flow", log["seconds"], args)
    return model, log["seconds"]


TABLE_STEPS = [1, 4, 128]
# (row, objective, pairing): every objective of baselines.py, and the shortcut model with
# minibatch optimal-transport pairing
TABLE_ROWS = [(name, name, "independent") for name in B.OBJECTIVES] + [("shortcut + OT", "shortcut", "ot")]


def table1(args, train_data, data, data_b, x0, gm, path, start):
    """The paper's Table 1 in miniature: every objective at --steps steps of batch --batch-size
    and the same seed; the two-phase ones learn from the shared flow-matching teacher, the
    `flow` row itself, whose steps they also cost. start: when the run began, for its wall time."""
    models, seconds = {}, {}
    for row, name, pair in TABLE_ROWS:
        ckpt = os.path.join(args.out, f"{file_name(row)}.pt")
        loaded = load_model(ckpt, args, row) if args.reuse else None
        if loaded is None and row == "flow" and args.teacher:
            loaded = load_model(args.teacher, args)
        if loaded is None:
            teacher = models["flow"][1] if B.objective(name).two_phase else None
            model, log = train(row, train_data, args, args.device, objective=name, pair=pair, teacher=teacher)
            loaded = (model, log["seconds"])
            save_model(ckpt, model, row, log["seconds"], args)
        models[row], seconds[row] = (name, loaded[0]), loaded[1]
    samples, metrics = evaluate(models, x0, data, data_b, gm, path, counts=[1, 2, 4, 8, 128])
    budget = {row: f"{args.steps} + {args.steps} teacher" if B.objective(name).two_phase else str(args.steps)
              for row, (name, _) in models.items()}
    metrics.update(train_seconds=seconds, budget_steps=budget, batch_size=args.batch_size)
    metrics["wall_seconds"] = round(time.time() - start, 1)
    md = table1_markdown(metrics, seconds, budget, args)
    print("\n" + md)
    write_atomic(os.path.join(args.out, "table1.md"), lambda f: f.write(md.encode()))
    save_json(os.path.join(args.out, "table1.json"), metrics)
    arrays = {"data": data, **{f"{file_name(row)}_{n}": samples[row][n] for row in models for n in (1, 2, 4, 8, 128)}}
    write_atomic(os.path.join(args.out, "table1.npz"), lambda f: np.savez_compressed(f, **arrays))
    plot_table1(os.path.join(args.out, "table1.png"), data, samples, metrics)
    print(f"\ntable 1 done in {time.time() - start:.1f}s (sampling and plots included); wrote table1.md, table1.png, table1.npz, table1.json "
          f"and a checkpoint per objective to {args.out}")
    return metrics


def file_name(row):
    """A table row's name as a file or key name: 'shortcut + OT' -> 'shortcut_OT'."""
    return row.replace(" + ", "_")


def table1_markdown(metrics, seconds, budget, args):
    off, w2 = metrics.get("off_mode"), metrics["sliced_w2"]
    head = (f"Table 1 in miniature: {args.dataset}, MLP {args.width}x{args.depth}, batch {args.batch_size}, seed "
            f"{args.seed}. Steps: training steps (two-phase: plus the flow row's steps as teacher).\n\n")
    cols = [f"off-mode {n}" for n in TABLE_STEPS] * (off is not None) + [f"SW2 {n}" for n in TABLE_STEPS]
    cols += ["jump error"] * (off is not None) + ["steps", "train s"]
    lines = ["| objective | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in budget:
        row = [f"{100 * off[name][n]:.1f}%" for n in TABLE_STEPS] if off is not None else []
        row += [f"{w2[name][n]:.3f}" for n in TABLE_STEPS]
        if off is not None:
            err = metrics["jump_error"][name]
            row.append("n/a" if err is None else f"{err:.3f}")
        lines.append(f"| {name} | " + " | ".join(row + [budget[name], f"{seconds[name]:.1f}"]) + " |")
    ref = ([f"{100 * off['data']:.1f}%"] * 3 if off is not None else []) + [f"{w2['data vs data']:.3f}"] * 3
    lines.append("| data vs data | " + " | ".join(ref + ["0.000"] * (off is not None) + ["", ""]) + " |")
    return head + "\n".join(lines) + "\n"


def plot_table1(path, data, samples, metrics):
    import matplotlib.pyplot as plt
    names = list(samples)
    fig, axes = plt.subplots(len(names), len(TABLE_STEPS), figsize=(2.2 * len(TABLE_STEPS), 2.2 * len(names)),
                             squeeze=False)
    lim = np.abs(data).max() * 1.15
    for r, name in enumerate(names):
        for c, n in enumerate(TABLE_STEPS):
            ax = axes[r, c]
            ax.scatter(data[:2000, 0], data[:2000, 1], s=1, color="0.85")
            ax.scatter(samples[name][n][:, 0], samples[name][n][:, 1], s=1, alpha=0.4, color=f"C{r % 10}")
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
            if "off_mode" in metrics:
                ax.set_title(f"{n} step{'s' * (n > 1)}: {100 * metrics['off_mode'][name][n]:.1f}% off", fontsize=8)
            elif r == 0:
                ax.set_title(f"{n} step{'s' * (n > 1)}", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryFile(dir=args.out):     # fail now, not after training, if it is read-only
        pass
    start = time.time()
    rng = np.random.default_rng(args.seed)
    train_data = sample_data(args.dataset, 100_000, rng)
    data, data_b = sample_data(args.dataset, args.n_samples, rng), sample_data(args.dataset, args.n_samples, rng)
    x0 = torch.randn(args.n_samples, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"training on {args.dataset}: {args.steps} steps, batch {args.batch_size}, device {args.device}")
    if args.sweep:
        return sweep(args, train_data, data, x0)
    gm = MIXTURES[args.dataset]() if args.dataset in MIXTURES else None
    path = mixture_paths(args.dataset) if gm is not None else None
    if args.table1:
        return table1(args, train_data, data, data_b, x0, gm, path, start)

    track = (lambda m: exact_errors(m, path)) if args.track_exact and path is not None else None
    if args.track_exact and path is None:
        print("--track-exact needs a Gaussian mixture (--dataset ring or mixture): skipped")
    name = args.objective
    teacher = teacher_for(args, train_data)[0] if B.objective(name).two_phase else None
    model, log = train(name, train_data, args, args.device, objective=name, teacher=teacher, track=track)
    save_model(os.path.join(args.out, f"{name}.pt"), model, name, log["seconds"], args)
    models, logs = {name: (name, model.cpu())}, {name: log}
    if not args.no_baseline and name != "flow":
        if teacher is not None:
            models["flow"], logs["flow"] = ("flow", teacher.cpu()), None
        else:
            flow, logs["flow"] = train("flow", train_data, args, args.device, objective="flow")
            models["flow"] = ("flow", flow.cpu())
    samples, metrics = evaluate(models, x0, data, data_b, gm, path)
    metrics.update(dataset=args.dataset, objective=name,
                   train_seconds={k: v["seconds"] for k, v in logs.items() if v is not None})
    print_metrics(metrics, models)

    written = ["samples.png", "trajectories.png", "losses.png"]
    off = metrics.get("off_mode")
    plot_samples(os.path.join(args.out, "samples.png"), data, samples, [1, 2, 4, 8, 128], off)
    trajectories = trajectories_of(models, x0, [1, 4, 128])
    if trajectories:
        plot_trajectories(os.path.join(args.out, "trajectories.png"), data, trajectories, [1, 4, 128])
    else:
        written.remove("trajectories.png")
    plot_losses(os.path.join(args.out, "losses.png"), {k: v for k, v in logs.items() if v is not None})
    if gm is not None:
        errors = {k: exact_errors(m, path, told=B.objective(obj).told) for k, (obj, m) in models.items()}
        metrics["exact_rms_error"] = errors
        print("\nRMS error of s(x_t, t, d) against the exact jump (Phi_{t->t+d}(x_t) - x_t)/d")
        w = max(map(len, models))
        print(f"  {'d':{w}s}" + "".join(f"{'1/' + str(n):>9s}" for n in STEP_COUNTS))
        for k in models:
            print(f"  {k:{w}s}" + "".join(f"{errors[k][n]:9.4f}" for n in STEP_COUNTS))
        plot_exact(os.path.join(args.out, "exact.png"), errors, models, (path[0].float(), path[-1].float()))
        written.append("exact.png")
        if track is not None:
            metrics["exact_during_training"] = log["exact"]
            plot_exact_training(os.path.join(args.out, "exact_training.png"), log["exact"])
            written.append("exact_training.png")

    arrays = {"data": data, **{f"{k}_{n}": samples[k][n] for k in models for n in STEP_COUNTS}}
    write_atomic(os.path.join(args.out, "samples.npz"), lambda f: np.savez_compressed(f, **arrays))
    save_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"\ndone in {time.time() - start:.1f}s; wrote {', '.join(written)}, samples.npz, metrics.json and "
          f"{name}.pt to {args.out}")
    return metrics


def print_metrics(metrics, models):
    w2, off, w = metrics["sliced_w2"], metrics.get("off_mode"), max(map(len, models))
    print(f"\nsliced W2 to fresh data (data vs data: {w2['data vs data']:.4f})")
    print(f"  {'steps':{w}s}" + "".join(f"{n:>9d}" for n in STEP_COUNTS))
    for k in models:
        print(f"  {k:{w}s}" + "".join(f"{w2[k][n]:9.4f}" for n in STEP_COUNTS))
    if off is not None:
        print(f"\nshare of samples more than 3 sigma from every mode (data: {100 * off['data']:.1f}%)")
        print(f"  {'steps':{w}s}" + "".join(f"{n:>9d}" for n in STEP_COUNTS))
        for k in models:
            print(f"  {k:{w}s}" + "".join(f"{100 * off[k][n]:8.1f}%" for n in STEP_COUNTS))


if __name__ == "__main__":
    try:
        main()
    except OSError as e:       # a read-only --out, or a full disk while writing the outputs
        print(f"train_toy.py: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        sys.exit(2)
