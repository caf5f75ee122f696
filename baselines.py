"""The other training objectives of the paper's Table 1, and two successors (MeanFlow, AMED), as target builders.

Every row of Table 1 builds regression targets for one network s(x_t, t, d): a builder draws the queries for a batch of
data x1 and says what s should answer there, as a `shortcut.Targets` that `shortcut.regress` fits. All share the
signature builder(model, x1, y=None, *, teacher=None, progress=0.0, **options) -> Targets: `progress` in [0, 1] is the
share of training done (the curricula follow it, not a step count), `teacher` the frozen flow-matching model of the
two-phase objectives (for the others, an optional EMA copy to build the targets). Unlike the official code, which tells
only shortcut and live reflow their d, every objective is told the d its target means, so one network and one sampler
serve them all; `OBJECTIVES` says how each samples. Departures from the official builders: end of shortcut.py.
"""
import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from shortcut import (BOOTSTRAP_LEVELS, MAX_STEPS, Targets, bcast, draw_noise, guided, interpolate, jump, require,
                      sample, shortcut_targets, velocity)

PAIR_STEPS = 8     # Euler steps that make a (live) reflow pair: the official live reflow's


####################### One-phase objectives (from data) #######################

def flow_matching(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent"):
    """Flow matching (Lipman et al. 2023; Liu et al. 2023): s(x_t, t, 0) <- x1 - x0 with t ~ U[0, 1], told d = 0."""
    return shortcut_targets(model, x1, y, bootstrap_frac=0.0, pair=pair)


def shortcut(model, x1, y=None, *, teacher=None, progress=0.0, bootstrap_frac=0.25, clip=4.0, pair="independent",
             grounded=True, stop_grad=True, d_sampling="dyadic"):
    """Shortcut models (Frans et al. 2025), eqs. 4-5: shortcut.shortcut_targets with its options."""
    return shortcut_targets(model, x1, y, teacher=teacher, bootstrap_frac=bootstrap_frac, clip=clip, pair=pair,
                            grounded=grounded, stop_grad=stop_grad, d_sampling=d_sampling)


def diffusion(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent"):
    """A diffusion model on the variance-preserving cosine path (Nichol & Dhariwal 2021), x_t = cos(pi t/2) x0 +
    sin(pi t/2) x1, regressing its velocity dx_t/dt = (pi/2) (cos(pi t/2) x1 - sin(pi t/2) x0), told d = 0."""
    x0, t = draw_noise(x1, pair, y), torch.rand(len(x1), device=x1.device)
    a, b = bcast(torch.cos(math.pi / 2 * t), x1), bcast(torch.sin(math.pi / 2 * t), x1)
    return Targets(a * x0 + b * x1, t, torch.zeros_like(t), y, math.pi / 2 * (a * x1 - b * x0))


def consistency_training(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent", curriculum=True):
    """Consistency training (Song et al. 2023) as the official code builds it, over a curriculum that shrinks the
    step dt = 2^-k, k = floor(7 progress), from 1 to 1/64 (curriculum=False, an exercise: 1/64 throughout). With t
    on the multiples of dt and t2 = t + dt on the same (x0, x1) line, the network (or teacher) predicts the end
    point x1_hat = x_t2 + (1 - t2) s(x_t2, t2, 1 - t2), and s(x_t, t, 1 - t) <- sg[(x1_hat - x_t) / (1 - t)]."""
    dt, x0 = 0.5 ** stage(progress if curriculum else 1.0), draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) / dt) * dt
    x_t, t2 = interpolate(x0, x1, t), t + dt
    with torch.no_grad():
        x_t2 = interpolate(x0, x1, t2)
        end = x_t2 + bcast(1 - t2, x1) * (model if teacher is None else teacher)(x_t2, t2, 1 - t2, y)
    return Targets(x_t, t, 1 - t, y, (end - x_t) / bcast(1 - t, x1), len(x1))


def stage(progress):
    """The curricula's stage k = 0 .. 6: consistency training's step 2^-k, progressive distillation's 2^-(6-k)."""
    return min(int(progress * BOOTSTRAP_LEVELS), BOOTSTRAP_LEVELS - 1)


def live_reflow(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent"):
    """Live reflow (the paper's own one-phase alternative). An eighth of the rows, as officially: the model (or
    teacher) maps fresh noise x0 to x1_hat with 8 Euler steps of its velocity, and s(x_t, t, 1) <- sg[x1_hat - x0]
    at a random t on the line from x0 to x1_hat, told d = 1. The other rows are flow matching (paired by `pair`)."""
    tg, n = flow_matching(model, x1, y, pair=pair), round(len(x1) / 8)
    if n == 0:
        return tg
    x0, y_r = torch.randn_like(x1[:n]), None if y is None else y[:n]
    x1_hat = sample(model if teacher is None else teacher, x0, PAIR_STEPS, y_r, rule=velocity)  # no_grad in sample()
    t = torch.rand(n, device=x1.device)
    return Targets(torch.cat([interpolate(x0, x1_hat, t), tg.x_t[n:]]), torch.cat([t, tg.t[n:]]),
                   torch.cat([torch.ones_like(t), tg.d[n:]]), y, torch.cat([x1_hat - x0, tg.target[n:]]), n)


############# Two-phase objectives (from a flow-matching teacher) ##############

def consistency_distillation(model, x1, y=None, *, teacher, progress=0.0, clip=4.0, pair="independent"):
    """Consistency distillation (Song et al. 2023). t on the grid {0..127}/128; the frozen flow-matching teacher
    takes one Euler step of h = 1/128 from x_t to x_t2 (clipped to +-clip, as officially), the network predicts the
    end point x1_hat = x_t2 + (1 - t2) s(x_t2, t2, 1 - t2), and s(x_t, t, 1 - t) <- sg[(x1_hat - x_t) / (1 - t)]."""
    h, x0 = 1.0 / MAX_STEPS, draw_noise(x1, pair, y)
    t = torch.randint(MAX_STEPS, (len(x1),), device=x1.device) * h
    x_t, t2 = interpolate(x0, x1, t), t + h
    with torch.no_grad():
        x_t2 = (x_t + h * teacher(x_t, t, torch.zeros_like(t), y)).clamp(-clip, clip)
        end = x_t2 + bcast(1 - t2, x1) * model(x_t2, t2, 1 - t2, y)
    return Targets(x_t, t, 1 - t, y, (end - x_t) / bcast(1 - t, x1), len(x1))


def progressive_distillation(model, x1, y=None, *, teacher, progress=0.0, clip=4.0, pair="independent"):
    """Progressive distillation (Salimans & Ho 2022) in 7 stages: stage j trains the single step d = 2^-(6-j)
    (1/64 first, 1 last) on t in the multiples of d, told d, with eq. 5's target from two teacher jumps of d/2,
    s(x_t, t, d) <- sg[(s1 + s2) / 2], clipping only the intermediate point as officially. The loop starts the
    student as the flow-matching teacher and copies it into the teacher at each new stage (`new_stage`)."""
    d, x0 = 0.5 ** (BOOTSTRAP_LEVELS - 1 - stage(progress)), draw_noise(x1, pair, y)
    t = torch.floor(torch.rand(len(x1), device=x1.device) / d) * d
    x_t, h = interpolate(x0, x1, t), torch.full_like(t, d / 2)
    with torch.no_grad():
        s1 = teacher(x_t, t, h, y)
        s2 = teacher((x_t + d / 2 * s1).clamp(-clip, clip), t + h, h, y)
    return Targets(x_t, t, 2 * h, y, (s1 + s2) / 2, len(x1))


def new_stage(name, progress, next_progress):
    """True when the next step starts a new progressive-distillation stage: the loop then copies student to teacher."""
    return name == "progressive-distillation" and stage(next_progress) != stage(progress)


def reflow(model, x1, y=None, *, teacher, progress=0.0, pair="independent"):
    """Reflow (Liu et al. 2023, rectified flow): the frozen flow-matching teacher maps fresh noise x0 to
    x1_hat = ODE(x0) (8 Euler steps), and a new model is flow-matched on the coupled pairs, s(x_t, t, 0) <-
    x1_hat - x0, whose straighter paths take fewer steps. The data batch x1 only sets the batch size: reflow sees
    data through its teacher, whose map is already its coupling, so pair="ot" has nothing to re-pair: refused."""
    require(pair == "independent", "reflow pairs noise with its teacher's ODE image: pair='ot' has nothing to re-pair")
    x0 = torch.randn_like(x1)
    x1_hat = sample(teacher, x0, PAIR_STEPS, y, rule=velocity)       # no_grad in sample()
    t = torch.rand(len(x1), device=x1.device)
    return Targets(interpolate(x0, x1_hat, t), t, torch.zeros_like(t), y, x1_hat - x0, len(x1))


######## Beyond the paper: MeanFlow (eq. 5 in continuous time) and AMED ########

def meanflow(model, x1, y=None, *, teacher=None, progress=0.0, pair="independent", ratio=0.75):
    """MeanFlow (Geng et al. 2025) as its authors train it on CIFAR-10: eq. 5 in continuous time. s(x, t, d) is the
    average velocity over [t, t + d]; differentiating d s(x_t, t, d) = Phi_{t->t+d}(x_t) - x_t along the path with
    t + d fixed gives s = v + d (v . grad_x s + d_t s - d_d s), whose right side with v = x1 - x0 is the target (under
    sg, unclipped). Queries by the authors' sampler `v1` in their time tau = 1 - t: tau_t ~ sigmoid(N(-0.6, 1.6)),
    tau_r ~ sigmoid(N(-4, 1.6)), tau_r = tau_t with probability 1 - ratio, then tau_r = min(tau_t, tau_r): a jump
    from t = 1 - tau_t over d = tau_t - tau_r, ~30% of rows flow matching (d = 0, put last). The registry holds the
    rest: loss power 0.75, a plain mean, t unscaled, d told continuously ("gap")."""
    require(0 <= ratio <= 1, f"ratio must be in [0, 1], got {ratio}")
    B, dev, x0 = len(x1), x1.device, draw_noise(x1, pair, y)
    tau_t, tau_r = torch.sigmoid(torch.tensor([[-0.6], [-4.0]], device=dev) + 1.6 * torch.randn(2, B, device=dev))
    tau_r = torch.minimum(tau_t, torch.where(torch.rand(B, device=dev) < 1 - ratio, tau_t, tau_r))
    rows = torch.argsort((tau_r == tau_t).int(), stable=True)
    x0, x1, y, t, d = x0[rows], x1[rows], None if y is None else y[rows], 1 - tau_t[rows], (tau_t - tau_r)[rows]
    x_t = interpolate(x0, x1, t)
    target = meanflow_target(model if teacher is None else teacher, x_t, t, d, x1 - x0, y)
    return Targets(x_t, t, d, y, target, int((d > 0).sum()))


def meanflow_target(net, x_t, t, d, v, y=None):
    """sg[v + d (v . grad_x s + d_t s - d_d s)] at (x_t, t, d): one forward-mode JVP of the network with tangent
    (v, 1, -1), outside autocast as the authors run it; attention on the math kernel, as fused ones have no JVP."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast(x_t.device.type, enabled=False):
        _, ds = torch.func.jvp(lambda x, t, d: net(x, t, d, y), (x_t, t, d),
                               (v, torch.ones_like(t), -torch.ones_like(d)))
    return v + bcast(d, v) * ds


class AMED(torch.nn.Module):
    """AMED's step (Zhou et al., CVPR 2024) for a trained flow model, the solver's answer to a shortcut: an Euler step
    to u = t + r d, then the whole step with the velocity there, x <- x + c d v(x_u, u), 2 evaluations a step. A tiny
    network predicts r in (0, 1) and the scale c of each step from t, d and the RMS of x_t and of v(x_t, t) (published
    AMED reads the network's bottleneck features). It starts as the midpoint rule (r = 1/2, c = 1); `fit` trains it
    to land where 128 Euler steps of the flow land, only reading the flow. Sample with sampler(amed.step)."""

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
        """Trains the predictor on noise x0 (n, ...) over every step of N = 1, 2 and 4 steps, from the
        fine solution at t to the fine solution at t + d. Returns the last loss."""
        jumps = [(N, i) for N in counts for i in range(0, MAX_STEPS, MAX_STEPS // N)]     # every step of every N
        ones = torch.ones(len(x0), device=x0.device)
        with torch.no_grad():
            path = sample(flow, x0, MAX_STEPS, y, rule=velocity, trajectory=True)[1]       # (129, n, ...)
            v = {i: guided(flow, path[i], ones * i / MAX_STEPS, 0 * ones, y, 1.0) for i in {i for _, i in jumps}}
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        for _ in range(iters):
            rows = torch.randint(len(x0), (min(batch, len(x0)),), device=x0.device)
            yb, one = None if y is None else y[rows], ones[rows]
            loss = sum((self.step(flow, path[i][rows], one * i / MAX_STEPS, one / N, yb, v=v[i][rows])
                        - path[i + MAX_STEPS // N][rows]).pow(2).mean() / N for N, i in jumps)
            opt.zero_grad()
            loss.backward(inputs=list(self.net.parameters()))       # the flow's own .grad stays untouched
            opt.step()
        return float(loss.detach())


###################### The consistency models' step rules ######################

def to_end(model, x, t, d, y=None, w=1.0):
    """Euler with the jump to the end: x + d s(x, t, 1 - t). For a network trained at d = 1 - t
    (consistency distillation) one step is its one-step map."""
    return x + bcast(d, x) * guided(model, x, t, 1 - t, y, w)


def multistep(model, x, t, d, y=None, w=1.0):
    """The consistency models' multistep rule: predict the end x1_hat = x + (1 - t) s(x, t, 1 - t), then go back
    to t + d along fresh noise eps, (t + d) x1_hat + (1 - t - d) eps: ~ p_{t+d} if x ~ p_t and x1_hat is exact."""
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
    per_part: bool = True      # and how it weighs the rows (shortcut.regress)
    t_scale: float = 1000.0    # t's scale before its embedding, chosen by measurement (docs/RESULTS.md)
    d_embed: str = "level"     # how d is told (shortcut.Conditioning)


def sampler(rule):
    """`sample` by `rule`: only the shortcut's jumps must keep to the training grid of d, other rules take any split."""
    return partial(sample, rule=rule, off_grid=rule is not jump)


OBJECTIVES = {
    "flow": Objective(flow_matching, sampler(velocity), "0"),
    "shortcut": Objective(shortcut, sampler(jump), "step"),
    "consistency-training": Objective(consistency_training, sampler(multistep), "1 - t", t_scale=1.0),
    "live-reflow": Objective(live_reflow, sampler(jump), "step"),
    "diffusion": Objective(diffusion, sampler(velocity), "0"),
    "consistency-distillation": Objective(consistency_distillation, sampler(to_end), "1 - t", two_phase=True,
                                          t_scale=1.0),
    "progressive-distillation": Objective(progressive_distillation, sampler(jump), "step", two_phase=True),
    "reflow": Objective(reflow, sampler(velocity), "0", two_phase=True),
    "meanflow": Objective(meanflow, sampler(jump), "step", loss_power=0.75, per_part=False, t_scale=1.0, d_embed="gap"),
}


def defaults(name, **settings):
    """A run's settings with the objective's own loss power, t scale and d embedding where they are None."""
    own = {k: getattr(OBJECTIVES[name], k) for k in ("loss_power", "t_scale", "d_embed")}
    return {**settings, **{k: v for k, v in own.items() if settings.get(k) is None}}


def options_of(name, settings):
    """The entries of `settings` (a run's record, say) that the builder of `name` takes."""
    taken = set(inspect.getfullargspec(OBJECTIVES[name].targets).kwonlyargs) - {"teacher", "progress"}
    return {k: v for k, v in settings.items() if k in taken}


def make_targets(name, model, x1, y=None, *, teacher=None, progress=0.0, **options):
    """The targets of objective `name` for a batch of data x1 (see the module docstring)."""
    obj = OBJECTIVES[name]
    require(teacher is not None or not obj.two_phase, f"{name} is two-phase: it needs teacher=, a trained flow model")
    require(0 <= progress <= 1, f"progress must be in [0, 1], got {progress}")
    return obj.targets(model, x1, y, teacher=teacher, progress=progress, **options)
