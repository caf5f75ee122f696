"""The other training objectives of the paper's Table 1, and two successors, as target builders.

Every row of Table 1 is a way to build regression targets for one network s(x_t, t, d): a
builder draws the queries (x_t, t, d) for a batch of data x1 and says what s should answer
there, as a `shortcut.Targets`, which `shortcut.regress` fits. All share one signature,

    builder(model, x1, y=None, *, teacher=None, progress=0.0, **options) -> Targets,

with `progress` in [0, 1] the share of training done (for the curricula) and `teacher` the frozen
flow-matching model of the two-phase objectives (for the others, an optional EMA copy that builds
the targets in the model's place). The registry `OBJECTIVES` also says how each one samples.
The network is always told the d its target means: 0 (the velocity) for flow matching, diffusion
and reflow; 1 - t (the jump to the end) for the consistency objectives; the stage's d for
progressive distillation; 1 for live reflow's reflow rows. Beyond the paper: MeanFlow (Geng et
al. 2025), eq. 5 in continuous time, and AMED, a learned solver for a flow model.

Where these depart from the official builders (kvfrans/shortcut-models, targets_*.py):
* The official code tells only shortcut and live reflow their d; here every objective is told
  its d, so one network and one sampler serve them all.
* Targets that need the network's own prediction use the model under no_grad unless a teacher
  is passed; the official code uses the EMA, which lags in short runs (exercise 8).
* The curricula follow `progress` rather than a step counter. Reflow (not in the official code)
  draws its pairs per batch (fresh noise, 8 Euler steps of the teacher): the same distribution.
* Diffusion is the variance-preserving cosine path, trained on its velocity and sampled by Euler
  on its probability-flow ODE.
"""
import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from shortcut import (BOOTSTRAP_LEVELS, MAX_STEPS, Targets, bcast, draw_noise, guided, interpolate, jump, sample,
                      shortcut_targets, two_jumps, velocity)

REFLOW_STEPS = 8         # Euler steps of the teacher that make one reflow pair
LIVE_REFLOW_STEPS = 8    # and of the model itself for live reflow's pairs (official)


####################### One-phase objectives (from data) #######################

def flow_matching(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent"):
    """Flow matching (Lipman et al. 2023; Liu et al. 2023): s(x_t, t, 0) <- x1 - x0 with
    t ~ U[0, 1]; the network is told d = 0, the velocity."""
    return shortcut_targets(model, x1, y, bootstrap_frac=0.0, pair=pair)


def shortcut(model, x1, y=None, *, teacher=None, progress=0.0, bootstrap_frac=0.25, clip=4.0, pair="independent",
             grounded=True, stop_grad=True, d_sampling="dyadic"):
    """Shortcut models (Frans et al. 2025), eqs. 4-5: shortcut.shortcut_targets, whose
    options these are (bootstrap_frac, clip, pair and the exercises' ablations)."""
    return shortcut_targets(model, x1, y, teacher=teacher, bootstrap_frac=bootstrap_frac, clip=clip, pair=pair,
                            grounded=grounded, stop_grad=stop_grad, d_sampling=d_sampling)


def diffusion(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent"):
    """A diffusion model on the variance-preserving cosine path (Nichol & Dhariwal 2021),
    x_t = cos(pi t/2) x0 + sin(pi t/2) x1, regressing its velocity
    dx_t/dt = (pi/2) (cos(pi t/2) x1 - sin(pi t/2) x0); the network is told d = 0."""
    x0, t = draw_noise(x1, pair, y), torch.rand(len(x1), device=x1.device)
    a, b = bcast(torch.cos(math.pi / 2 * t), x1), bcast(torch.sin(math.pi / 2 * t), x1)
    return Targets(a * x0 + b * x1, t, torch.zeros_like(t), y, math.pi / 2 * (a * x1 - b * x0))


def consistency_training(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent",
                         curriculum=True):
    """Consistency training (Song et al. 2023) as the official code builds it. A curriculum
    over training shrinks the step dt = 2^-k, k = floor(7 progress), from 1 to 1/64. With t on
    the multiples of dt and t2 = t + dt on the same (x0, x1) line, the network (or teacher)
    predicts the end point from x_t2: x1_hat = x_t2 + (1 - t2) s(x_t2, t2, 1 - t2). Target:
    s(x_t, t, 1 - t) <- sg[(x1_hat - x_t) / (1 - t)]; the network is told d = 1 - t.
    curriculum=False (an exercise) uses the final dt = 1/64 from the first step."""
    k = stage(progress if curriculum else 1.0)
    dt = 0.5 ** k
    x0 = draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) * 2 ** k) * dt
    t2 = t + dt
    with torch.no_grad():
        x_t2 = interpolate(x0, x1, t2)
        end = x_t2 + bcast(1 - t2, x1) * (model if teacher is None else teacher)(x_t2, t2, 1 - t2, y)
    x_t = interpolate(x0, x1, t)
    return Targets(x_t, t, 1 - t, y, (end - x_t) / bcast(1 - t, x1), len(x1))


