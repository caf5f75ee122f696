"""Shortcut models on 2-D data: the paper's Figure 1 and Table 1 on a laptop CPU.

    python train_toy.py                      # 8 Gaussians on a ring, writes out/toy/
    python train_toy.py --seeds 3            # the same over 3 seeds: mean ± standard deviation
    python train_toy.py --objective consistency-training     # any objective of baselines.py
    python train_toy.py --table1             # every objective at one budget (about 5 minutes)

Trains a model by --objective and a flow-matching baseline with the same network, budget and seed (two-phase objectives
learn from it), samples both with 1 to 128 steps from the same noise and writes to --out: toy.md and .json (measures),
.npz (samples), .png, exact.png (against the exact flow), each model's checkpoint and record (--table1: table1.*)."""
import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import re
import time

import numpy as np
import torch

import baselines as B
from runs import (Interrupted, Parser, Record, TrainingDiverged, UserError, add_settings, as_count, as_positive,
                  check_outputs, checked, claim, cli, deferred_stop, load_checkpoint, refuse, setting, write_atomic)
from shortcut import MAX_STEPS, MLP, ema_update, regress

STEP_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128]


#################### Gaussian mixtures and their exact flow ####################

class GaussianMixture:
    """x1 ~ sum_k pi_k N(mu_k, Sigma_k), with the exact velocity and flow map of its path. Given k, x_t ~ N(t mu_k, C_k)
    with C_k(t) = (1-t)^2 I + t^2 Sigma_k, and E[x1 - x0 | x_t, k] = mu_k + (t Sigma_k - (1-t) I) C_k^-1 (x_t - t mu_k):
    the velocity mixes these by the posterior w_k ∝ pi_k N(x_t; t mu_k, C_k)."""

    def __init__(self, weights, means, covs):
        self.pi = (pi := torch.as_tensor(weights, dtype=torch.float64)) / pi.sum()
        self.mu, self.cov = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (means, covs))
        self.lam, self.U = torch.linalg.eigh(self.cov)          # mu, lam (K, D); cov, U (K, D, D)

    def sample(self, n, rng):
        """n points (float32), drawn by the numpy Generator rng."""
        k, z = rng.choice(len(self.pi), size=n, p=self.pi.numpy()), rng.standard_normal((n, self.mu.shape[1]))
        x = self.mu.numpy()[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(self.cov.numpy())[k], z)
        return x.astype(np.float32)

    def mahalanobis(self, x):
        """Squared Mahalanobis distances (n, K) of points x (n, D) from each component."""
        r = torch.as_tensor(np.asarray(x), dtype=torch.float64)[:, None] - self.mu
        return ((r[..., None, :] @ self.U)[..., 0, :] ** 2 / self.lam).sum(-1)

    def velocity(self, x, t):
        """v(x, t) in float64. C_k is diagonal in the eigenbasis U of Sigma_k: its solve and log-det are elementwise."""
        t = t.double()[:, None, None]                                                   # (B, 1, 1)
        r_u = ((x.double()[:, None] - t * self.mu)[..., None, :] @ self.U)[..., 0, :]  # U^T (x - t mu_k), (B, K, D)
        c = (1 - t) ** 2 + t ** 2 * self.lam                                            # eigenvalues of C_k
        gain = (t * self.lam - (1 - t)) / c                                             # of (t Sigma - (1-t) I) C^-1
        v_k = self.mu + ((gain * r_u)[..., None, :] @ self.U.mT)[..., 0, :]
        w = torch.softmax(torch.log(self.pi) - 0.5 * (r_u ** 2 / c + torch.log(c)).sum(-1), dim=1)     # (B, K)
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


def ring(n=8, radius=1.5, std=0.15):
    a = 2 * np.pi * np.arange(n) / n
    return GaussianMixture(np.ones(n), radius * np.stack([np.cos(a), np.sin(a)], 1), [std ** 2 * np.eye(2)] * n)


