"""The specification of shortcut models, as tests: closed-form flows, exact identities, what the
loss asks of the network, the sampler, every objective of Table 1, then the scripts.

    python -m pytest -q -m "not slow" test_shortcut.py   # the method, in closed form (seconds)
    python -m pytest -q test_shortcut.py                  # and the scripts, training and faults

Tests marked slow train a model or run a script.
"""
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

import baselines as B
import images
import shortcut as S
import train_images as ti
import train_toy as toy

torch.set_default_dtype(torch.float32)
slow = pytest.mark.slow


################################################################################
#                            Ground truth, in closed form                      #
################################################################################

class GaussianShortcut(torch.nn.Module):
    """The exact shortcut for x1 ~ N(mu, s^2 I): Phi_{t->t+d}(x) = (t+d) mu + sigma(t+d)/sigma(t) (x - t mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 + t ** 2 * self.s ** 2)

    def flow(self, x, t, d):
        t, d = t.double()[:, None], d.double()[:, None]
        return (t + d) * self.mu + self.sigma(t + d) / self.sigma(t) * (x.double() - t * self.mu)

    def velocity(self, x, t):
        t = t.double()[:, None]
        dsigma = (t * self.s ** 2 - (1 - t)) / self.sigma(t)
        return self.mu + dsigma / self.sigma(t) * (x.double() - t * self.mu)

    def forward(self, x, t, d, y=None):
        safe_d = torch.where(d > 0, d, torch.ones_like(d)).double()
        jump = (self.flow(x, t, safe_d) - x.double()) / safe_d[:, None]
        return torch.where((d > 0)[:, None], jump, self.velocity(x, t)).to(x.dtype)


class MixtureShortcut(torch.nn.Module):
    """The exact shortcut (Phi_{t->t+d}(x) - x)/d of a train_toy.GaussianMixture, the velocity at
    d = 0. Phi is RK4 on a grid of step h: a discrete flow that still composes exactly on its grid."""

    def __init__(self, gm, h=1.0 / 128):
        super().__init__()
        self.gm, self.h = gm, h

    def forward(self, x, t, d, y=None):
        out = torch.empty_like(x, dtype=torch.float64)
        for dv in torch.unique(d).tolist():
            rows = d == dv
            xr, tr = x[rows], t[rows]
            out[rows] = self.gm.velocity(xr, tr) if dv == 0 else \
                (self.gm.flow_map(xr, tr, dv, self.h) - xr.double()) / dv
        return out.to(x.dtype)


def gaussian_as_mixture(mu, s):
    return toy.GaussianMixture([1.0], [mu], [s ** 2 * np.eye(len(mu))])


MU, SCALE = [0.7, -1.2], 0.6


def exact_models():
    """The Gaussian case checks the continuous identity (a closed form); the mixture case is RK4
    on the grid of 1/128, whose discrete flow composes exactly on that grid by construction, so
    it checks the code's bookkeeping of t and d on a non-Gaussian field."""
    return {"gaussian": GaussianShortcut(MU, SCALE), "mixture": MixtureShortcut(toy.skewed_mixture())}


def test_mixture_velocity_and_flow_match_the_gaussian_closed_form():
    g, gm = GaussianShortcut(MU, SCALE), gaussian_as_mixture(MU, SCALE)
    x, t = torch.randn(500, 2, dtype=torch.float64), torch.rand(500, dtype=torch.float64)
    torch.testing.assert_close(gm.velocity(x, t), g.velocity(x, t), rtol=0, atol=1e-12)
    t0 = torch.full((500,), 0.25, dtype=torch.float64)
    phi = gm.flow_map(x, t0, 0.5)                               # RK4, h = 1/1024
    torch.testing.assert_close(phi, g.flow(x, t0, torch.full_like(t0, 0.5)), rtol=0, atol=1e-10)