def stage(progress):
    """The stage k = 0 .. 6 of the curricula at `progress`: consistency training's step is
    2^-k, and progressive distillation's stage k trains the step 2^-(6-k)."""
    return min(int(progress * BOOTSTRAP_LEVELS), BOOTSTRAP_LEVELS - 1)


def live_reflow(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent", reflow_frac=1 / 8):
    """Live reflow (the paper's own one-phase alternative). A reflow_frac share of the rows:
    the model (or teacher) maps fresh noise x0 to x1_hat with 8 Euler steps of its velocity, and
    s(x_t, t, 1) <- sg[x1_hat - x0] at a random t on the line from x0 to x1_hat, told d = 1.
    The other rows are flow matching (paired by `pair`)."""
    if not 0 <= reflow_frac <= 1:
        raise ValueError(f"reflow_frac must be in [0, 1], got {reflow_frac}")
    tg = flow_matching(model, x1, y, pair=pair)
    n = round(reflow_frac * len(x1))
    if n == 0:
        return tg
    y_r = None if y is None else y[:n]
    x0 = torch.randn_like(x1[:n])
    with torch.no_grad():
        x1_hat = sample(model if teacher is None else teacher, x0, LIVE_REFLOW_STEPS, y_r, rule=velocity)
    t = torch.rand(n, device=x1.device)
    return Targets(torch.cat([interpolate(x0, x1_hat, t), tg.x_t[n:]]), torch.cat([t, tg.t[n:]]),
                   torch.cat([torch.ones_like(t), tg.d[n:]]), y, torch.cat([x1_hat - x0, tg.target[n:]]), n)


############# Two-phase objectives (from a flow-matching teacher) ##############

def consistency_distillation(model, x1, y=None, *, teacher, progress=0.0, pair="independent"):
    """Consistency distillation (Song et al. 2023). t on the grid {0..127}/128; the frozen
    flow-matching teacher takes one Euler step of h = 1/128 from x_t to x_t2, the network
    predicts the end point from there, x1_hat = x_t2 + (1 - t2) s(x_t2, t2, 1 - t2), and
    s(x_t, t, 1 - t) <- sg[(x1_hat - x_t) / (1 - t)]; the network is told d = 1 - t."""
    h = 1.0 / MAX_STEPS
    x0 = draw_noise(x1, pair, y)
    t = torch.randint(MAX_STEPS, (len(x1),), device=x1.device) * h
    x_t, t2 = interpolate(x0, x1, t), t + h
    with torch.no_grad():
        x_t2 = x_t + h * teacher(x_t, t, torch.zeros_like(t), y)
        end = x_t2 + bcast(1 - t2, x1) * model(x_t2, t2, 1 - t2, y)
    return Targets(x_t, t, 1 - t, y, (end - x_t) / bcast(1 - t, x1), len(x1))


def progressive_distillation(model, x1, y=None, *, teacher, progress=0.0, clip=4.0, pair="independent"):
    """Progressive distillation (Salimans & Ho 2022) in 7 stages: stage j trains the single
    step d = 2^-(6-j) (1/64 first, 1 last) on t in the multiples of d, with the target the mean
    of two teacher jumps of d/2 (eq. 5's construction, clipped): s(x_t, t, d) <- sg[two jumps].
    The student starts as the flow-matching teacher, and at each new stage the teacher becomes
    a copy of the student (`new_stage`): the training loop does both. Told the stage's d."""
    d = 0.5 ** (BOOTSTRAP_LEVELS - 1 - stage(progress))
    x0 = draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) / d) * d
    x_t, dd = interpolate(x0, x1, t), torch.full_like(t, d)
    with torch.no_grad():
        target = two_jumps(teacher, x_t, t, dd / 2, y, clip)
    return Targets(x_t, t, dd, y, target, len(x1))