@functools.lru_cache(maxsize=None)
def mixture_paths(n=512):
    """n noise points on the ring's exact flow (fine RK4) at every multiple of 1/128, (129, n, 2): they follow p_t."""
    gm, path = ring(), [torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    for i in range(MAX_STEPS):
        path.append(gm.flow_map(path[-1], torch.full((n,), i / MAX_STEPS), 1 / MAX_STEPS))
    return torch.stack(path)


############################ Datasets and measures #############################

def sliced_w2(a, b, n_proj=512, seed=0):
    """Sliced Wasserstein-2 distance between two equal-sized point clouds."""
    theta = np.random.default_rng(seed).standard_normal((a.shape[1], n_proj))
    theta /= np.linalg.norm(theta, axis=0)
    return float(np.sqrt(((np.sort(a @ theta, axis=0) - np.sort(b @ theta, axis=0)) ** 2).mean()))


def off_mode_fraction(x, gm, k=3.0):
    """The share of points (non-finite ones too) more than k sigma from every mode: the smear between modes that sliced
    W2 hardly sees. Fresh 2-D data scores exp(-k^2/2), 1.1% for k = 3."""
    return float((~(gm.mahalanobis(x).min(1).values <= k * k)).double().mean())


def spread(x, gm):
    """How wide samples lie within their modes, which the off-mode share cannot see: tr(Sigma_k^-1 C_k) / D averaged
    over the modes k nearest to 10 finite samples or more (covariance C_k). Data: 1; shrunk by 1/2: 1/4; smeared > 1."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    x = x[torch.isfinite(x).all(1)]
    nearest = gm.mahalanobis(x).argmin(1)
    ratios = [torch.trace(torch.linalg.solve(gm.cov[k], torch.cov(x[nearest == k].T))) / x.shape[1]
              for k in range(len(gm.mu)) if (nearest == k).sum() >= 10]
    return float(torch.stack(ratios).mean()) if ratios else float("nan")


@torch.no_grad()
def exact_errors(model, path, told="step"):
    """RMS error of s(x_t, t, d) against the exact jump (x_{t+d} - x_t)/d on the true paths, for each d = 1/N. told is
    the d the model is told (baselines.Objective.told): "0", a flow model's velocity; "1 - t", the jump to the end."""
    n, errors = path.shape[1], {}
    for n_steps in STEP_COUNTS:
        stride, d = MAX_STEPS // n_steps, 1.0 / n_steps
        x_t, x_next = path[:-1:stride].reshape(-1, 2), path[stride::stride].reshape(-1, 2)
        t = (torch.arange(n_steps).repeat_interleave(n) * d).double()
        query, exact = (1 - t, (path[-1].repeat(n_steps, 1) - x_t) / (1 - t)[:, None]) if told == "1 - t" else \
            (torch.full_like(t, 0.0 if told == "0" else d), (x_next - x_t) / d)
        pred = model(x_t.float(), t.float(), query.float()).double()
        errors[n_steps] = float((pred - exact).pow(2).sum(1).mean().sqrt())
    return errors


def evaluate(models, x0, data, data_b, gm, path, seed=0):
    """Each model's samples (name -> (objective or "amed", model)) by NFE (AMED takes 2 a step) from the same noise x0
    and sampler seed, and their measures; no exact error for AMED, diffusion (cosine path) or reflow (own coupling)."""
    samples = {}
    for name, (kind, m) in models.items():
        sampler, nfe, m = (B.sampler(m[0].step), 2, m[1]) if kind == "amed" else (B.OBJECTIVES[kind].sample, 1, m)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            samples[name] = {nfe * n: sampler(m, x0, n).numpy() for n in STEP_COUNTS if nfe * n <= MAX_STEPS}
        bad = {n: int((~np.isfinite(x).all(1)).sum()) for n, x in samples[name].items()}
        if any(bad.values()):
            print(f"note: {name} gave non-finite samples, counted as off-mode: "
                  + ", ".join(f"{k} of {len(x0)} at {n} steps" for n, k in bad.items() if k))
    measures = {"off_mode": lambda x: off_mode_fraction(x, gm), "spread": lambda x: spread(x, gm),
                "sliced_w2": lambda x: sliced_w2(x, data)}
    metrics = {key: {"data": f(data_b), **{k: {n: f(x) for n, x in s.items()} for k, s in samples.items()}}
               for key, f in measures.items()}
    metrics["exact_error"] = {name: None if kind in ("amed", "diffusion", "reflow") else
                              exact_errors(m, path, B.OBJECTIVES[kind].told) for name, (kind, m) in models.items()}
    return samples, metrics


######################### The run record and training ##########################

@dataclasses.dataclass(frozen=True)
class Run(Record):
    """Every setting of a toy model, each with its flag; a checkpoint holds it (and its teacher's), --reuse compares."""
    width: int = setting(128, "MLP width (default: 128)", type=as_count)
    depth: int = setting(3, "MLP residual blocks (default: 3)", type=as_count)
    steps: int = setting(None, "training steps per model (default: 4000; 1600 with --table1)", type=as_count)
    batch_size: int = setting(512, "batch size (default: 512)", type=as_count)
    lr: float = setting(4e-3, "peak AdamW learning rate, cosine decay (default: 4e-3)", type=as_positive)
    grounded: bool = setting(True, "exercise 3: no targets at 2d = 1/64", flag="--ungrounded", action="store_false")
    stop_grad: bool = setting(True, "exercise 4: backprop through targets", flag="--no-stop-grad", action="store_false")
    d_sampling: str = setting("dyadic", "exercise 6: 2d on the grid or ~ U[1/64, 1]", choices=["dyadic", "uniform"])
    curriculum: bool = setting(True, "exercise 10: a fixed step of 1/64", flag="--no-curriculum", action="store_false")


def record(args, **changes):
    """The Run of the flags, some fields changed, and the objective's loss power and t scale if open."""
    settings = {**{f.name: getattr(args, f.name) for f in dataclasses.fields(Run) if f.name != "teacher"}, **changes}
    return Run(**B.defaults(settings["objective"], **settings))


def train(run, data, teacher=None, track=None, label=None):
    """One MLP and its log (loss parts, seconds, with track = (K, f) f(model) every K steps). The lr decays to 0, so
    the model itself is sampled, not an EMA; Ctrl-C or SIGTERM stops it after the step."""
    torch.manual_seed(run.seed)
    label = label or run.objective
    model = MLP(width=run.width, depth=run.depth, t_scale=run.t_scale, d_embed=run.d_embed)
    if run.objective == "progressive-distillation":       # the student starts as its teacher, which then changes
        model.load_state_dict(teacher.state_dict())
        teacher = copy.deepcopy(teacher)
    elif run.ema_teacher:
        teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / run.steps)))
    options, data = B.options_of(run.objective, dataclasses.asdict(run)), torch.as_tensor(data)
    log, t0, last = {"fm": [], "sc": [], "exact": {}}, time.time(), 0.0
    with deferred_stop() as stop:
        for step in range(run.steps):
            x1, progress = data[torch.randint(len(data), (run.batch_size,))], step / run.steps
            tg = B.make_targets(run.objective, model, x1, teacher=teacher, progress=progress, **options)
            loss, parts = regress(model, tg, run.loss_power, B.OBJECTIVES[run.objective].per_part, run.boot_power)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if run.ema_teacher:
                ema_update(teacher, model, 0.999)
            if B.new_stage(run.objective, progress, (step + 1) / run.steps):
                teacher.load_state_dict(model.state_dict())
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"{label}: the loss became {loss.item()} at step {step + 1}; lower --lr")
            log["fm"].append(parts["fm"].item())
            log["sc"].append(parts["sc"].item())
            if track is not None and ((step + 1) % track[0] == 0 or step == 0):
                log["exact"][step + 1] = track[1](model)
            if time.time() - last > 3 or step + 1 == run.steps:
                rate, last = (step + 1) / (time.time() - t0), time.time()
                print(f"  {label:24s} step {step + 1:6d}/{run.steps}  fm {log['fm'][-1]:.4f}  sc {log['sc'][-1]:.4f}"
                      f"  {rate:6.0f} it/s  ETA {(run.steps - step - 1) / rate:5.1f}s", flush=True)
            if stop:
                raise Interrupted(f"{stop[0]}: stopped {label} at step {step + 1}; the models trained before it "
                                  "are saved in --out, and --reuse reloads them", stop[0])
    if not all(p.isfinite().all() for p in model.parameters()):
        raise TrainingDiverged(f"{label}: the weights became non-finite (the loss was finite); lower --lr")
    log["seconds"] = time.time() - t0
    return model.eval(), log