def test_mixture_flow_transports_noise_to_data():
    """Phi_{0->1} of noise lands in the ring's modes with their weights and spread."""
    gm, n = toy.ring(), 20_000
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = gm.flow_map(x0, torch.zeros(n), 1.0, h=1 / 64)
    nearest = torch.cdist(x1, gm.mu).argmin(1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert torch.all((counts - n / 8).abs() < 4 * math.sqrt(n / 8 * 7 / 8))
    spread = (x1 - gm.mu[nearest]).std(0)
    torch.testing.assert_close(spread, torch.full((2,), 0.15, dtype=torch.float64), rtol=0.03, atol=0)


################################################################################
#                          The self-consistency identity                       #
################################################################################

@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_step_doubling_holds_for_the_exact_shortcut(kind):
    """s(x,t,2d) = [s(x,t,d) + s(x + d s(x,t,d), t+d, d)] / 2 for the exact shortcut (eq. 5)."""
    model = exact_models()[kind]
    x = 1.5 * torch.randn(256, 2, dtype=torch.float64)
    for d in [1 / 128, 1 / 16, 1 / 4, 1 / 2]:
        for t0 in [0.0, 0.25, 1 - 2 * d]:
            t, dd = torch.full((256,), t0), torch.full((256,), d)
            s1 = model(x, t, dd)
            s2 = model(x + d * s1, t + d, dd)
            torch.testing.assert_close(model(x, t, 2 * dd), (s1 + s2) / 2, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_step_doubling_loss_vanishes_for_the_exact_shortcut_only(kind):
    model = exact_models()[kind]
    x1 = torch.as_tensor(toy.skewed_mixture().sample(512, np.random.default_rng(0)))
    if kind == "gaussian":
        x1 = torch.tensor(MU, dtype=torch.float64) + SCALE * torch.randn(512, 2, dtype=torch.float64)
    loss, info = S.shortcut_loss(model, x1, bootstrap_frac=1.0, clip=None)
    assert info["sc"] < 1e-16 and math.isnan(info["fm"])

    class Wrong(torch.nn.Module):       # exact, plus an error that grows with the level
        def forward(self, x, t, d, y=None):
            return model(x, t, d) + 0.1 * S.step_level(d)[:, None].double()

    _, info = S.shortcut_loss(Wrong(), x1, bootstrap_frac=1.0, clip=None)
    assert info["sc"] > 0.005     # the targets sit one level finer: an error of about 0.1


def test_flow_matching_loss_equals_the_irreducible_loss():
    """With bootstrap_frac=0 and the exact velocity, the loss is E_t[s^2 / sigma(t)^2] per element."""
    torch.manual_seed(0)
    for s in (1.0, 0.5):
        model = GaussianShortcut([0.3, -0.8], s)
        x1 = model.mu + s * torch.randn(400_000, 2, dtype=torch.float64)
        loss, info = S.shortcut_loss(model, x1, bootstrap_frac=0.0)
        t = np.linspace(0, 1, 200_001)
        expected = np.trapezoid(s ** 2 / ((1 - t) ** 2 + t ** 2 * s ** 2), t)
        if s == 1.0:
            assert expected == pytest.approx(math.pi / 2, rel=1e-9)
        assert loss.item() == pytest.approx(expected, rel=0.01)
        assert info["fm"] == pytest.approx(loss.item()) and math.isnan(info["sc"])


################################################################################
#                            What shortcut_loss asks                           #
################################################################################

class Spy(torch.nn.Module):
    """Records every query; answers zero."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, d, y=None):
        self.calls.append((x.detach().clone(), t.clone(), d.clone()))
        return x * self.w


def test_loss_queries_are_grounded_and_on_the_grid():
    torch.manual_seed(0)
    spy = Spy()
    S.shortcut_loss(spy, torch.randn(700, 2), bootstrap_frac=0.25)
    (_, t1, d1), (_, t2, d2), (_, t, dq) = spy.calls          # teacher, teacher, student
    n_sc = 175
    d2x = dq[:n_sc]
    torch.testing.assert_close(d1, d2x / 2)
    torch.testing.assert_close(t2, t1 + d1)
    # every big step 1, 1/2, ..., 1/64 is a target, spread evenly over the bootstrap rows
    assert sorted(set(d2x.tolist())) == [2.0 ** -k for k in range(6, -1, -1)]
    per_level = np.bincount((-torch.log2(d2x)).long().numpy())
    assert per_level.max() - per_level.min() <= 1
    # t on the grid of multiples of 2d, and t + 2d <= 1
    assert torch.all(torch.remainder(t[:n_sc], d2x) == 0) and torch.all(t[:n_sc] + d2x <= 1)
    # the finest targets query the flow-matching level: grounded
    assert torch.all(S.step_level(d1.min()[None]) == S.step_level(torch.zeros(1)))
    assert torch.all(dq[n_sc:] == 0)


def test_loss_is_the_batch_weighted_mean_of_its_parts():
    torch.manual_seed(0)
    model = S.MLP()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    loss, info = S.shortcut_loss(model, torch.randn(64, 2), bootstrap_frac=0.25)
    assert loss.item() == pytest.approx((16 * info["sc"] + 48 * info["fm"]) / 64, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_targets_come_from_the_teacher_without_gradient():
    torch.manual_seed(0)
    student, teacher = Spy(), Spy()
    loss, _ = S.shortcut_loss(student, torch.randn(64, 2), teacher=teacher, bootstrap_frac=0.5)
    assert len(teacher.calls) == 2 and len(student.calls) == 1
    loss.backward()
    assert teacher.w.grad is None and student.w.grad is not None


def test_targets_are_clipped():
    class Big(torch.nn.Module):
        def forward(self, x, t, d, y=None):
            return torch.full_like(x, 10.0)
    loss, info = S.shortcut_loss(Big(), torch.zeros(8, 3), bootstrap_frac=1.0, clip=4.0)
    assert info["sc"] == pytest.approx(36.0)          # (10 - 4)^2


def test_the_robust_loss_weighs_rows_within_each_part():
    """loss_power = 0 is the MSE; p > 0 divides each row's summed error e by (e + 1e-3)^p and
    normalises the weights within the bootstrap rows and within the data rows, so that each part
    keeps its batch share however small its errors are."""
    targets = S.Targets(torch.zeros(6, 3), torch.zeros(6), torch.zeros(6), None, torch.zeros(6, 3), n_boot=2)
    err = torch.tensor([1e-6, 4e-6, 0.5, 1.0, 2.0, 3.0])
    assert S.loss_of(err, targets) == err.mean()
    for p in (0.5, 1.0):
        w = (3 * err + 1e-3) ** -p
        parts = [(w[:2] @ err[:2]) / w[:2].sum() * 2, (w[2:] @ err[2:]) / w[2:].sum() * 4]
        torch.testing.assert_close(S.loss_of(err, targets, p), sum(parts) / 6)
    grad = torch.func.grad(lambda e: S.loss_of(e, targets, 1.0))(err)
    torch.testing.assert_close(grad[:2].sum(), torch.tensor(2 / 6))    # the bootstrap rows' share of the gradient
    w = (3 * err + 1e-3) ** -1.0
    assert w[:2].sum() / w.sum() > 0.99             # which one weighting over the whole batch gives them


################################################################################
#                                   Sampler                                    #
################################################################################

@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_exact_shortcut_sampler_lands_on_the_flow_map_for_every_N(kind):
    model = exact_models()[kind]
    x0 = torch.randn(200, 2, dtype=torch.float64)
    if kind == "gaussian":
        target = model.flow(x0, torch.zeros(200), torch.ones(200))
    else:
        target = model.gm.flow_map(x0, torch.zeros(200), 1.0, h=1 / 128)
    for n in [1, 2, 4, 8, 16, 32, 64, 128]:
        torch.testing.assert_close(S.sample(model, x0, n), target, rtol=0, atol=1e-9)
    torch.testing.assert_close(S.sample(model, x0, [0.5, 0.25, 0.25]), target, rtol=0, atol=1e-9)


def test_flow_sampling_converges_at_first_order():
    model = GaussianShortcut(MU, SCALE)
    x0 = torch.randn(1000, 2, dtype=torch.float64)
    exact = model.flow(x0, torch.zeros(1000), torch.ones(1000))
    errors = [(S.sample(model, x0, n, flow=True) - exact).norm(dim=1).mean().item() for n in (8, 16, 32, 64)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_trajectory_and_guidance():
    model = GaussianShortcut(MU, SCALE)
    x0 = torch.randn(10, 2, dtype=torch.float64)
    x1, path = S.sample(model, x0, 4, trajectory=True)
    assert path.shape == (5, 10, 2)
    torch.testing.assert_close(path[0], x0)
    torch.testing.assert_close(path[-1], x1)

    class ByClass(torch.nn.Module):     # s = y (the null class, 3, gives 3)
        num_classes = 3

        def forward(self, x, t, d, y=None):
            return y[:, None].to(x.dtype).expand_as(x)
    y = torch.tensor([0, 1, 2])
    out = S.sample(ByClass(), torch.zeros(3, 2), 1, y=y, cfg_scale=2.0)
    torch.testing.assert_close(out[:, 0], 3 + 2.0 * (y.float() - 3))    # s_u + w (s_c - s_u)


@pytest.mark.parametrize("steps", [3, 256, 0, 6, 2.0, [0.5, 0.3, 0.2], [0.5, 0.25], [0.25, 0.5, 0.25],
                                   [0.5, float("nan"), 0.5]])
def test_sampler_refuses_steps_off_the_grid(steps):
    with pytest.raises(ValueError, match="power|finite"):
        S.sample(S.MLP(), torch.randn(4, 2), steps)


def test_off_grid_steps_need_the_keyword_and_are_exact_for_the_exact_model():
    """[1/4, 1/2, 1/4] queries d = 1/2 at t = 1/4, which no training query reaches: refused on
    the grid. The exact shortcut is right everywhere, so off_grid lands on the flow map."""
    model = GaussianShortcut(MU, SCALE)
    x0 = torch.randn(200, 2, dtype=torch.float64)
    target = model.flow(x0, torch.zeros(200), torch.ones(200))
    with pytest.raises(ValueError, match="off the training grid"):
        S.sample(model, x0, [0.25, 0.5, 0.25])
    for steps in ([0.25, 0.5, 0.25], [0.3, 0.7], 3):         # t = 0.3 is rounded to float32: 1e-7
        torch.testing.assert_close(S.sample(model, x0, steps, off_grid=True), target, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        S.sample(model, x0, [0.5, float("nan"), 0.5], off_grid=True)


################################################################################
#           Table 1: every objective as a target builder (baselines.py)         #
################################################################################

class CosineGaussian(torch.nn.Module):
    """The exact velocity of the cosine path x_t = cos(pi t/2) x0 + sin(pi t/2) x1 for
    x1 ~ N(mu, s^2 I): x_t ~ N(b mu, sigma^2), sigma^2 = a^2 + b^2 s^2, v = b' mu + sigma'/sigma (x - b mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), s

    def coefficients(self, t):
        a, b = torch.cos(math.pi / 2 * t.double())[:, None], torch.sin(math.pi / 2 * t.double())[:, None]
        return a, b, torch.sqrt(a ** 2 + b ** 2 * self.s ** 2)

    def flow(self, x, t, d):
        a, b, sigma = self.coefficients(t)
        _, b2, sigma2 = self.coefficients(t + d)
        return b2 * self.mu + sigma2 / sigma * (x.double() - b * self.mu)

    def forward(self, x, t, d, y=None):
        a, b, sigma = self.coefficients(t)
        da, db = -math.pi / 2 * b, math.pi / 2 * a
        dsigma = (a * da + b * db * self.s ** 2) / sigma
        return (db * self.mu + dsigma / sigma * (x.double() - b * self.mu)).to(x.dtype)


def gaussian_batch(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(MU, dtype=torch.float64) + SCALE * torch.randn(n, 2, dtype=torch.float64, generator=g)


def test_the_registry_holds_every_row_of_table_1():
    assert set(B.OBJECTIVES) == {"flow", "shortcut", "consistency-training", "consistency-distillation",
                                 "progressive-distillation", "reflow", "live-reflow", "diffusion", "meanflow"}
    assert {n for n, o in B.OBJECTIVES.items() if o.two_phase} == {"consistency-distillation",
                                                                    "progressive-distillation", "reflow"}
    for name in ("consistency-distillation", "progressive-distillation", "reflow"):
        with pytest.raises(ValueError, match=name):
            B.make_targets(name, S.MLP(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="unknown objective"):
        B.make_targets("distillation", S.MLP(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="progress"):
        B.make_targets("shortcut", S.MLP(), torch.randn(4, 2), progress=1.5)
    settings = {"bootstrap_frac": 0.5, "pair": "ot", "lr": 1e-3, "model": "XS", "teacher": None}
    assert B.options_of("shortcut", settings) == {"bootstrap_frac": 0.5, "pair": "ot"}
    assert B.options_of("reflow", settings) == {"pair": "ot"} and B.options_of("diffusion", {"clip": 4.0}) == {}


def test_shortcut_and_progressive_distillation_targets_are_the_exact_jump():
    """With the exact Gaussian shortcut as model and teacher, two jumps of d are one of 2d."""
    exact, x1 = GaussianShortcut(MU, SCALE), gaussian_batch()
    torch.manual_seed(0)
    tg = S.shortcut_targets(exact, x1, bootstrap_frac=0.5, clip=None)
    n = tg.n_boot
    assert n == 256
    torch.testing.assert_close(tg.target[:n], exact(tg.x_t, tg.t, tg.d)[:n], rtol=0, atol=1e-9)
    for progress in np.linspace(0, 1, 8):
        tg = B.make_targets("progressive-distillation", exact, x1, teacher=exact, progress=progress, clip=None)
        torch.testing.assert_close(tg.target, exact(tg.x_t, tg.t, tg.d), rtol=0, atol=1e-9)


def test_consistency_distillation_target_is_the_exact_jump_to_order_h():
    """One Euler step of h = 1/128 by the teacher, then the exact jump to the end: the target
    misses the exact s(x_t, t, 1 - t) by O(h^2) / (1 - t) = O(h) at worst."""
    exact, x1 = GaussianShortcut(MU, SCALE), gaussian_batch(4096)
    torch.manual_seed(0)
    tg = B.make_targets("consistency-distillation", exact, x1, teacher=exact)
    torch.testing.assert_close(tg.d, 1 - tg.t)
    err = (tg.target - exact(tg.x_t, tg.t, tg.d)).abs().max(1).values
    h = 1 / 128                              # measured: err (1 - t) <= 7.7 h^2, err <= 2.5 h
    assert (err * (1 - tg.t)).max() < 10 * h ** 2 and err.max() < 4 * h, (err.max(), err.mean())
    assert err.max() > 1e-6                  # not exact: the teacher's Euler step is an approximation


def test_query_grids_and_curricula():
    x1 = gaussian_batch(2048)
    for progress in np.linspace(0, 1, 15):
        k = min(int(progress * 7), 6)
        tg = B.make_targets("consistency-training", S.MLP().double(), x1, progress=progress)
        dt = 0.5 ** k                                            # 1, 1/2, ..., 1/64 as training goes on
        assert torch.all(torch.remainder(tg.t, dt) == 0) and tg.t.max() <= 1 - dt
        torch.testing.assert_close(tg.d, 1 - tg.t)
        tg = B.make_targets("progressive-distillation", S.MLP().double(), x1, teacher=S.MLP().double(),
                            progress=progress)
        d = 2.0 ** (k - 6)                                       # stage j trains d = 2^-(6-j): 1/64 first
        assert torch.all(tg.d == d) and torch.all(torch.remainder(tg.t, d) == 0) and tg.t.max() <= 1 - d
    stages = [i for i in range(700) if B.new_stage("progressive-distillation", i / 700, (i + 1) / 700)]
    assert stages == [99, 199, 299, 399, 499, 599]               # the teacher is refreshed 6 times
    assert not any(B.new_stage("shortcut", i / 700, (i + 1) / 700) for i in range(700))
    for name in ("flow", "diffusion", "reflow"):                 # velocity objectives are told d = 0
        tg = B.make_targets(name, S.MLP().double(), x1, teacher=S.MLP().double())
        assert torch.all(tg.d == 0)
    tg = B.make_targets("live-reflow", S.MLP().double(), x1)
    assert tg.n_boot == 256 and torch.all(tg.d[:256] == 1) and torch.all(tg.d[256:] == 0)


def test_diffusion_targets_are_the_velocity_of_the_cosine_path():
    torch.manual_seed(0)
    x1 = gaussian_batch(64)
    tg = B.make_targets("diffusion", S.MLP().double(), x1)
    a, b = torch.cos(math.pi / 2 * tg.t)[:, None], torch.sin(math.pi / 2 * tg.t)[:, None]
    x0 = (tg.x_t - b * x1) / a                                  # the noise the builder drew
    h, t = 1e-6, tg.t.double()
    path = lambda t: torch.cos(math.pi / 2 * t)[:, None] * x0 + torch.sin(math.pi / 2 * t)[:, None] * x1  # noqa: E731
    torch.testing.assert_close(tg.target, (path(t + h) - path(t - h)) / (2 * h), rtol=0, atol=1e-5)
    model = CosineGaussian(MU, SCALE)                           # Euler on its ODE reaches the exact map
    x = torch.randn(1000, 2, dtype=torch.float64)
    exact = model.flow(x, torch.zeros(1000), torch.ones(1000))
    errors = [(B.OBJECTIVES["diffusion"].sample(model, x, n) - exact).norm(dim=1).mean().item() for n in (16, 32, 64)]
    assert all(1.8 < a / b < 2.2 for a, b in zip(errors, errors[1:])) and errors[-1] < 0.02, errors


def test_consistency_samplers_with_the_exact_model():
    """With the exact shortcut, one step to the end is the flow map; the multistep rule's fresh
    noise keeps every intermediate point on the true marginal p_t, so any N samples the data."""
    exact = GaussianShortcut(MU, SCALE)
    x0 = torch.randn(200, 2, dtype=torch.float64)
    target = exact.flow(x0, torch.zeros(200), torch.ones(200))
    for name in ("consistency-distillation", "consistency-training"):
        torch.testing.assert_close(B.OBJECTIVES[name].sample(exact, x0, 1), target, rtol=0, atol=1e-9)
    torch.manual_seed(0)
    x = B.sample_multistep(exact, torch.randn(200_000, 2, dtype=torch.float64), 4)
    torch.testing.assert_close(x.mean(0), torch.tensor(MU, dtype=torch.float64), rtol=0, atol=0.01)
    torch.testing.assert_close(x.std(0), torch.full((2,), SCALE, dtype=torch.float64), rtol=0, atol=0.01)


def test_meanflow_target_is_the_exact_shortcut_for_the_exact_flow():
    """s = v + d (v . grad_x s + d_t s - d_d s) holds for the true average velocity, so with the
    exact shortcut and the exact velocity the MeanFlow target is the exact shortcut itself."""
    exact = GaussianShortcut(MU, SCALE)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(500, dtype=torch.float64, generator=g)
    d = torch.rand(500, dtype=torch.float64, generator=g) * (1 - t)
    d[:100] = 0                                                  # flow-matching rows
    x = 1.5 * torch.randn(500, 2, dtype=torch.float64, generator=g)
    target = B.meanflow_target(exact, x, t, d, exact.velocity(x, t))
    torch.testing.assert_close(target, exact(x, t, d), rtol=0, atol=1e-9)

    class Wrong(torch.nn.Module):       # exact, plus an error that depends on d
        def forward(self, x, t, d, y=None):
            return exact(x, t, d) + 0.2 * d[:, None].double() ** 2
    wrong = Wrong()
    miss = (B.meanflow_target(wrong, x, t, d, exact.velocity(x, t)) - wrong(x, t, d)).abs().max(1).values
    assert miss[100:].mean() > 0.01 and torch.all(miss[:100] < 1e-9)


def test_meanflow_target_with_the_sampled_velocity_is_right_in_expectation():
    """The target is linear in v, and E[x1 - x0 | x_t] is the exact velocity: averaged over the
    pairs (x0, x1) through one point x_t, the target is the exact shortcut there."""
    exact, s2 = GaussianShortcut(MU, SCALE), SCALE ** 2
    n, t0, d0 = 400_000, 0.3, 0.5
    x_t = torch.tensor([[0.4, -0.9]], dtype=torch.float64).repeat(n, 1)
    t, d = torch.full((n,), t0, dtype=torch.float64), torch.full((n,), d0, dtype=torch.float64)
    var = (1 - t0) ** 2 + t0 ** 2 * s2                            # x1 | x_t is Gaussian
    mean = exact.mu + t0 * s2 / var * (x_t - t0 * exact.mu)
    x1 = mean + math.sqrt(s2 - t0 ** 2 * s2 ** 2 / var) * torch.randn(n, 2, dtype=torch.float64,
                                                                  generator=torch.Generator().manual_seed(1))
    x0 = (x_t - t0 * x1) / (1 - t0)
    target = B.meanflow_target(exact, x_t, t, d, x1 - x0)
    torch.testing.assert_close(target.mean(0), exact(x_t[:1], t[:1], d[:1])[0], rtol=0, atol=0.01)


def test_ot_pairing_is_a_permutation_that_never_costs_more():
    x1 = torch.randn(256, 2) * 2 + 1
    torch.manual_seed(0)
    independent = S.draw_noise(x1)
    torch.manual_seed(0)
    paired = S.draw_noise(x1, "ot")
    assert torch.equal(independent[independent[:, 0].argsort()], paired[paired[:, 0].argsort()])
    cost = lambda x0: (x1 - x0).pow(2).sum().item()              # noqa: E731
    assert cost(paired) < 0.8 * cost(independent)
    y = torch.arange(256) % 3                                    # with labels: within each class
    torch.manual_seed(0)
    by_class = S.draw_noise(x1, "ot", y)
    for c in range(3):
        a, b = independent[y == c], by_class[y == c]
        assert torch.equal(a[a[:, 0].argsort()], b[b[:, 0].argsort()])
    assert cost(paired) <= cost(by_class) < cost(independent)
    with pytest.raises(ValueError, match="nothing to re-pair"):
        B.make_targets("reflow", S.MLP(), x1, teacher=S.MLP(), pair="ot")
    with pytest.raises(ValueError, match="pair"):
        S.draw_noise(x1, "sinkhorn")


def test_meanflow_draws_its_queries_as_its_authors_do():
    torch.manual_seed(0)
    x1 = torch.randn(40_000, 2)
    tg = B.make_targets("meanflow", GaussianShortcut(MU, SCALE), x1)
    start, end = tg.t, tg.t + tg.d
    assert tg.n_boot == 30_000 and torch.all(tg.d[:30_000] > 0) and torch.all(tg.d[30_000:] == 0)
    assert torch.all(end <= 1) and torch.all(start >= 0)
    # the larger of sigmoid(N(0.6, 1.6)) and sigmoid(N(4, 1.6)): mostly the latter, near the data
    assert end[:30_000].median() == pytest.approx(0.976, abs=0.01) and start.median() == pytest.approx(0.62, abs=0.02)
    tg = B.make_targets("meanflow", GaussianShortcut(MU, SCALE), x1, ratio=0.25, times="uniform")
    assert tg.n_boot == 10_000 and tg.t.mean() == pytest.approx(1 / 3, abs=0.01)    # the smaller of two uniforms
    assert B.OBJECTIVES["meanflow"].loss_power == 1.0 and B.OBJECTIVES["shortcut"].loss_power == 0.0


class GaussianVelocity(GaussianShortcut):
    """Only the velocity of the Gaussian flow, as a flow-matching model answers, and a counter."""
    num_classes, calls = 0, 0

    def forward(self, x, t, d, y=None):
        GaussianVelocity.calls += 1
        return self.velocity(x, t).to(x.dtype)


def test_amed_takes_two_evaluations_a_step_and_learns_a_better_step_than_the_midpoint():
    flow = GaussianVelocity(MU, SCALE)
    amed = B.AMED(flow)
    x0 = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = flow.flow(x0, torch.zeros(2000), torch.ones(2000))
    amed.net.double()
    before = (B.sample_amed(amed, x0, 1) - exact).norm(dim=1).mean()
    midpoint = (x0 + flow.velocity(x0 + 0.5 * flow.velocity(x0, torch.zeros(2000)), torch.full((2000,), 0.5))
                - exact).norm(dim=1).mean()
    torch.testing.assert_close(before, midpoint)                  # it starts as the midpoint rule
    GaussianVelocity.calls = 0
    B.sample_amed(amed, x0, 4)
    assert GaussianVelocity.calls == 8                            # NFE 2 per step
    torch.manual_seed(0)
    amed.fit(x0, iters=150)
    after = (B.sample_amed(amed, x0, 1) - exact).norm(dim=1).mean()
    assert after < 0.5 * before, (before, after)


################################################################################
#                                    Models                                    #
################################################################################

def models_under_test():
    return [S.MLP(dim=3, num_classes=4), S.MLP(dim=2),
            S.DiT(S.dit_config("tiny", img_size=8, channels=1, num_classes=4)),
            S.DiT(S.dit_config("tiny", img_size=8, channels=3, patch=4))]


def inputs_for(model, B=6):
    shape = (B, model.dim) if isinstance(model, S.MLP) else (B, model.cfg.channels, 8, 8)
    y = torch.arange(B) % (model.num_classes + 1) if model.num_classes else None
    return torch.randn(shape), torch.rand(B), 0.5 ** torch.randint(0, 8, (B,)).float(), y


@pytest.mark.parametrize("i", range(4))
def test_model_init_output_shape_and_gradients(i):
    torch.manual_seed(i)
    model = models_under_test()[i]
    x, t, d, y = inputs_for(model)
    out = model(x, t, d, y)
    assert out.shape == x.shape
    assert torch.all(out == 0)                       # zero final layer (and adaLN-Zero)
    for p in model.parameters():                     # leave the zero init to test the wiring
        torch.nn.init.normal_(p, std=0.2)
    model(x, t, d, y).pow(2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


@pytest.mark.parametrize("i", range(4))
def test_conditioning_is_used(i):
    torch.manual_seed(i)
    model = models_under_test()[i]
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, d, y = inputs_for(model, B=4)
    base = model(x, t, d, y)
    assert not torch.allclose(base, model(x, t.flip(0) * 0.5, d, y))
    assert not torch.allclose(base, model(x, t, d / 2, y))
    # d = 0 (the velocity) is the finest level, d = 1/128
    torch.testing.assert_close(model(x, t, torch.zeros(4), y), model(x, t, torch.full((4,), 1 / 128), y))
    if model.num_classes:
        null = torch.full((4,), model.num_classes)
        torch.testing.assert_close(model(x, t, d, None), model(x, t, d, null))
        assert not torch.allclose(model(x, t, d, torch.zeros(4, dtype=torch.long)), model(x, t, d, null))


def test_told_the_end_time_the_network_sees_where_a_jump_ends():
    """d_embed="end" embeds t + d (with d = 0 the finest step, as for levels) in place of the level."""
    torch.manual_seed(0)
    model = S.MLP(d_embed="end", t_scale=1.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, t, d = torch.randn(4, 2), torch.rand(4) * 0.5, 0.5 ** torch.randint(1, 8, (4,)).float()
    c = model.cond
    torch.testing.assert_close(c(t, d), c.t_emb(t) + c.d_emb(t + d))
    torch.testing.assert_close(model(x, t, torch.zeros(4)), model(x, t, torch.full((4,), 1 / 128)))
    assert not torch.allclose(model(x, t, d), model(x, t + 0.1, d))
    with pytest.raises(ValueError, match="d_embed"):
        S.MLP(d_embed="start")


def test_library_errors_are_one_clear_value_error_each():
    mlp, dit = S.MLP(dim=2, num_classes=3), S.DiT(S.dit_config("tiny", img_size=8, channels=1))
    x, t, d = torch.randn(4, 2), torch.rand(4), torch.zeros(4)
    cases = [
        (lambda: mlp(torch.randn(4, 3), t, d), "shape"),
        (lambda: mlp(x, torch.rand(5), d), "t must have shape"),
        (lambda: S.MLP()(x, t, d, torch.zeros(4, dtype=torch.long)), "no classes"),
        (lambda: mlp(x, t, d, torch.tensor([-1, 0, 1, 2])), r"labels must lie in \[0, 3\]"),
        (lambda: mlp(x, t, d, torch.tensor([0, 4, 1, 2])), r"labels must lie in \[0, 3\]"),
        (lambda: dit(torch.randn(2, 3, 8, 8), torch.rand(2), torch.zeros(2)), "expects x of shape"),
        (lambda: S.dit_config("huge"), "unknown DiT size"),
        (lambda: S.shortcut_loss(mlp, x, bootstrap_frac=1.5), "bootstrap_frac"),
        (lambda: S.shortcut_loss(mlp, torch.randn(0, 2)), "empty"),
        (lambda: S.shortcut_loss(mlp, x, clip=-1.0), "clip must be positive"),
        (lambda: mlp(x.int(), t, d), "x must be a floating-point tensor, got torch.int32"),
        (lambda: mlp(x, (10 * t).long(), d), "t must be a floating-point tensor"),
        (lambda: mlp(x, t, d, torch.ones(4)), "y must be integer class labels, got torch.float32"),
        (lambda: S.shortcut_loss(mlp, torch.ones(4, 2, dtype=torch.long)), "x1 must be a floating-point tensor"),
        (lambda: S.sample(mlp, torch.zeros(4, 2, dtype=torch.long), 1), "x must be a floating-point tensor"),
    ]
    cases += [(lambda bad=bad: S.DiTConfig(**bad), "must be at least 1")
              for bad in ({"patch": 0}, {"heads": 0}, {"width": 0}, {"depth": -1})]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError) as e:                   # names the samples' shape, not a sub-batch
        S.shortcut_loss(mlp, torch.randn(64, 3))
    assert "(3,)" in str(e.value) and "16" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as e:
            S.pick_device("cuda")
        assert "--device" not in str(e.value)


def test_ema_update_is_exact():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expected = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    S.ema_update(a, b, decay=0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p, e)


################################################################################
#                                   Measures                                   #
################################################################################

def test_off_mode_share_of_data_is_the_gaussian_tail_and_non_finite_points_are_off():
    gm = toy.ring()
    x = gm.sample(200_000, np.random.default_rng(0))
    assert toy.off_mode_fraction(x, gm) == pytest.approx(math.exp(-4.5), abs=0.001)   # P(chi2_2 > 9)
    assert toy.off_mode_fraction(np.zeros((10, 2)), gm) == 1.0                         # the ring's centre
    on_a_mode = np.tile(gm.mu[:1].numpy(), (4, 1))
    on_a_mode[1, 0], on_a_mode[2, 1] = np.nan, np.inf
    assert toy.off_mode_fraction(on_a_mode, gm) == 0.5


def test_spread_is_one_for_the_data_and_a_quarter_for_samples_shrunk_by_half():
    g = torch.Generator().manual_seed(0)
    gaussian = gaussian_as_mixture(MU, SCALE)
    x = GaussianShortcut(MU, SCALE).flow(torch.randn(40_000, 2, dtype=torch.float64, generator=g),
                                         torch.zeros(40_000), torch.ones(40_000))   # the exact flow's samples
    assert toy.spread(x.numpy(), gaussian) == pytest.approx(1.0, abs=0.02)
    ring = toy.ring()
    x = ring.sample(40_000, np.random.default_rng(0))
    mode = ring.mu.numpy()[np.argmin(((x[:, None] - ring.mu.numpy()) ** 2).sum(-1), 1)]
    assert toy.spread(x, ring) == pytest.approx(1.0, abs=0.02)
    assert toy.spread(mode + 0.5 * (x - mode), ring) == pytest.approx(0.25, abs=0.01)
    x[:10] = np.nan                                                   # non-finite samples are left out
    assert toy.spread(x, ring) == pytest.approx(1.0, abs=0.02)


def test_toy_measures_count_non_finite_samples_and_do_not_depend_on_the_global_random_state(capsys):
    """A model whose samples are NaN scores 100% off-mode and says so; the multistep sampler's
    fresh noise is seeded per model, so the measures of one model repeat whatever ran before."""
    class NaNs(torch.nn.Module):
        def forward(self, x, t, d, y=None):
            return torch.full_like(x, float("nan"))
    gm, path = toy.ring(), toy.mixture_paths("ring")
    data = toy.sample_data("ring", 500, np.random.default_rng(0))
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    exact = GaussianShortcut(MU, SCALE)
    _, m = toy.evaluate({"nan": ("shortcut", NaNs())}, x0, data, data, gm, path)
    assert all(v == 1.0 for v in m["off_mode"]["nan"].values()) and "non-finite" in capsys.readouterr().out
    runs = []
    for other in ({}, {"flow": ("flow", S.MLP())}):
        torch.manual_seed(len(runs))
        runs.append(toy.evaluate({**other, "ct": ("consistency-training", exact)}, x0[:100], data[:100],
                                 data[:100], gm, path)[1]["off_mode"]["ct"])
    assert runs[0] == runs[1]


def test_frechet_distance_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    ca, cb = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    assert images.frechet(mu_a, ca, mu_b, cb) == pytest.approx(5 + (1 - 3) ** 2 + (2 - 1) ** 2)
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])        # invariant under a common rotation
    assert images.frechet(rot @ mu_a, rot @ ca @ rot.T, rot @ mu_b, rot @ cb @ rot.T) == pytest.approx(10.0)


@pytest.mark.parametrize("name", toy.MIXTURES)
def test_datasets_have_unit_scale(name):
    x = toy.sample_data(name, 5000, np.random.default_rng(0))
    assert x.shape == (5000, 2) and x.dtype == np.float32
    assert 0.5 < x.std() < 1.5 and np.abs(x).max() < 4


################################################################################
#        The exercises (docs/EXERCISES.md): each predicted outcome, checked     #
################################################################################

@functools.lru_cache(maxsize=None)
def quick_train(*flags, steps=400, objective="shortcut"):
    """A small toy model, trained once per test run for each setting (two-phase objectives
    learn from a flow-matching teacher trained for the same number of steps)."""
    args = toy.parse_args(["--steps", str(steps), "--width", "64", "--objective", objective, *flags])
    data = toy.sample_data("ring", 20_000, np.random.default_rng(0))
    teacher = quick_train(steps=steps, objective="flow")[0] if B.objective(objective).two_phase else None
    return toy.train(toy.record(args), data, teacher)


def one_step_w2(model, flow=False):
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    data = toy.sample_data("ring", 2000, np.random.default_rng(5))
    return toy.sliced_w2(S.sample(model, x0, 1, flow=flow).numpy(), data)


def off_mode(model, objective, steps):
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)                            # the multistep rule draws fresh noise
    return toy.off_mode_fraction(B.objective(objective).sample(model, x0, steps).numpy(), toy.ring())


@slow
def test_exercise_2_one_flow_step_lands_on_the_data_mean():
    gm = toy.skewed_mixture()
    x0 = torch.randn(300, 2, dtype=torch.float64)
    mean = (gm.pi[:, None] * gm.mu).sum(0)
    x1 = S.sample(MixtureShortcut(gm), x0, 1, flow=True)             # x0 + v(x0, 0) = E[x1]
    torch.testing.assert_close(x1, mean.expand_as(x1), rtol=0, atol=1e-12)
    model, _ = quick_train(objective="flow")                          # and a trained baseline collapses
    x1 = S.sample(model, torch.randn(2000, 2), 1, flow=True)
    assert x1.std(0).max() < 0.2 * toy.sample_data("ring", 2000, np.random.default_rng(0)).std(0).min()
    shortcut, _ = quick_train()
    assert one_step_w2(shortcut) < 0.25 * one_step_w2(model, flow=True)


@slow
def test_exercise_3_without_flow_matching_nothing_is_learned():
    """bootstrap_frac=1: no ground at all. From the zero init every target is 0, so the loss is
    exactly 0, no gradient flows, and the model still outputs 0 after training."""
    model, log = quick_train("--bootstrap-frac", "1", steps=50)
    assert max(log["sc"]) == 0.0 and all(math.isnan(v) for v in log["fm"])
    x, t, d = torch.randn(100, 2), torch.rand(100), 0.5 ** torch.randint(0, 8, (100,)).float()
    assert torch.all(model(x, t, d) == 0)
    x0 = torch.randn(100, 2)
    torch.testing.assert_close(S.sample(model, x0, 1), x0)


@slow
def test_exercise_3_a_missing_level_is_interpolated_by_its_neighbours():
    """--ungrounded drops the 2d = 1/64 targets. Measured: the smooth level embedding fills
    the unsupervised level d = 1/64 in from levels 1/32 and 1/128, so the harm is small."""
    spy = Spy()
    S.shortcut_loss(spy, torch.randn(700, 2), grounded=False)
    big_steps = set(spy.calls[-1][2][:175].tolist())            # the student's query of each bootstrap row
    assert big_steps == {2.0 ** -k for k in range(6)} and 1 / 64 not in big_steps
    path = toy.mixture_paths("ring")
    good, bad = toy.exact_errors(quick_train()[0], path), toy.exact_errors(quick_train("--ungrounded")[0], path)
    assert all(bad[n] < 1.5 * good[n] for n in toy.STEP_COUNTS), (good, bad)


def test_exercise_4_without_stop_gradient_the_targets_carry_gradient():
    def grads(stop_grad, frac=0.5):
        torch.manual_seed(0)
        model = S.MLP(width=32)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        torch.manual_seed(1)
        loss, _ = S.shortcut_loss(model, torch.randn(64, 2), bootstrap_frac=frac, stop_grad=stop_grad)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(grads(True), grads(False))
    torch.testing.assert_close(grads(True, frac=0.0), grads(False, frac=0.0))   # no targets, no difference


@slow
def test_exercise_5_a_larger_bootstrap_share_smears_one_step_less(tmp_path):
    small, large = quick_train("--bootstrap-frac", str(1 / 16))[0], quick_train("--bootstrap-frac", "0.5")[0]
    assert off_mode(small, "shortcut", 1) > off_mode(large, "shortcut", 1)
    metrics = toy.main(["--sweep", "bootstrap-frac", "--steps", "20", "--width", "16", "--n-samples", "500",
                        "--out", str(tmp_path)])
    assert list(metrics["train_seconds"]) == ["bootstrap 1/16", "bootstrap 1/8", "bootstrap 1/4", "bootstrap 1/2"]
    assert all((tmp_path / f"sweep.{ext}").stat().st_size > 0 for ext in ("md", "json", "npz", "png"))
    assert "| bootstrap 1/16 |" in (tmp_path / "sweep.md").read_text()


@slow
def test_exercise_6_uniform_d_samples_in_one_step_with_less_accurate_jumps():
    uniform, dyadic = quick_train("--d-sampling", "uniform")[0], quick_train()[0]
    flow = quick_train(objective="flow")[0]
    assert max(off_mode(uniform, "shortcut", 1), off_mode(dyadic, "shortcut", 1)) < 0.5 * off_mode(flow, "flow", 1)
    path = toy.mixture_paths("ring")
    coarse = lambda m: np.mean([toy.exact_errors(m, path)[n] for n in (2, 4, 8)])     # noqa: E731
    assert coarse(uniform) > coarse(dyadic)


@slow
def test_exercise_7_the_exact_error_falls_with_training_at_every_d():
    path = toy.mixture_paths("ring")
    run = toy.record(toy.parse_args(["--steps", "400", "--width", "64"]))
    data = toy.sample_data("ring", 20_000, np.random.default_rng(0))
    _, log = toy.train(run, data, track=(200, lambda m: toy.exact_errors(m, path)))
    first, last = log["exact"][1], log["exact"][400]
    assert set(log["exact"]) == {1, 200, 400}
    assert all(last[n] < 0.75 * first[n] for n in toy.STEP_COUNTS), (first, last)


@slow
def test_exercise_8_a_slow_ema_teacher_lags_in_a_short_run():
    online, ema = quick_train()[0], quick_train("--ema-teacher")[0]     # decay 0.999: a horizon of ~1000 steps
    assert off_mode(ema, "shortcut", 1) > 1.5 * off_mode(online, "shortcut", 1)


@slow
def test_exercise_10_without_its_curriculum_consistency_training_smears_less():
    with_curriculum = quick_train(objective="consistency-training")[0]
    fixed_step = quick_train("--no-curriculum", objective="consistency-training")[0]
    tg = B.make_targets("consistency-training", fixed_step, torch.randn(64, 2), progress=0.0, curriculum=False)
    assert torch.all(torch.remainder(tg.t, 1 / 64) == 0) and tg.t.max() == 63 / 64     # dt = 1/64 from step 1
    for n in (1, 4):
        assert off_mode(fixed_step, "consistency-training", n) < off_mode(with_curriculum, "consistency-training", n)


@slow
def test_exercise_11_progressive_distillation_is_a_one_step_model():
    """At an equal total budget (teacher + student = shortcut), the distilled network gets
    worse with more steps: only its last stage, d = 1, is trained at the end."""
    distilled, shortcut = quick_train(objective="progressive-distillation", steps=200)[0], quick_train()[0]
    assert off_mode(distilled, "progressive-distillation", 128) > off_mode(distilled, "progressive-distillation", 1)
    assert off_mode(shortcut, "shortcut", 128) < off_mode(shortcut, "shortcut", 1)


@slow
def test_exercise_12_meanflow_as_its_authors_train_it_beats_the_shortcut_at_one_step():
    """MeanFlow's recipe (t unscaled, adaptive weight p = 1, logit-normal times, no clip) beats
    the shortcut model's one step after 400 steps of the same MLP (measured: 24.9% off-mode
    against 28.6%)."""
    meanflow, shortcut = quick_train("--width", "128", objective="meanflow")[0], quick_train("--width", "128")[0]
    assert off_mode(meanflow, "meanflow", 1) < off_mode(shortcut, "shortcut", 1)


def test_exercise_13_one_mean_value_time_is_exact_along_the_rays_of_symmetry_only():
    """AMED's step x0 + v(x0 + u v(x0, 0), u) with the exact ring flow: on a ray of symmetry
    (through a mode, or half way between two) the flow is one-dimensional and some u lands on
    Phi; off them no single u does."""
    gm = toy.ring()
    angle = torch.tensor([0.0, math.pi / 8, math.pi / 16])      # through a mode, between two, neither
    x0 = torch.stack([torch.cos(angle), torch.sin(angle)], 1).double() * 0.8
    zero = torch.zeros(3, dtype=torch.float64)
    jump = gm.flow_map(x0, zero, 1.0, h=1 / 128) - x0
    v0 = gm.velocity(x0, zero)
    miss = torch.stack([(gm.velocity(x0 + u * v0, zero + u) - jump).norm(dim=1)
                        for u in torch.linspace(0, 1, 1001, dtype=torch.float64)]).min(0).values
    assert max(miss[0], miss[1]) < 0.01 < 0.1 < miss[2], miss


@slow
def test_exercise_14_the_end_time_as_the_step_coordinate_changes_little():
    level, end, flow = quick_train()[0], quick_train("--d-embed", "end")[0], quick_train(objective="flow")[0]
    assert abs(off_mode(end, "shortcut", 1) - off_mode(level, "shortcut", 1)) < 0.05
    assert off_mode(end, "shortcut", 1) < 0.5 * off_mode(flow, "flow", 1)


################################################################################
#                      train_toy.py: runs, records, faults                     #
################################################################################

def run_cli(script, argv, capsys):
    """A script's exit code and stderr, run in-process through its cli."""
    with pytest.raises(SystemExit) as e:
        S.cli(script.main, argv)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """One short --table1 run for the tests: every objective for 30 steps."""
    out = tmp_path_factory.mktemp("table1")
    flags = ["--table1", "--steps", "30", "--width", "16", "--n-samples", "500", "--out", str(out)]
    return out, flags, toy.main(flags)


@slow
def test_table1_writes_its_outputs_and_every_objective_samples(tiny_table):
    out, _, metrics = tiny_table
    npz = np.load(out / "table1.npz")
    assert npz["data"].shape == (500, 2)
    for name in [*B.OBJECTIVES, "shortcut_robust_loss"]:
        assert (out / f"{name}.pt").exists()
        for n in (1, 2, 4, 8, 128):
            assert npz[f"{name}_{n}"].shape == (500, 2) and np.isfinite(npz[f"{name}_{n}"]).all(), (name, n)
    md = (out / "table1.md").read_text()
    assert all(f"| {name} |" in md for name in [*B.OBJECTIVES, "shortcut, robust loss", "AMED on flow"])
    assert all(npz[f"AMED_on_flow_{n}"].shape == (500, 2) for n in (2, 4, 8, 128)) and "AMED_on_flow_1" not in npz
    assert (out / "table1.png").stat().st_size > 0
    assert metrics["seeds"] == [0] and 0 <= metrics["off_mode"]["shortcut"][1] <= 1
    assert metrics["exact_error"]["diffusion"] is None
    saved = json.loads((out / "table1.json").read_text())
    assert saved["run"]["steps"] == 30 and toy.load_model(out / "reflow.pt")[0].teacher.objective == "flow"


@slow
def test_reuse_reloads_a_model_only_when_its_whole_record_matches(tiny_table, capsys):
    """An OT-paired model saved as shortcut.pt once stood as the plain shortcut row: now the
    record tells them apart, and only that row is trained again."""
    out, flags, metrics = tiny_table
    other_run, other_model, seconds = toy.load_model(out / "shortcut_robust_loss.pt")
    toy.save_model(out / "shortcut.pt", dataclasses.replace(other_run, pair="ot"), other_model, seconds)
    capsys.readouterr()
    again = toy.main(flags + ["--reuse"])
    said = capsys.readouterr().out
    assert "shortcut.pt was trained with other settings" in said
    assert {line.split()[0] for line in said.splitlines() if " step " in line} == {"shortcut"}
    assert toy.load_model(out / "shortcut.pt")[0] == toy.record(toy.parse_args(flags))
    for row in metrics["train_seconds"]:                     # the reloaded rows measure the same
        assert again["off_mode"][row] == metrics["off_mode"][row], row


@slow
def test_toy_script_writes_its_outputs(tmp_path):
    metrics = toy.main(["--steps", "30", "--n-samples", "2000", "--width", "32", "--out", str(tmp_path)])
    for f in ("toy.png", "trajectories.png", "losses.png", "exact.png", "toy.npz", "toy.json", "toy.md",
              "shortcut.pt", "flow.pt"):
        assert (tmp_path / f).stat().st_size > 0
    npz = np.load(tmp_path / "toy.npz")
    assert npz["data"].shape == (2000, 2)
    for n in toy.STEP_COUNTS:
        assert npz[f"shortcut_{n}"].shape == npz[f"flow_{n}"].shape == (2000, 2)
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["sliced_w2"]["data"] == pytest.approx(metrics["sliced_w2"]["data"])
    assert set(saved["sliced_w2"]["shortcut"]) == set(saved["off_mode"]["flow"]) == {str(n) for n in toy.STEP_COUNTS}
    assert 0 < saved["off_mode"]["data"] < 0.03 and saved["run"]["width"] == 32
    assert not (tmp_path / "run.lock").exists()


@slow
def test_toy_teacher_must_be_a_flow_model_of_the_same_data_and_network(tmp_path, capsys):
    base = ["--steps", "5", "--width", "16", "--n-samples", "200"]
    toy.main(base + ["--no-baseline", "--out", str(tmp_path / "a")])                  # a shortcut model
    toy.main(base + ["--objective", "flow", "--dataset", "mixture", "--out", str(tmp_path / "m")])
    old = tmp_path / "old.pt"
    torch.save({"model": S.MLP(width=16).state_dict(), "width": 16}, old)           # an old format
    nan = tmp_path / "nan.pt"
    run, model, _ = toy.load_model(tmp_path / "m" / "flow.pt")
    torch.nn.init.constant_(model.out[1].weight, float("nan"))
    toy.save_model(nan, dataclasses.replace(run, dataset="ring"), model, 1.0)
    cases = [(["--table1", "--teacher", str(tmp_path / "a" / "shortcut.pt")], "must be a flow-matching model"),
             (["--objective", "reflow", "--teacher", str(tmp_path / "m" / "flow.pt")],
              "its record says flow on mixture"),
             (["--objective", "reflow", "--teacher", str(tmp_path / "m" / "flow.pt"), "--width", "32",
               "--dataset", "mixture"], "MLP 32x3"),
             (["--objective", "reflow", "--teacher", str(old)], "is not a toy checkpoint"),
             (["--objective", "reflow", "--teacher", str(nan)], "non-finite")]
    for i, (flags, message) in enumerate(cases):
        code, err = run_cli(toy, base + flags + ["--out", str(tmp_path / f"c{i}")], capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (flags, err)
        assert not list((tmp_path / f"c{i}").glob("*.pt"))          # refused before any training


@slow
def test_toy_cli_rejects_bad_flags_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for flags in (["--bootstrap-frac", "2"], ["--dataset", "spiral"], ["--steps", "0"], ["--lr", "nan"],
                  ["--seed", "-1"], ["--out", str(a_file)], ["--objective", "reflow", "--pair", "ot"]):
        code, err = run_cli(toy, flags, capsys)
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (flags, err)
    r = subprocess.run([sys.executable, "train_toy.py", "--steps", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: argument --steps: must be at least 1, got '0'"


################################################################################
#                           train_images.py: data                              #
################################################################################

def write_cifar(root, monkeypatch=None, n=20, as_folder=False, batches=None):
    """A small CIFAR-10 in the real python-pickle format: 5 training batches, a test batch, meta.
    With monkeypatch, its md5s stand in for the published ones, so the loader accepts it."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = batches or {name: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": name.encode()}
                          for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    md5s = {}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        md5s[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    archive = root / "cifar-10-python.tar.gz"
    if not as_folder:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    if monkeypatch is not None:
        monkeypatch.setattr(images, "CIFAR_BATCH_MD5", {k: v for k, v in md5s.items() if k.startswith("data_batch")})
        if not as_folder:
            monkeypatch.setattr(images, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return batches


@pytest.mark.parametrize("as_folder", [False, True])
def test_cifar_loader_reads_the_python_archive(tmp_path, monkeypatch, as_folder):
    batches = write_cifar(tmp_path, monkeypatch, as_folder=as_folder)
    x, y = images.load_cifar10(str(tmp_path))
    assert x.shape == (100, 3, 32, 32) and x.dtype == np.uint8 and y.shape == (100,)
    first = batches["data_batch_1"]
    assert np.array_equal(x[0, 1].ravel(), first[b"data"][0, 1024:2048])   # channel-major rows
    assert np.array_equal(x[20], batches["data_batch_2"][b"data"][0].reshape(3, 32, 32))
    assert y[:20].tolist() == list(first[b"labels"])


def test_cifar_loader_errors(tmp_path):
    with pytest.raises(S.UserError, match="--download"):
        images.load_cifar10(str(tmp_path / "nowhere"))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(S.UserError, match="corrupt"):
        images.load_cifar10(str(tmp_path))
    with pytest.raises(S.UserError, match="md5"):
        images.check_md5(str(tmp_path / "cifar-10-python.tar.gz"), images.CIFAR_MD5)


class RunsCode:
    """Unpickling this runs a shell command: what a crafted CIFAR-10 batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("as_folder", [False, True])
def test_cifar_archive_that_runs_code_is_refused(tmp_path, monkeypatch, as_folder):
    marker = tmp_path / "PWNED"
    evil = {f"data_batch_{i}": {b"data": RunsCode(marker), b"labels": [0]} for i in range(1, 6)}
    write_cifar(tmp_path / "data", batches=evil, as_folder=as_folder)
    with pytest.raises(S.UserError, match="not the published.*unpickled"):       # the published md5 fails first
        images.load_cifar10(str(tmp_path / "data"))
    write_cifar(tmp_path / "data2", monkeypatch, batches=evil, as_folder=as_folder)
    with pytest.raises(S.UserError, match="refusing to unpickle .*system"):       # the unpickler refuses
        images.load_cifar10(str(tmp_path / "data2"))
    assert not marker.exists()


@pytest.mark.parametrize("fault", ["label 255", "short labels", "list batch", "float data"])
def test_corrupt_cifar_batches_are_refused(tmp_path, monkeypatch, fault):
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
    bad = {"label 255": {**good, b"labels": [1, 2, 255, 4]}, "short labels": {**good, b"labels": [1, 2]},
           "list batch": [good[b"data"], good[b"labels"]], "float data": {**good, b"data": good[b"data"] / 255}}[fault]
    write_cifar(tmp_path, monkeypatch, batches={**{f"data_batch_{i}": good for i in range(1, 5)}, "data_batch_5": bad})
    with pytest.raises(S.UserError, match="data_batch_5"):
        images.load_cifar10(str(tmp_path))


def test_a_flipped_byte_in_the_cifar_archive_is_caught_by_its_md5(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    images.load_cifar10(str(tmp_path))
    archive = tmp_path / "cifar-10-python.tar.gz"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 1
    archive.write_bytes(bytes(raw))
    with pytest.raises(S.UserError, match="not the published"):
        images.load_cifar10(str(tmp_path))


def test_celeba_loader_crops_resizes_and_caches(tmp_path):
    from PIL import Image
    for i in range(3):
        img = np.zeros((218, 178, 3), np.uint8)      # aligned CelebA is 178 wide, 218 high
        img[:, :89] = (255, 0, 0)                    # left half red, right half blue
        img[:, 89:] = (0, 0, 255)
        img[:20] = (0, 255, 0)                       # a green band that the center crop removes
        Image.fromarray(img).save(tmp_path / f"{i:06d}.jpg", quality=95)
    x, y = images.load_celeba(str(tmp_path))
    assert x.shape == (3, 3, 64, 64) and y is None
    assert x[0, 0, :, :20].mean() > 200 and x[0, 2, :, -20:].mean() > 200 and x[0, 1].mean() < 30
    assert (tmp_path / "celeba64.npy").exists()
    np.testing.assert_array_equal(images.load_celeba(str(tmp_path))[0], x)


def png_header(width, height):
    """A small PNG file whose header declares width x height pixels."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_celeba_faults(tmp_path, monkeypatch, capsys):
    from PIL import Image
    Image.fromarray(np.full((80, 60, 3), 200, np.uint8)).save(tmp_path / "000001.jpg")
    (tmp_path / "000002.png").write_bytes(png_header(30000, 30000))
    with pytest.raises(S.UserError, match="000002.png.*DecompressionBomb"):
        images.load_celeba(str(tmp_path))
    (tmp_path / "000002.png").unlink()
    for bad in (b"garbage", None):             # unreadable, then a readable array of the wrong shape
        if bad is None:
            np.save(tmp_path / "celeba64.npy", np.zeros((2, 3, 32, 32), np.uint8))
        else:
            (tmp_path / "celeba64.npy").write_bytes(bad)
        x, _ = images.load_celeba(str(tmp_path))
        assert x.shape == (1, 3, 64, 64) and "rebuilding it" in capsys.readouterr().out

    def read_only(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(images, "write_atomic", read_only)
    (tmp_path / "celeba64.npy").unlink()
    x, _ = images.load_celeba(str(tmp_path))             # the decoded images survive a read-only folder
    assert x.shape == (1, 3, 64, 64) and "continuing without it" in capsys.readouterr().out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))      # shares the cached digit classifier


@slow
def test_broken_caches_are_rebuilt(tmp_path, capsys):
    cache = tmp_path / "digits_judge.npz"
    cache.write_bytes(b"PK\x03\x04 truncated")
    judge = images.DigitsJudge(str(cache))
    x, y = images.load_digits()
    assert (judge.predict(x / 255.0) == y).mean() > 0.97 and "computing it afresh" in capsys.readouterr().out
    assert images.DigitsJudge(str(cache)).w[0].shape == (64, 128)        # and the rewritten cache loads


################################################################################
#              train_images.py: runs, records, checkpoints, faults             #
################################################################################

TINY = ["--model", "tiny", "--batch-size", "16", "--n-samples", "20", "--eval-steps", "1,2",
        "--log-every", "100", "--device", "cpu", "--amed-iters", "0"]


def weights(path):
    return torch.load(path, weights_only=True)


@slow
def test_digits_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    metrics = ti.main(TINY + ["--steps", "4", "--out", str(out), "--data-dir", data_dir])
    for f in ("checkpoint.pt", "grid_1.png", "grid_2.png", "steps.png", "samples.npz", "metrics.json"):
        assert (out / f).stat().st_size > 0
    npz = np.load(out / "samples.npz")
    assert npz["shortcut_1"].shape == (20, 1, 8, 8) and npz["labels"].tolist() == [i % 10 for i in range(20)]
    assert 0 <= npz["shortcut_2"].min() and npz["shortcut_2"].max() <= 1
    assert set(metrics) >= {"real_vs_real", "shortcut_1", "shortcut_2", "velocity_1", "velocity_2", "train_seconds"}
    assert 0 < metrics["real_vs_real"] < metrics["shortcut_1"]["fd"]       # 4 steps of training: far from data
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"] == json.loads(json.dumps(weights(out / "checkpoint.pt")["run"]))
    assert saved["run"]["model"] == "tiny" and saved["run"]["steps"] == 4 and saved["step"] == 4
    assert weights(out / "checkpoint.pt")["step"] == 4 and not (out / "run.lock").exists()
    judge = images.DigitsJudge(os.path.join(data_dir, "digits_judge.npz"))
    x, y = images.load_digits()
    assert (judge.predict(x / 255.0) == y).mean() > 0.97


@slow
def test_resume_is_bit_exact_and_restores_the_record(tmp_path, data_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    common = TINY + ["--data-dir", data_dir, "--save-every", "3", "--ema-teacher", "--lr", "1e-3"]
    ti.main(common + ["--steps", "6", "--out", str(full)])
    ti.main(common + ["--steps", "3", "--out", str(part)])
    ti.main(["--steps", "6", "--resume", str(part / "checkpoint.pt"), *TINY[4:]])   # no record flags at all
    a, b = weights(full / "checkpoint.pt"), weights(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and a["run"] == b["run"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@slow
def test_a_two_phase_run_resumes_with_its_record_and_its_stage_teacher(tmp_path, data_dir, capsys, monkeypatch):
    """Progressive distillation changes its teacher at every stage (here every step). Resumed
    without --objective (the README's "continue a run"), it stays progressive distillation with
    its saved stage teacher, and equals an unbroken run; --teacher on a resume is refused."""
    flow = tmp_path / "flow"
    ti.main(TINY + ["--objective", "flow", "--steps", "2", "--out", str(flow), "--data-dir", data_dir])
    common = TINY + ["--data-dir", data_dir, "--save-every", "3"]
    pd = ["--objective", "progressive-distillation", "--teacher", str(flow / "checkpoint.pt"), "--steps", "6"]
    full, part = tmp_path / "full", tmp_path / "part"
    ti.main(common + pd + ["--out", str(full)])
    save = ti.save_checkpoint

    def save_and_stop(path, *a, **k):
        save(path, *a, **k)
        raise S.Interrupted("stopped after the first checkpoint")
    monkeypatch.setattr(ti, "save_checkpoint", save_and_stop)
    with pytest.raises(S.Interrupted):
        ti.main(common + pd + ["--out", str(part)])
    monkeypatch.setattr(ti, "save_checkpoint", save)
    ckpt = str(part / "checkpoint.pt")
    assert weights(ckpt)["step"] == 3
    code, err = run_cli(ti, common + ["--resume", ckpt, "--teacher", str(flow / "checkpoint.pt")], capsys)
    assert code == 2 and "--teacher cannot change on --resume" in err
    ti.main(common + ["--resume", ckpt])
    a, b = weights(full / "checkpoint.pt"), weights(ckpt)
    assert b["run"]["objective"] == "progressive-distillation" and b["run"]["teacher"]["objective"] == "flow"
    for key in ("model", "ema", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@slow
def test_sample_only_samples_with_the_checkpoints_objective(tmp_path, data_dir):
    out = tmp_path / "ct"
    ti.main(TINY + ["--objective", "consistency-training", "--steps", "2", "--out", str(out), "--data-dir", data_dir])
    before = dict(np.load(out / "samples.npz"))
    metrics = ti.main(["--sample-only", "--resume", str(out / "checkpoint.pt"), "--data-dir", data_dir, *TINY[4:]])
    after = np.load(out / "samples.npz")
    assert metrics["run"]["objective"] == "consistency-training" and "consistency-training_1" in metrics
    assert "shortcut_1" not in metrics and set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@slow
def test_a_teacher_must_be_a_finished_flow_run_of_the_same_data_and_model(tmp_path, data_dir, capsys):
    common = TINY + ["--steps", "2", "--data-dir", data_dir]
    flow, shortcut = tmp_path / "flow", tmp_path / "shortcut"
    metrics = ti.main(common + ["--objective", "flow", "--out", str(flow), "--amed-iters", "2"])
    assert {"flow_1", "amed_2", "amed_4", "amed_8"} <= set(metrics)          # a flow run is also sampled by AMED
    ti.main(common + ["--out", str(shortcut)])
    state = weights(flow / "checkpoint.pt")
    unfinished, nan, broken = tmp_path / "unfinished.pt", tmp_path / "nan.pt", tmp_path / "broken.pt"
    torch.save({**state, "step": 1}, unfinished)
    torch.save({**state, "ema": {k: v * float("nan") for k, v in state["ema"].items()}}, nan)
    torch.save({**state, "ema": dict(list(state["ema"].items())[1:])}, broken)
    cases = [(shortcut / "checkpoint.pt", "its record says shortcut"), (unfinished, "at step 1 of 2"),
             (nan, "non-finite weights"), (broken, "does not fit this model"),
             (flow / "checkpoint.pt", "DiT-tiny/4", ["--patch", "4"]), (tmp_path / "none.pt", "no checkpoint")]
    for i, (teacher, message, *more) in enumerate(cases):
        argv = common + ["--objective", "reflow", "--teacher", str(teacher), "--out", str(tmp_path / f"c{i}")]
        code, err = run_cli(ti, argv + (more[0] if more else []), capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (teacher, err)
        assert not (tmp_path / f"c{i}" / "checkpoint.pt").exists()
    code, err = run_cli(ti, common + ["--objective", "reflow", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "two-phase: pass --teacher" in err


def bad_checkpoints(tmp_path, good):
    """A good checkpoint's faults, each written to its own file."""
    state = torch.load(good, weights_only=True)
    faults = {"empty": None, "no record": {k: v for k, v in state.items() if k != "run"},
              "missing weight": {**state, "model": dict(list(state["model"].items())[1:])},
              "bad rng": {**state, "rng": [(torch.zeros(3), None)]},
              "nan ema": {**state, "ema": {k: v * float("nan") for k, v in state["ema"].items()}}}
    paths = {}
    for name, s in faults.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pt"
        if s is None:
            paths[name].write_bytes(b"")
        else:
            torch.save(s, paths[name])
    return paths


@slow
def test_bad_input_stops_in_one_line_before_anything_is_written(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    cases = [(["--dataset", "mnist"], "invalid choice: 'mnist'"), (["--patch", "0"], "at least 1"),
             (["--patch", "-2"], "at least 1"), (["--lr", "nan"], "finite number above 0"), (["--lr", "-1"], "--lr"),
             (["--weight-decay", "-0.1"], "--weight-decay"), (["--seed", "-1"], "--seed"),
             (["--out", str(a_file)], "File exists"), (["--out", str(a_file / "sub")], "Not a directory"),
             (["--benchmark", "--bench-steps", "0"], "--bench-steps"), (["--cfg-scale", "inf"], "finite"),
             (["--cfg-scale", "nan"], "finite"), (["--n-samples", "1"], "at least 2"),
             (["--grad-clip", "-1"], "above 0"),
             (["--grad-clip", "nan"], "above 0"), (["--ema", "2"], "[0, 1)"), (["--ema", "-1"], "[0, 1)"),
             (["--ema", "nan"], "[0, 1)"), (["--label-dropout", "-1"], "[0, 1]"),
             (["--eval-steps", "1,3"], "power of two"), (["--eval-steps", "1,x"], "power of two"),
             (["--objective", "reflow", "--pair", "ot", "--teacher", str(ckpt)], "does not apply to reflow"),
             (["--sample-only"], "needs --resume"),
             (["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], "--download"),
             (["--dataset", "cifar10", "--data-dir", str(tmp_path)], "corrupt"),
             (["--out", str(out)], "exists; pass --resume"),
             (["--resume", str(ckpt), "--model", "XS"], "--model XS contradicts"),
             (["--resume", str(ckpt), "--objective", "flow"], "--objective flow contradicts"),
             (["--resume", str(ckpt), "--lr", "1e-3"], "a resumed run keeps its record")]
    cases += [(["--resume", str(p)], "nan" in p.name and "non-finite weights" or str(p))
              for p in bad_checkpoints(tmp_path, ckpt).values()]
    for i, (flags, message) in enumerate(cases):
        target = tmp_path / f"c{i}"
        argv = TINY + ["--steps", "4", "--data-dir", data_dir, "--out", str(target)] + flags
        code, err = run_cli(ti, argv, capsys)
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (flags, err)
        assert message in err, (flags, err)
        assert not (target / "checkpoint.pt").exists()
    assert ckpt.read_bytes() == before


@slow
def test_resume_into_another_runs_folder_is_refused(tmp_path, data_dir, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    before = (b / "checkpoint.pt").read_bytes()
    code, err = run_cli(ti, TINY + ["--steps", "4", "--data-dir", data_dir, "--resume", str(a / "checkpoint.pt"),
                                    "--out", str(b)], capsys)
    assert code == 2 and "would overwrite it" in err and len(err.splitlines()) == 1
    assert (b / "checkpoint.pt").read_bytes() == before


@slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    calls = {"n": 0}
    real = ti.errors

    def poisoned(*a, **k):
        err = real(*a, **k)
        calls["n"] += 1
        return err * float("nan") if calls["n"] > 4 else err
    monkeypatch.setattr(ti, "errors", poisoned)
    out = tmp_path / "run"
    code, err = run_cli(ti, TINY + ["--steps", "8", "--save-every", "2", "--out", str(out), "--data-dir", data_dir],
                        capsys)
    assert code == 1 and "non-finite" in err and "kept at" in err
    state = weights(out / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


@slow
def test_non_finite_weights_are_never_saved(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--save-every", "1", "--out", str(out), "--data-dir", data_dir])
    before = (out / "checkpoint.pt").read_bytes()
    state = weights(out / "checkpoint.pt")                       # lr 1e39 overflows float32 at the first update
    torch.save({**state, "run": {**state["run"], "lr": 1e39, "warmup": 1}}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code, err = run_cli(ti, TINY + ["--steps", "4", "--save-every", "1", "--data-dir", data_dir,
                                    "--resume", str(out / "checkpoint.pt")], capsys)
    assert code == 1 and "non-finite by step 3" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == before


@slow
def test_a_full_disk_keeps_the_previous_outputs(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    before = {f: (out / f).read_bytes() for f in ("samples.npz", "metrics.json", "steps.png")}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code, err = run_cli(ti, TINY + ["--sample-only", "--resume", str(out / "checkpoint.pt"), "--data-dir", data_dir],
                        capsys)
    assert code == 2 and err == f"error: no space left in {out}"
    assert {f: (out / f).read_bytes() for f in before} == before
    assert not list(out.glob("*.tmp"))


@slow
def test_out_of_memory_is_one_line(tmp_path, data_dir, capsys):
    code, err = run_cli(ti, TINY + ["--batch-size", str(10 ** 12), "--steps", "1", "--data-dir", data_dir,
                                    "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "out of memory" in err and "--batch-size" in err and len(err.splitlines()) == 1


@slow
def test_resume_past_steps_says_so_and_keeps_the_checkpoint(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "4", "--out", str(out), "--data-dir", data_dir])
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    ti.main(["--steps", "2", "--data-dir", data_dir, "--resume", str(out / "checkpoint.pt"), *TINY[4:]])
    said = capsys.readouterr().out
    assert "at or past --steps 2: nothing to train" in said and "wrote checkpoint.pt" not in said
    assert (out / "checkpoint.pt").read_bytes() == before


@slow
def test_cifar_run_without_an_inception_network_says_so(tmp_path, data_dir, capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("pytorch_fid") or importlib.util.find_spec("torchmetrics"):
        pytest.skip("an Inception network is installed: FID would be computed")
    write_cifar(tmp_path / "data", monkeypatch)
    out = tmp_path / "run"
    metrics = ti.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "tiny",
                       "--batch-size", "8", "--steps", "2", "--n-samples", "10", "--eval-steps", "1",
                       "--out", str(out), "--device", "cpu"])
    assert "FID skipped: install pytorch-fid" in capsys.readouterr().out
    assert "shortcut_1" not in metrics
    assert np.load(out / "samples.npz")["shortcut_1"].shape == (10, 3, 32, 32)


################################################################################
#            Both scripts: signals, a folder in use, concurrent writers         #
################################################################################

@slow
@pytest.mark.parametrize("script,sig", [("train_images.py", signal.SIGTERM), ("train_toy.py", signal.SIGINT)])
def test_ctrl_c_and_sigterm_stop_after_saving(tmp_path, data_dir, script, sig):
    out = tmp_path / "run"
    flags = [*TINY, "--data-dir", data_dir, "--save-every", "100000", "--log-every", "0.2"] \
        if script == "train_images.py" else ["--width", "16", "--table1"]
    proc = subprocess.Popen([sys.executable, script, *flags, "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:               # wait until training runs
        if "step" in line and "/100000" in line:
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig and "Traceback" not in err and err.startswith(name), err
    if script == "train_images.py":
        saved = int(err.split("saved step ")[1].split()[0])
        assert weights(out / "checkpoint.pt")["step"] == saved > 0
    else:
        assert "stopped flow at step" in err and not (out / "flow.pt").exists()
    assert not (out / "run.lock").exists()


@slow
def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    argv = TINY + ["--steps", "2", "--data-dir", data_dir, "--out", str(out)]
    with S.claim(str(out)):                                    # a live run holds the folder
        code, err = run_cli(ti, argv, capsys)
        assert code == 2 and f"is in use by another run (pid {os.getpid()})" in err
        code, err = run_cli(toy, ["--steps", "2", "--out", str(out)], capsys)
        assert code == 2 and "in use by another run" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "run.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(dead.stdout)                  # left by a process killed with kill -9
    ti.main(argv)
    assert weights(out / "checkpoint.pt")["step"] == 2 and not (out / "run.lock").exists()


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    code = ("import sys, shortcut\n"
            "for i in range(300):\n"
            "    shortcut.write_atomic(sys.argv[1], lambda f: f.write(bytes(4096)))\n")
    target = str(tmp_path / "checkpoint.pt")
    procs = [subprocess.Popen([sys.executable, "-c", code, target], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert os.path.getsize(target) == 4096 and not list(tmp_path.glob("*.tmp"))


################################################################################
#                   Speed and scale: the benchmark, two processes              #
################################################################################

@slow
def test_benchmark_mode_prints_its_figures(capsys):
    figures = ti.main(["--benchmark", "--device", "cpu", "--model", "tiny", "--batch-size", "16",
                       "--bench-steps", "2", "--bench-warmup", "1", "--eval-batch-size", "100"])   # > 4 batches
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in B.OBJECTIVES}
    assert list(rows) == list(B.OBJECTIVES)
    assert all(float(r[0]) > 0 and float(r[1]) > 0 for r in rows.values()) and rows["flow"][2] == "1.000"
    assert [line.split()[1] for line in out.splitlines() if "sampling," in line] == ["1", "128"]
    # a step's FLOPs: flow matching is a forward and a backward (2x) of 16 rows; the shortcut's
    # 4 bootstrap rows add the 2 forwards of their targets, 8 more row-forwards on 48
    assert figures["shortcut"][1] / figures["flow"][1] == pytest.approx(1 + 8 / 48, rel=0.01)


@slow
def test_two_processes_stay_identical_and_their_checkpoint_resumes_in_one(tmp_path, data_dir):
    """torchrun with 2 CPU processes over gloo: each draws its own half of the global batch, and
    DDP keeps the replicas identical; the checkpoint then resumes in a single process."""
    common = [*TINY, "--steps", "3", "--data-dir", data_dir, "--batch-size", "16", "--log-every", "0"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_images.py", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert "all 2 processes hold identical weights" in two.stdout
    state = weights(tmp_path / "two" / "checkpoint.pt")
    assert state["step"] == 3 and len(state["rng"]) == 2 and not torch.equal(state["rng"][0][0], state["rng"][1][0])
    ti.main(["--resume", str(tmp_path / "two" / "checkpoint.pt"), "--steps", "5", *TINY[4:], "--data-dir", data_dir])
    assert weights(tmp_path / "two" / "checkpoint.pt")["step"] == 5