def new_stage(name, progress, next_progress):
    """True when `name` is progressive distillation and the next step starts a new stage:
    the training loop then copies the student into the teacher."""
    return name == "progressive-distillation" and stage(next_progress) != stage(progress)


def reflow(model, x1, y=None, *, teacher, progress=0.0, pair="independent"):
    """Reflow (Liu et al. 2023, rectified flow): the frozen flow-matching teacher maps fresh
    noise x0 to x1_hat = ODE(x0) (8 Euler steps), and a new model is flow-matched on the
    coupled pairs, s(x_t, t, 0) <- x1_hat - x0, whose straighter paths take fewer steps.
    The data batch x1 only sets the batch size: reflow sees data through its teacher, whose
    map is already its coupling, so pair="ot" has nothing to re-pair and is refused."""
    if pair != "independent":
        raise ValueError("reflow couples noise with its teacher's ODE image of it: pair='ot' has nothing to re-pair")
    x0 = torch.randn_like(x1)
    with torch.no_grad():
        x1_hat = sample(teacher, x0, REFLOW_STEPS, y, rule=velocity)
    t = torch.rand(len(x1), device=x1.device)
    return Targets(interpolate(x0, x1_hat, t), t, torch.zeros_like(t), y, x1_hat - x0, len(x1))


############# Beyond the paper: MeanFlow, eq. 5 in continuous time #############

def meanflow(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent", ratio=0.75,
             times="logit-normal"):
    """MeanFlow (Geng et al. 2025) as its authors train it on CIFAR-10: eq. 5 in continuous
    time. s(x, t, d) is the average velocity over [t, t + d]; differentiating
    d s(x_t, t, d) = Phi_{t->t+d}(x_t) - x_t along the path with t + d held fixed gives
    s = v + d (v . grad_x s + d_t s - d_d s), and the target is its right side under
    stop-gradient, with v = x1 - x0 (`meanflow_target`), not clipped. Queries: a `ratio` share
    of the rows has d > 0, the rest d = 0 (the target is then v: flow matching). The start and
    the end of each jump are the smaller and the larger of two times: times="logit-normal" draws
    them as sigmoid(N(0.6, 1.6)) and sigmoid(N(4, 1.6)), the official CIFAR-10 values in this
    project's direction of time; "uniform" as two uniforms. Its loss is the adaptive weight with
    p = 1 (the registry's loss_power). Told d, any d in [0, 1]; sampled by the shortcut sampler."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    B, n = len(x1), round(ratio * len(x1))
    x0 = draw_noise(x1, pair, y)
    if times == "logit-normal":
        mean = torch.tensor([[0.6], [4.0]], device=x1.device)
        a, b = torch.sigmoid(mean + 1.6 * torch.randn(2, B, device=x1.device))
    elif times == "uniform":
        a, b = torch.rand(2, B, device=x1.device)
    else:
        raise ValueError(f"times must be 'logit-normal' or 'uniform', got {times!r}")
    t = torch.minimum(a, b)
    d = torch.cat([(a - b).abs()[:n], torch.zeros(B - n, device=x1.device)])
    x_t = interpolate(x0, x1, t)
    return Targets(x_t, t, d, y, meanflow_target(model if teacher is None else teacher, x_t, t, d, x1 - x0, y), n)


def meanflow_target(net, x_t, t, d, v, y=None):
    """sg[v + d (v . grad_x s + d_t s - d_d s)] at (x_t, t, d): one forward-mode JVP of the
    network with tangent (v, 1, -1), outside autocast as the authors run it. The fused attention
    kernels have no forward-mode rule, so attention runs on the math kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast(x_t.device.type, enabled=False):
        _, ds = torch.func.jvp(lambda x, t, d: net(x, t, d, y), (x_t, t, d),
                               (v, torch.ones_like(t), -torch.ones_like(d)))
    return v + bcast(d, v) * ds


