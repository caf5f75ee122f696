"""Shortcut models on 2-D data: the paper's Figure 1 on a laptop CPU in well under a minute.

    python train_toy.py                      # 8 Gaussians on a ring, writes out/toy/
    python train_toy.py --dataset moons --steps 6000

Trains a shortcut model and a flow-matching baseline (bootstrap_frac=0) with the same
network, budget and seed, then writes to --out:
  samples.png      one row per model, one column per step count, plus the data
  trajectories.png sample paths at 1, 4 and 128 steps
  losses.png       the flow-matching and self-consistency parts of the loss during training
  exact.png        (Gaussian mixtures) the learned shortcut against the exact jump
                   (Phi_{t->t+d}(x) - x)/d of the true flow map, for each d
  samples.npz      data, shortcut_N and flow_N for N = 1 .. 128, from the same noise
  metrics.json     sliced Wasserstein-2 distance to fresh data per N, and its floor

The ablation flags (--ungrounded, --no-stop-grad, --d-sampling, --teacher, --track-exact,
--sweep) serve the exercises in docs/EXERCISES.md.
"""
import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from shortcut import MAX_STEPS, MLP, ema_update, pick_device, sample, seed_everything, shortcut_loss, write_atomic

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
        self.gm, self.h, self.num_classes = gm, h, 0

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
    if name == "checkerboard":
        x = rng.uniform(-2, 2, size=(n, 2))
        x[:, 1] = rng.uniform(0, 1, size=n) + rng.integers(-2, 2, size=n)
        x[:, 1] += np.floor(x[:, 0]) % 2
        x[:, 1] = (x[:, 1] + 2) % 4 - 2
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

