"""The other training objectives of the paper's Table 1, as target builders.

Every row of Table 1 ("One Step Diffusion via Shortcut Models", Frans et al., ICLR 2025) is a
way to build regression targets for one network s(x_t, t, d): a builder draws the queries
(x_t, t, d) for a batch of data x1 and says what s should answer there, as a `Targets`
record (shortcut.py), and `shortcut.regress` does the rest. All builders share one signature,

    builder(model, x1, y=None, *, teacher=None, progress=0.0, **options) -> Targets,

where `progress` in [0, 1] is the share of training done (for the curricula) and `teacher` is
the frozen flow-matching model of the two-phase objectives. `make_targets(name, ...)` picks one
from the registry `OBJECTIVES`, which also says how each one samples.

The network is always told a step d whose meaning is right for its target: 0 (the velocity)
for flow matching, diffusion and reflow; 1 - t (the jump to the end) for the two consistency
objectives; the stage's d for progressive distillation; 1 for the reflow rows of live reflow.
So every row is a shortcut model trained on part of the (t, d) plane: consistency models are
shortcut models restricted to d = 1 - t, progressive distillation trains one d at a time, and
flow matching trains only d = 0.

Beyond the paper: `meanflow` (Geng et al. 2025), the continuous-time form of eq. 5, and the
option pair="ot" of every builder but reflow, which couples noise and data within a batch by
minibatch optimal transport (as in iSM, "Improved Training Technique for Shortcut Models").

Where these depart from the official builders (kvfrans/shortcut-models, targets_*.py):
* The official code ignores d ("ignore_dt") for everything but shortcut and live reflow; here
  each objective is told the d above, so one network and one sampler serve them all.
* Targets that need a network's own prediction (consistency training and distillation, live
  reflow) use the model itself under no_grad unless a teacher is passed; the official code
  uses the EMA (0.999), which exercise 8 shows lags badly in short runs.
* Consistency training's curriculum and progressive distillation's stages follow `progress`
  rather than a step counter; the same thing for a run of known length.
* Reflow is not in the official code. Here its pairs are generated per batch (fresh noise, 8
  Euler steps of the teacher's velocity, as live reflow makes its own) rather than once as a
  fixed data set: the same distribution of pairs, at 8 teacher forwards per step.
* Diffusion is the variance-preserving cosine path trained on its velocity and sampled by
  Euler on its probability-flow ODE (the reference notes' equivalent of the paper's row).
"""
import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from shortcut import (BOOTSTRAP_LEVELS, MAX_STEPS, Targets, bcast, check_batch, draw_noise, guided, interpolate, sample,
                      shortcut_targets, step_sizes, two_jumps)

REFLOW_STEPS = 8         # Euler steps of the teacher that make one reflow pair, as
LIVE_REFLOW_STEPS = 8    # live reflow makes its pairs with the model itself (official)


################################################################################
#                         One-phase objectives (from data)                     #
################################################################################

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
    check_batch(x1, y)
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
    check_batch(x1, y)
    k = consistency_level(progress if curriculum else 1.0)
    dt = 0.5 ** k
    x0 = draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) * 2 ** k) * dt
    t2 = t + dt
    with torch.no_grad():
        x_t2 = interpolate(x0, x1, t2)
        end = x_t2 + bcast(1 - t2, x1) * (model if teacher is None else teacher)(x_t2, t2, 1 - t2, y)
    x_t = interpolate(x0, x1, t)
    return Targets(x_t, t, 1 - t, y, (end - x_t) / bcast(1 - t, x1), len(x1))


def consistency_level(progress):
    """Consistency training's curriculum: the level k of its step dt = 2^-k at `progress`."""
    return min(int(progress * BOOTSTRAP_LEVELS), BOOTSTRAP_LEVELS - 1)