########## Beyond the paper: AMED, a learned solver for a flow model ###########

class AMED(torch.nn.Module):
    """AMED (Zhou et al., CVPR 2024): a sampler for a trained flow-matching model, the solver's
    answer to a shortcut. Each step from t to t + d first takes an Euler step to u = t + r d,
    then the whole step with the velocity there: x <- x + c d v(x_u, u), 2 network evaluations
    per step. This module is only the step predictor: a tiny network of r in (0, 1) and a scale
    c near 1 for each sample, from t, d and two cheap features of x_t, its RMS and that of
    v(x_t, t). Published AMED reads the network's bottleneck features instead. It starts as the
    midpoint rule (r = 1/2, c = 1), and `fit` trains it to land where the flow's own fine
    solution (128 Euler steps) lands at t + d; the flow itself is only read. Sample with
    sample(flow, x0, N, rule=amed.step). Whether one u per point can be exact is exercise 13 of
    docs/EXERCISES.md: along the ring's rays of symmetry only."""

    def __init__(self, width=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def step(self, flow, x, t, d, y=None, w=1.0, v=None):
        """One step of the flow from t to t + d (t, d of shape (B,)); v: the velocity at (x, t), if known."""
        v = guided(flow, x, t, torch.zeros_like(t), y, w) if v is None else v
        rms = lambda z: z.flatten(1).pow(2).mean(1).sqrt()            # noqa: E731
        r, c = self.net(torch.stack([t, d, rms(x), rms(v)], 1).to(self.net[0].weight.dtype)).to(x.dtype).unbind(1)
        r, c = torch.sigmoid(r), 1 + c
        return x + bcast(c * d, x) * guided(flow, x + bcast(r * d, x) * v, t + r * d, torch.zeros_like(t), y, w)

    def fit(self, flow, x0, y=None, counts=(1, 2, 4), iters=400, batch=512, lr=1e-2):
        """Trains the predictor on noise x0 (n, ...): every step of N = 1, 2 and 4 steps, from the
        flow's fine solution at t to the fine solution at t + d. Returns the last loss."""
        starts = sorted({i for N in counts for i in range(0, MAX_STEPS, MAX_STEPS // N)})
        ones = torch.ones(len(x0), device=x0.device)
        with torch.no_grad():
            path = sample(flow, x0, MAX_STEPS, y, rule=velocity, trajectory=True)[1]       # (129, n, ...)
            v = {i: guided(flow, path[i], ones * i / MAX_STEPS, 0 * ones, y, 1.0) for i in starts}
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        for _ in range(iters):
            rows = torch.randint(len(x0), (min(batch, len(x0)),), device=x0.device)
            yb, one = None if y is None else y[rows], ones[rows]
            loss = sum((self.step(flow, path[i][rows], one * i / MAX_STEPS, one / N, yb, v=v[i][rows])
                        - path[i + MAX_STEPS // N][rows]).pow(2).mean() / N
                       for N in counts for i in range(0, MAX_STEPS, MAX_STEPS // N))
            grads = torch.autograd.grad(loss, list(self.net.parameters()))    # the flow's own .grad stays untouched
            for p, g in zip(self.net.parameters(), grads):
                p.grad = g
            opt.step()
        return float(loss.detach())


###################### The consistency models' step rules ######################

def to_end(model, x, t, d, y=None, w=1.0):
    """Euler with the jump to the end: x + d s(x, t, 1 - t). For a network trained at d = 1 - t
    (consistency distillation) one step is its one-step map."""
    return x + bcast(d, x) * guided(model, x, t, 1 - t, y, w)


def multistep(model, x, t, d, y=None, w=1.0):
    """The consistency models' multistep rule: predict the end x1_hat = x + (1 - t) s(x, t, 1 - t),
    then go back to t + d along a fresh noise draw eps: (t + d) x1_hat + (1 - t - d) eps. If
    x ~ p_t and x1_hat is exact, the new x ~ p_{t+d} exactly, for any N."""
    end = x + bcast(1 - t, x) * guided(model, x, t, 1 - t, y, w)
    return bcast(t + d, x) * end + bcast(1 - t - d, x) * torch.randn_like(x)


################################### Registry ###################################

@dataclass(frozen=True)
class Objective:
    targets: Callable          # (model, x1, y=None, *, teacher, progress, **options) -> Targets
    sample: Callable           # (model, x0, steps, y=None, cfg_scale=1.0) -> x1
    told: str                  # the d the network is told: "0", "step" or "1 - t"
    two_phase: bool = False    # needs a trained flow-matching teacher
    loss_power: float = 0.0    # the robust loss its authors train with (shortcut.regress); 0 is the MSE
    t_scale: float = 1000.0    # t's scale before its embedding, chosen by measurement (docs/RESULTS.md)


def sampler(rule, off_grid=True):
    return partial(sample, rule=rule, off_grid=off_grid)


OBJECTIVES = {
    "flow": Objective(flow_matching, sampler(velocity), "0"),
    "shortcut": Objective(shortcut, sampler(jump, off_grid=False), "step"),
    "consistency-training": Objective(consistency_training, sampler(multistep), "1 - t", t_scale=1.0),
    "live-reflow": Objective(live_reflow, sampler(jump, off_grid=False), "step"),
    "diffusion": Objective(diffusion, sampler(velocity), "0"),
    "consistency-distillation": Objective(consistency_distillation, sampler(to_end), "1 - t", two_phase=True,
                                          t_scale=1.0),
    "progressive-distillation": Objective(progressive_distillation, sampler(jump, off_grid=False), "step",
                                          two_phase=True),
    "reflow": Objective(reflow, sampler(velocity), "0", two_phase=True),
    "meanflow": Objective(meanflow, sampler(jump, off_grid=False), "step", loss_power=1.0, t_scale=1.0),
}


def defaults(name, **settings):
    """A run's settings with the objective's own loss power and t scale where they are None."""
    own = {k: getattr(OBJECTIVES[name], k) for k in ("loss_power", "t_scale")}
    return {**settings, **{k: v for k, v in own.items() if settings.get(k) is None}}


def options_of(name, settings):
    """The entries of `settings` (a run's record, say) that the builder of `name` takes."""
    taken = [p.name for p in inspect.signature(OBJECTIVES[name].targets).parameters.values()
             if p.kind == p.KEYWORD_ONLY]
    return {k: v for k, v in settings.items() if k in taken and k not in ("teacher", "progress")}


def make_targets(name, model, x1, y=None, *, teacher=None, progress=0.0, **options):
    """The targets of objective `name` for a batch of data x1 (see the module docstring)."""
    obj = OBJECTIVES[name]
    if obj.two_phase and teacher is None:
        raise ValueError(f"{name} is a two-phase objective: it needs teacher=, a trained flow-matching model")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return obj.targets(model, x1, y, teacher=teacher, progress=progress, **options)