def save_model(path, run, model, seconds):
    write_atomic(path, lambda f: torch.save({"run": dataclasses.asdict(run), "model": model.state_dict(),
                                             "seconds": seconds}, f))


def load_model(path):
    """(record, model, training seconds) of a toy checkpoint; UserError unless it is whole and finite."""
    run = (state := load_checkpoint(path, Run, "--reuse", "train_toy.py"))["run"]
    model = MLP(width=run.width, depth=run.depth, t_scale=run.t_scale, d_embed=run.d_embed)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not fit its record ({type(e).__name__})") from None
    return run, model.eval(), float(state["seconds"])


def obtain(args, run, name, train_data, teacher=None, track=None):
    """The model of `run` and its log: with --reuse from --out/NAME.pt if that holds the same record, else trained."""
    path = os.path.join(args.out, f"{name}.pt")
    if args.reuse and os.path.isfile(path):
        try:
            saved, model, seconds = load_model(path)
            if saved == run:
                return model, {"seconds": seconds}
            print(f"  {path} was trained with other settings: training {name} again")
        except UserError as e:
            print(f"  cannot reuse it ({e}): training {name} again")
    model, log = train(run, train_data, teacher, track, name)
    save_model(path, run, model, log["seconds"])
    return model, log


################################### Figures ####################################