def live_reflow(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent", reflow_frac=1 / 8):
    """Live reflow (the paper's own one-phase alternative). A reflow_frac share of the rows:
    the model (or teacher) maps fresh noise x0 to x1_hat with 8 Euler steps of its velocity, and
    s(x_t, t, 1) <- sg[x1_hat - x0] at a random t on the line from x0 to x1_hat, told d = 1.
    The other rows are flow matching (paired by `pair`)."""
    tg = flow_matching(model, x1, y, pair=pair)
    n = round(reflow_frac * len(x1))
    if n == 0:
        return tg
    y_r = None if y is None else y[:n]
    x0 = torch.randn_like(x1[:n])
    with torch.no_grad():
        x1_hat = sample(model if teacher is None else teacher, x0, LIVE_REFLOW_STEPS, y_r, flow=True)
    t = torch.rand(n, device=x1.device)
    return Targets(torch.cat([interpolate(x0, x1_hat, t), tg.x_t[n:]]), torch.cat([t, tg.t[n:]]),
                   torch.cat([torch.ones_like(t), tg.d[n:]]), y, torch.cat([x1_hat - x0, tg.target[n:]]), n)


################################################################################
#                  Two-phase objectives (from a flow-matching teacher)         #
################################################################################

def consistency_distillation(model, x1, y=None, *, teacher, progress=0.0, pair="independent"):
    """Consistency distillation (Song et al. 2023). t on the grid {0..127}/128; the frozen
    flow-matching teacher takes one Euler step of h = 1/128 from x_t to x_t2, the network
    predicts the end point from there, x1_hat = x_t2 + (1 - t2) s(x_t2, t2, 1 - t2), and
    s(x_t, t, 1 - t) <- sg[(x1_hat - x_t) / (1 - t)]; the network is told d = 1 - t."""
    check_batch(x1, y)
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
    check_batch(x1, y)
    d = 0.5 ** (BOOTSTRAP_LEVELS - 1 - distillation_stage(progress))
    x0 = draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) / d) * d
    x_t, dd = interpolate(x0, x1, t), torch.full_like(t, d)
    with torch.no_grad():
        target = two_jumps(teacher, x_t, t, dd / 2, y, clip)
    return Targets(x_t, t, dd, y, target, len(x1))


def distillation_stage(progress):
    """Progressive distillation's stage j = 0 .. 6 at `progress`."""
    return min(int(progress * BOOTSTRAP_LEVELS), BOOTSTRAP_LEVELS - 1)


def new_stage(name, progress, next_progress):
    """True when `name` is progressive distillation and the next step starts a new stage:
    the training loop then copies the student into the teacher."""
    return name == "progressive-distillation" and distillation_stage(next_progress) != distillation_stage(progress)


def reflow(model, x1, y=None, *, teacher, progress=0.0, pair="independent"):
    """Reflow (Liu et al. 2023, rectified flow): the frozen flow-matching teacher maps fresh
    noise x0 to x1_hat = ODE(x0) (8 Euler steps), and a new model is flow-matched on the
    coupled pairs, s(x_t, t, 0) <- x1_hat - x0, whose straighter paths take fewer steps.
    The data batch x1 only sets the batch size: reflow sees data through its teacher, whose
    map is already its coupling, so pair="ot" has nothing to re-pair and is refused."""
    check_batch(x1, y)
    if pair != "independent":
        raise ValueError("reflow couples noise with its teacher's ODE image of it: pair='ot' has nothing to re-pair")
    x0 = torch.randn_like(x1)
    with torch.no_grad():
        x1_hat = sample(teacher, x0, REFLOW_STEPS, y, flow=True)
    t = torch.rand(len(x1), device=x1.device)
    return Targets(interpolate(x0, x1_hat, t), t, torch.zeros_like(t), y, x1_hat - x0, len(x1))


################################################################################
#                 Beyond the paper: MeanFlow, eq. 5 in continuous time         #
################################################################################

def meanflow(model, x1, y=None, *, teacher=None, progress=0.0, clip=4.0, pair="independent", meanflow_frac=0.25):
    """MeanFlow (Geng et al. 2025): eq. 5 in continuous time. s(x, t, d) is the average
    velocity over [t, t + d]; differentiating d s(x_t, t, d) = Phi_{t->t+d}(x_t) - x_t along the
    path with t + d held fixed gives s = v + d (v . grad_x s + d_t s - d_d s), and the target is
    its right side under stop-gradient with v = x1 - x0 (`meanflow_target`). Queries: a
    1 - meanflow_frac share of the rows has d = 0 (the target is then v: flow matching); in the
    rest, t and t + d are the smaller and larger of two uniforms, so t + d <= 1. Told d, any d
    in [0, 1]; sampled by the shortcut sampler."""
    check_batch(x1, y)
    B, n = len(x1), round(meanflow_frac * len(x1))
    x0 = draw_noise(x1, pair, y)
    a, b = torch.rand(B, device=x1.device), torch.rand(B, device=x1.device)
    t = torch.cat([torch.minimum(a, b)[:n], a[n:]])
    d = torch.cat([(a - b).abs()[:n], torch.zeros(B - n, device=x1.device)])
    x_t = interpolate(x0, x1, t)
    net = model if teacher is None else teacher
    return Targets(x_t, t, d, y, meanflow_target(net, x_t, t, d, x1 - x0, y, clip), n)