def train(name, data, args, bootstrap_frac, device, track=None):
    """Trains one MLP shortcut model; returns it and its log (losses per step, and the
    exact errors every --track-exact steps when `track` is given). The learning rate decays
    to 0, so the model itself is sampled; --teacher ema keeps an EMA only as the teacher."""
    seed_everything(args.seed)
    model = MLP(width=args.width, depth=args.depth).to(device)
    teacher = copy.deepcopy(model).requires_grad_(False) if args.teacher == "ema" else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / args.steps)))
    ablations = dict(grounded=not args.ungrounded, stop_grad=not args.no_stop_grad, d_sampling=args.d_sampling)
    data = torch.as_tensor(data, device=device)
    log = {"fm": [], "sc": [], "exact": {}}
    t0 = last = time.time()
    for step in range(1, args.steps + 1):
        x1 = data[torch.randint(len(data), (args.batch_size,), device=device)]
        loss, info = shortcut_loss(model, x1, teacher=teacher, bootstrap_frac=bootstrap_frac, **ablations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if teacher is not None:
            ema_update(teacher, model, args.ema_decay)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{name}: the loss became {loss.item()} at step {step}; try a lower --lr")
        log["fm"].append(info["fm"])
        log["sc"].append(info["sc"])
        if track is not None and (step % args.track_exact == 0 or step == 1):
            log["exact"][step] = track(model)
        now = time.time()
        if now - last > args.log_every or step == args.steps:
            rate = step / (now - t0)
            print(f"  {name:9s} step {step:6d}/{args.steps}  fm {info['fm']:.4f}  sc {info['sc']:.4f}"
                  f"  {rate:6.0f} it/s  ETA {(args.steps - step) / rate:5.1f}s", flush=True)
            last = now
    log["seconds"] = time.time() - t0
    return model.eval(), log


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


def plot_samples(path, data, samples, counts):
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
            if r == 0:
                ax.set_title("data" if n == "data" else f"{n} step{'s' * (n > 1)}")
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


def true_paths(gm, n=512, seed=0):
    """n noise points carried along the exact flow by fine RK4, recorded at every multiple
    of 1/128: (129, n, 2). Points on true paths follow the true marginals p_t."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    path = [x]
    for i in range(MAX_STEPS):
        path.append(gm.flow_map(path[-1], torch.full((n,), i / MAX_STEPS), 1 / MAX_STEPS))
    return torch.stack(path)


@torch.no_grad()
def exact_errors(model, path, velocity_only=False):
    """RMS error of s(x_t, t, d) against the exact jump (x_{t+d} - x_t)/d, for each d = 1/N.

    The pairs (x_t, x_{t+d}) at t = 0, d, 2d, ... along the true paths give inputs and exact
    jumps for every d at once. velocity_only queries d = 0 (the flow baseline's only answer).
    """
    n, errors = path.shape[1], {}
    for n_steps in STEP_COUNTS:
        stride, d = MAX_STEPS // n_steps, 1.0 / n_steps
        x_t, x_next = path[:-1:stride].reshape(-1, 2), path[stride::stride].reshape(-1, 2)
        t = torch.arange(n_steps).repeat_interleave(n) * d
        pred = model(x_t.float(), t.float(), torch.full_like(t, 0.0 if velocity_only else d))
        errors[n_steps] = float((pred.double() - (x_next - x_t) / d).pow(2).sum(1).mean().sqrt())
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
        with torch.no_grad():
            d = torch.full((len(x0),), 0.0 if name == "flow" else 1.0)
            jump = x0 + models[name](x0, torch.zeros(len(x0)), d)
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
            if (v > 0).any():          # nan (an empty part) and all-zero parts have no log plot
                ax.plot(np.arange(window, len(v) + 1), np.convolve(v, kernel, "valid"), color=f"C{i}", label=name)
    for ax, title in zip(axes, ("flow-matching part", "self-consistency part")):
        ax.set(yscale="log", xlabel="training step", title=f"{title} (running mean)")
        ax.legend()
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
    p.add_argument("--steps", type=int, default=3000, help="training steps per model (default: 3000)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, cosine decay (default: 2e-3)")
    p.add_argument("--bootstrap-frac", type=float, default=0.25,
                   help="share of each batch with self-consistency targets for the shortcut model (default: 0.25)")
    p.add_argument("--width", type=int, default=128, help="MLP width (default: 128)")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks (default: 3)")
    p.add_argument("--n-samples", type=int, default=4000, help="samples per step count (default: 4000)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, noise and weights (default: 0)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu; the toy is too small to gain from a GPU)")
    p.add_argument("--out", default="out/toy", help="output folder (default: out/toy)")
    p.add_argument("--log-every", type=float, default=3.0, help="seconds between progress lines (default: 3)")
    e = p.add_argument_group("ablations for the exercises (docs/EXERCISES.md); the defaults are the method")
    e.add_argument("--ungrounded", action="store_true",
                   help="drop the 2d = 1/64 targets, so the level d = 1/64 is never supervised")
    e.add_argument("--no-stop-grad", action="store_true", help="let gradients flow through the targets")
    e.add_argument("--d-sampling", default="dyadic", choices=["dyadic", "uniform"],
                   help="dyadic: 2d in {1, ..., 1/64}, t on its grid (default); uniform: 2d ~ U[1/64, 1], any t")
    e.add_argument("--teacher", default="online", choices=["online", "ema"],
                   help="targets from the model itself (default) or from an EMA copy (the official default)")
    e.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of --teacher ema (default: 0.999)")
    e.add_argument("--track-exact", type=int, default=0, metavar="K",
                   help="every K steps, measure the shortcut's error against the exact flow (mixtures) "
                        "and draw exact_training.png")
    e.add_argument("--sweep", choices=["bootstrap-frac"],
                   help="train shortcut models at bootstrap fractions 1/16, 1/8, 1/4, 1/2 and draw "
                        "sweep_bootstrap_frac.png instead of the usual run")
    args = p.parse_args(argv)
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


def sample_all(models, x0):
    """Samples and trajectories of each model for every N, from the same noise x0."""
    samples, trajectories = {m: {} for m in models}, {m: {} for m in models}
    for name, model in models.items():
        for n in STEP_COUNTS:
            x1, traj = sample(model, x0, n, flow=name == "flow", trajectory=True)
            samples[name][n], trajectories[name][n] = x1.numpy(), traj.numpy()
    return samples, trajectories


def sweep(args, train_data, data, x0):
    """Exercise 5: the 1-step and 128-step distance against the bootstrap fraction."""
    import matplotlib.pyplot as plt
    fracs = [1 / 16, 1 / 8, 1 / 4, 1 / 2]
    dist = {}
    for frac in fracs:
        model, _ = train(f"frac {frac:g}", train_data, args, frac, args.device)
        dist[frac] = {n: sliced_w2(sample(model.cpu(), x0, n).numpy(), data) for n in (1, 128)}
    print("\nbootstrap fraction   SW2, 1 step   SW2, 128 steps")
    for frac in fracs:
        print(f"  {frac:16.4f}  {dist[frac][1]:12.4f}  {dist[frac][128]:14.4f}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in (1, 128):
        ax.plot(fracs, [dist[f][n] for f in fracs], "o-", label=f"{n} step{'s' * (n > 1)}")
    ax.axhline(sliced_w2(data, sample_data(args.dataset, len(data), np.random.default_rng(args.seed + 7))),
               color="0.6", ls="--", label="floor (data vs data)")
    ax.set(xscale="log", xlabel="bootstrap fraction", ylabel="sliced W2 to data", title="sweep of bootstrap_frac")
    ax.set_xticks(fracs, ["1/16", "1/8", "1/4", "1/2"])
    ax.legend()
    save_figure(fig, os.path.join(args.out, "sweep_bootstrap_frac.png"))
    save_json(os.path.join(args.out, "sweep.json"), {str(k): v for k, v in dist.items()})
    return dist


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
    path = true_paths(gm) if gm is not None else None
    track = (lambda m: exact_errors(m, path)) if args.track_exact and path is not None else None
    if args.track_exact and path is None:
        print("--track-exact needs a Gaussian mixture (--dataset ring or mixture): skipped")
    trained = {"shortcut": train("shortcut", train_data, args, args.bootstrap_frac, args.device, track),
               "flow": train("flow", train_data, args, 0.0, args.device)}
    models = {k: m.cpu() for k, (m, _) in trained.items()}
    logs = {k: log for k, (_, log) in trained.items()}
    samples, trajectories = sample_all(models, x0)

    floor = sliced_w2(data, data_b)
    metrics = {"dataset": args.dataset, "metric": "sliced W2 to fresh data", "floor": floor,
               **{name: {n: sliced_w2(samples[name][n], data) for n in STEP_COUNTS} for name in models},
               "train_seconds": {k: log["seconds"] for k, log in logs.items()}}
    print(f"\nsliced W2 to {args.n_samples} fresh points (floor, data vs data: {floor:.4f})")
    print("  steps " + "".join(f"{n:>9d}" for n in STEP_COUNTS))
    for name in models:
        print(f"  {name:8s}" + "".join(f"{metrics[name][n]:9.4f}" for n in STEP_COUNTS))

    written = ["samples.png", "trajectories.png", "losses.png"]
    plot_samples(os.path.join(args.out, "samples.png"), data, samples, [1, 2, 4, 8, 128])
    plot_trajectories(os.path.join(args.out, "trajectories.png"), data, trajectories, [1, 4, 128])
    plot_losses(os.path.join(args.out, "losses.png"), logs)
    if gm is not None:
        errors = {name: exact_errors(model, path, velocity_only=name == "flow") for name, model in models.items()}
        metrics["exact_rms_error"] = errors
        print("\nRMS error of s(x_t, t, d) against the exact jump (Phi_{t->t+d}(x_t) - x_t)/d")
        print("  d     " + "".join(f"{'1/' + str(n):>9s}" for n in STEP_COUNTS))
        for name in models:
            print(f"  {name:8s}" + "".join(f"{errors[name][n]:9.4f}" for n in STEP_COUNTS))
        plot_exact(os.path.join(args.out, "exact.png"), errors, models, (path[0].float(), path[-1].float()))
        written.append("exact.png")
        if track is not None:
            metrics["exact_during_training"] = logs["shortcut"]["exact"]
            plot_exact_training(os.path.join(args.out, "exact_training.png"), logs["shortcut"]["exact"])
            written.append("exact_training.png")

    arrays = {"data": data, **{f"{name}_{n}": samples[name][n] for name in models for n in STEP_COUNTS}}
    write_atomic(os.path.join(args.out, "samples.npz"), lambda f: np.savez_compressed(f, **arrays))
    save_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"\ndone in {time.time() - start:.1f}s; wrote {', '.join(written)}, samples.npz, metrics.json to {args.out}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except OSError as e:       # a read-only --out, or a full disk while writing the outputs
        print(f"train_toy.py: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        sys.exit(2)