def plot_samples(file, data, samples, counts, off):
    """A row per model, a column per step count and one of the data: samples over the data, with the off-mode share."""
    from matplotlib.figure import Figure
    lim, columns = np.abs(data).max() * 1.15, counts + ["data"]
    fig = Figure(figsize=(2.3 * len(columns), 2.3 * len(samples)), layout="tight")
    axes = fig.subplots(len(samples), len(columns), squeeze=False)
    for r, (model, per_n) in enumerate(samples.items()):
        for ax, n in zip(axes[r], columns):
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
            if n != "data" and n not in per_n:      # AMED takes 2 evaluations a step (no frame, but the row's name)
                ax.set_frame_on(False)
                continue
            ax.scatter(*data[:2000].T, s=1, color="k" if n == "data" else "0.85")
            if n != "data":
                ax.scatter(*per_n[n][:2000].T, s=1, alpha=0.4, color=f"C{r % 10}")
            title = "" if r else "data\n" if n == "data" else f"{n} step{'s' * (n > 1)}\n"
            ax.set_title(f"{title}{off['data'] if n == 'data' else off[model][n]:.1%} off-mode", fontsize=8)
        axes[r, 0].set_ylabel(model, fontsize=8)
    write_atomic(file, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_exact(file, errors, models, path, history):
    """Each model's error at every d and its one-step jumps against the exact flow, and the errors during training."""
    from matplotlib import collections, colormaps, figure
    fig = figure.Figure(figsize=(4.3 * (1 + len(models) + bool(history)), 4), layout="tight")
    axes = fig.subplots(1, 1 + len(models) + bool(history))
    if history:
        for i, n in enumerate(STEP_COUNTS):
            axes[-1].plot(list(history), [h[n] for h in history.values()], color=colormaps["viridis"](i / 7),
                          label=f"d = 1/{n}")
        axes[-1].set(yscale="log", xlabel="training step", title="the errors during training")
        axes[-1].legend(fontsize=7, ncol=2)
    x0, exact = path[0, :300].float(), path[-1, :300].float()
    for i, (ax, (name, (obj, model))) in enumerate(zip(axes[1:], models.items())):
        if errors[name] is not None:             # diffusion's cosine path has another flow map
            axes[0].plot(STEP_COUNTS, [errors[name][n] for n in STEP_COUNTS], "o-", label=name)
        with torch.no_grad():
            jump = x0 + model(x0, torch.zeros(len(x0)), torch.full((len(x0),), float(B.OBJECTIVES[obj].told != "0")))
        ax.add_collection(collections.LineCollection(torch.stack([exact, jump], 1).numpy(), color="r", lw=0.4))
        ax.scatter(*exact.T, s=4, color="0.5", label="exact Phi_{0->1}(x0)")
        ax.scatter(*jump.T, s=4, color=f"C{i}", label="x0 + s(x0, 0, 1)")
        ax.set(aspect="equal", xticks=[], yticks=[], title=f"{name}: one step of size 1 (red: error)")
        ax.legend(loc="lower left", fontsize=7)
    axes[0].set(xscale="log", yscale="log", xlabel="step size d", ylabel="RMS error against the exact jump")
    axes[0].set_xticks(STEP_COUNTS, [f"1/{n}" for n in STEP_COUNTS])
    axes[0].legend(fontsize=7)
    write_atomic(file, lambda f: fig.savefig(f, format="png", dpi=110))


##################################### Main #####################################

def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, Run)
    a = p.add_argument
    a("--seeds", type=as_count, default=1, help="seeds --seed, --seed + 1, ...: mean ± standard deviation")
    a("--no-baseline", action="store_true", help="do not train the flow-matching baseline beside the model")
    a("--table1", action="store_true", help="train every objective of the paper's Table 1 instead")
    a("--sweep", choices=["bootstrap-frac"], help="exercise 5: train at bootstrap fractions 1/16 .. 1/2 instead")
    a("--reuse", action="store_true", help="reload each model from its checkpoint in --out when its record matches")
    a("--track-exact", type=as_count, metavar="K", help="exercise 7: every K steps, the error against the exact flow")
    a("--n-samples", type=checked(int, lambda v: 20 <= v <= 10 ** 6, "from 20 to 10^6"),
      help="samples per step count (default: 4000; 3000 with --table1)")
    a("--out", default="out/toy", type=checked(str, bool, "a folder"), help="output folder (default: out/toy)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1600 if args.table1 else 4000)
    args.n_samples = args.n_samples or (3000 if args.table1 else 4000)
    rows = "--table1" if args.table1 else "--sweep" if args.sweep else None
    refuse(rows and args.objective != "shortcut", f"--objective: {rows} trains its own rows")
    refuse(args.sweep and args.bootstrap_frac != 0.25, "--bootstrap-frac: --sweep sets it row by row")
    refuse(args.table1 and (args.pair == "ot" or args.ema_teacher or args.boot_power), "--table1: --pair ot, "
           "--ema-teacher and --boot-power do not apply to every objective of the table")
    return args


FLOW = dict(objective="flow", pair="independent", boot_power=0.0)
file_name = functools.partial(re.sub, r"[^A-Za-z0-9-]+", "_")     # 'shortcut, robust loss' -> 'shortcut_robust_loss'
TABLE1 = [(name, dict(objective=name)) for name in B.OBJECTIVES] + [
    ("shortcut, robust loss", dict(objective="shortcut", loss_power=0.5)), ("AMED on flow", None),
    ("midpoint on flow", None)]
SWEEP = [(f"bootstrap 1/{n}", dict(objective="shortcut", bootstrap_frac=1 / n)) for n in (16, 8, 4, 2)]
MEASURES = [("off_mode", "share of samples more than 3 sigma from every mode", "{:.1%}"),
            ("spread", "spread within the modes, tr(Sigma^-1 C) / D: 1 is the data's, below 1 too tight", "{:.2f}"),
            ("sliced_w2", "sliced W2 to fresh data", "{:.3f}"),
            ("exact_error", "RMS error of s(x_t, t, d) against the exact jump, d = 1/NFE", "{:.3f}")]


def main(argv=None):
    """Every row's model for each seed, measured: STEM.md, .json, .npz, .png (of the first seed), toy: exact.png."""
    args = parse_args(argv)
    baseline = B.OBJECTIVES[args.objective].two_phase or not args.no_baseline and args.objective != "flow"
    stem = "table1" if args.table1 else "sweep" if args.sweep else "toy"
    rows = {"table1": TABLE1, "sweep": SWEEP, "toy": [(args.objective, {})] + [("flow", FLOW)] * baseline}[stem]
    counts, seeds = [1, 2, 4, 8, 128] if stem == "toy" else [1, 4, 128], range(args.seed, args.seed + args.seeds)
    out, run = functools.partial(os.path.join, args.out), dataclasses.asdict(record(args))
    with claim(args.out):
        check_outputs(args.out, f"{stem}.json", run)
        start, path = time.time(), mixture_paths()
        runs = [replicate(args, rows, seed, path) for seed in seeds]
        (models, history, data, samples, _), per_seed = runs[0], [r[-1] for r in runs]
        metrics = {"run": run, "seeds": list(seeds), **average(per_seed),
                   **({"per_seed": per_seed} if len(runs) > 1 else {})}
        if stem == "toy":
            plot_exact(out("exact.png"), per_seed[0]["exact_error"], models, path, history)
            metrics.update({"exact_during_training": history} if history else {})
        md = tables(metrics, counts, f"{stem}: ring, MLP {args.width}x{args.depth}, {args.steps} steps of "
                    f"batch {args.batch_size} per model (two-phase: plus their teacher's), seeds {list(seeds)}")
        print("\n" + md)
        write_atomic(out(f"{stem}.md"), lambda f: f.write(md.encode()))
        write_atomic(out(f"{stem}.json"), lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        arrays = {"data": data, **{f"{file_name(k)}_{n}": x for k, per_n in samples.items() for n, x in per_n.items()}}
        write_atomic(out(f"{stem}.npz"), lambda f: np.savez_compressed(f, **arrays))
        plot_samples(out(f"{stem}.png"), data, samples, counts, per_seed[0]["off_mode"])
    print(f"\ndone in {time.time() - start:.1f}s; wrote {stem}.md, .json, .npz, .png and checkpoints to {args.out}")
    return metrics


def replicate(args, rows, seed, path):
    """One seed: its models, the first row's errors during training (--track-exact), the data, the samples and their
    measures. The flow row's model is also the teacher of the two-phase rows and AMED's flow."""
    rng, gm, models, logs = np.random.default_rng(seed), ring(), {}, {}
    train_data, data, data_b = (gm.sample(n, rng) for n in (100_000, args.n_samples, args.n_samples))
    x0 = torch.randn(args.n_samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    suffix, flow, teacher = f"_seed{seed}" * (seed != args.seed), record(args, seed=seed, **FLOW), None
    for i, (row, changes) in enumerate(rows):
        run = record(args, seed=seed, **(FLOW if changes is None else changes))
        two_phase = B.OBJECTIVES[run.objective].two_phase
        track = (args.track_exact, lambda m: exact_errors(m, path)) \
            if args.track_exact and i == 0 and seed == args.seed else None
        if (run == flow or two_phase) and teacher is None:
            teacher = obtain(args, flow, "flow" + suffix, train_data, track=track if run == flow else None)
        if changes is None:           # the flow model, sampled by AMED's learned solver or by the midpoint rule
            t0 = time.time()
            with torch.random.fork_rng():         # the predictor trains as long as the models, up to 400 steps
                torch.manual_seed(seed)
                amed = B.AMED()                   # before its fit: the midpoint rule
                if row.startswith("AMED"):
                    amed.fit(teacher[0], torch.randn(args.n_samples, 2), iters=min(400, args.steps))
            models[row], logs[row] = ("amed", (amed, teacher[0])), {"seconds": time.time() - t0}
            continue
        model, logs[row] = teacher if run == flow else obtain(
            args, dataclasses.replace(run, teacher=flow if two_phase else None), file_name(row) + suffix, train_data,
            teacher[0] if two_phase else None, track)
        models[row] = (run.objective, model)
    samples, metrics = evaluate(models, x0, data, data_b, gm, path, seed)
    metrics["train_seconds"] = {row: log["seconds"] for row, log in logs.items()}
    return models, logs[rows[0][0]].get("exact"), data, samples, metrics


def average(values):
    """The mean over seeds of nested dicts of numbers (None where a seed has None)."""
    if isinstance(values[0], dict):
        return {k: average([v[k] for v in values]) for k in values[0]}
    return None if any(v is None for v in values) else float(np.mean(values))


def tables(metrics, counts, head):
    """A markdown table per measure, a row per model, a column per NFE; over seeds, mean ± standard deviation."""
    out = [head, ""]
    for key, title, fmt in MEASURES:
        ref = metrics[key].get("data")
        out += [title + (f" (data: {fmt.format(ref)})" if ref is not None else ""), "",
                "| NFE | " + " | ".join(map(str, counts)) + " |", "|---" * (len(counts) + 1) + "|"]
        for row in metrics["train_seconds"]:
            mean = metrics[key][row]
            cells = ["n/a" if mean is None or n not in mean else fmt.format(mean[n]) + (
                f" ± {fmt.format(np.std([m[key][row][n] for m in metrics['per_seed']], ddof=1))}"
                if "per_seed" in metrics else "") for n in counts]
            out += [f"| {row} | " + " | ".join(cells) + " |"]
        out += [""]
    seconds = ", ".join(f"{row} {s:.1f}" for row, s in metrics["train_seconds"].items())
    return "\n".join(out + [f"training seconds: {seconds}"]) + "\n"


if __name__ == "__main__":
    cli(main, "lower --batch-size or --n-samples")