def meanflow_target(net, x_t, t, d, v, y=None, clip=None):
    """sg[v + d (v . grad_x s + d_t s - d_d s)] at (x_t, t, d): one forward-mode JVP of the
    network with tangent (v, 1, -1), clipped to +-clip like the shortcut's bootstrap targets
    (t enters the embedding scaled by 1000, so d_t s can be large early in training). The
    fused attention kernels have no forward-mode rule, so attention runs on the math kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, ds = torch.func.jvp(lambda x, t, d: net(x, t, d, y), (x_t, t, d),
                               (v, torch.ones_like(t), -torch.ones_like(d)))
    target = v + bcast(d, v) * ds
    return target if clip is None else target.clamp(-clip, clip)


################################################################################
#                                   Samplers                                   #
################################################################################

@torch.no_grad()
def sample_to_end(model, x0, steps, y=None, cfg_scale=1.0):
    """Euler with the jump to the end: x <- x + d s(x, t, 1 - t) for d = 1/N. For a network
    trained at d = 1 - t (consistency distillation) one step is its one-step map."""
    x, t = x0, 0.0
    for d in step_sizes(steps, off_grid=True):
        tt = torch.full((len(x0),), t, device=x0.device)
        x = x + d * guided(model, x, tt, 1 - tt, y, cfg_scale)
        t += d
    return x


@torch.no_grad()
def sample_multistep(model, x0, steps, y=None, cfg_scale=1.0):
    """The consistency models' multistep rule: predict the end x1_hat = x + (1 - t) s(x, t, 1 - t),
    then go back to t + d along a fresh noise draw eps: x <- (t + d) x1_hat + (1 - t - d) eps.
    If x ~ p_t and x1_hat is exact, the new x ~ p_{t+d} exactly, for any N."""
    x, t = x0, 0.0
    for d in step_sizes(steps, off_grid=True):
        tt = torch.full((len(x0),), t, device=x0.device)
        end = x + (1 - t) * guided(model, x, tt, 1 - tt, y, cfg_scale)
        x = (t + d) * end + (1 - t - d) * torch.randn_like(x)
        t += d
    return x


################################################################################
#                                   Registry                                   #
################################################################################

@dataclass(frozen=True)
class Objective:
    targets: Callable          # (model, x1, y=None, *, teacher, progress, **options) -> Targets
    sample: Callable           # (model, x0, steps, y=None, cfg_scale=1.0) -> x1
    told: str                  # the d the network is told: "0", "step" or "1 - t"
    two_phase: bool = False    # needs a trained flow-matching teacher


_velocity = partial(sample, flow=True)

OBJECTIVES = {
    "flow": Objective(flow_matching, _velocity, "0"),
    "shortcut": Objective(shortcut, sample, "step"),
    "consistency-training": Objective(consistency_training, sample_multistep, "1 - t"),
    "live-reflow": Objective(live_reflow, sample, "step"),
    "diffusion": Objective(diffusion, _velocity, "0"),
    "consistency-distillation": Objective(consistency_distillation, sample_to_end, "1 - t", two_phase=True),
    "progressive-distillation": Objective(progressive_distillation, sample, "step", two_phase=True),
    "reflow": Objective(reflow, _velocity, "0", two_phase=True),
    "meanflow": Objective(meanflow, sample, "step"),
}


def objective(name):
    """The registry entry of `name`; ValueError naming the choices if there is none."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def options_of(name, settings):
    """The entries of `settings` (a run's record, say) that the builder of `name` takes."""
    taken = [p.name for p in inspect.signature(objective(name).targets).parameters.values() if p.kind == p.KEYWORD_ONLY]
    return {k: v for k, v in settings.items() if k in taken and k not in ("teacher", "progress")}


def make_targets(name, model, x1, y=None, *, teacher=None, progress=0.0, **options):
    """The targets of objective `name` for a batch of data x1 (see the module docstring)."""
    obj = objective(name)
    if obj.two_phase and teacher is None:
        raise ValueError(f"{name} is a two-phase objective: it needs teacher=, a trained flow-matching model")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return obj.targets(model, x1, y, teacher=teacher, progress=progress, **options)
