"""The specification of shortcut models, as tests: closed-form flows, the self-consistency
identity, what the loss asks of the network, the sampler, every objective of Table 1 and its
successors against the exact jump, and the measures. The scripts' tests are in test_scripts.py.

    python -m pytest -q test_shortcut.py      # the method, in closed form (seconds)
"""
import math

import numpy as np
import pytest
import torch

import baselines as B
import images
import shortcut as S

torch.set_default_dtype(torch.float32)


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


class Mixture:
    """x1 ~ sum_k pi_k N(mu_k, Sigma_k). Given component k, x_t ~ N(t mu_k, C_k) with
    C_k = (1-t)^2 I + t^2 Sigma_k, and E[x1 - x0 | x_t, k] = mu_k + (t Sigma_k - (1-t) I) C_k^-1 (x_t - t mu_k):
    the velocity is their mixture, weighted by the posterior of k. Phi is RK4 on a grid of step h."""

    def __init__(self, weights, means, covs):
        self.pi = torch.as_tensor(weights, dtype=torch.float64) / sum(weights)
        self.mu = torch.as_tensor(np.asarray(means), dtype=torch.float64)           # (K, D)
        self.cov = torch.as_tensor(np.asarray(covs), dtype=torch.float64)           # (K, D, D)
        self.lam, self.U = torch.linalg.eigh(self.cov)       # C_k shares Sigma_k's eigenvectors: solves are divisions

    def velocity(self, x, t):
        t = t.double()[:, None, None]                                           # (B, 1, 1)
        r = ((x.double()[:, None] - t * self.mu)[..., None, :] @ self.U)[..., 0, :]  # U^T (x - t mu_k), (B, K, D)
        c = (1 - t) ** 2 + t ** 2 * self.lam                                    # eigenvalues of C_k
        logp = torch.log(self.pi) - 0.5 * (r ** 2 / c + torch.log(c)).sum(-1)
        v_k = self.mu + (((t * self.lam - (1 - t)) / c * r)[..., None, :] @ self.U.mT)[..., 0, :]
        return (torch.softmax(logp, 1)[:, None] @ v_k)[:, 0]

    def flow_map(self, x, t, d, h=1.0 / 1024):
        n = max(1, math.ceil(d / h - 1e-9))
        x, t, dt = x.double(), t.double(), d / n
        for _ in range(n):
            k1 = self.velocity(x, t)
            k2 = self.velocity(x + dt / 2 * k1, t + dt / 2)
            k3 = self.velocity(x + dt / 2 * k2, t + dt / 2)
            k4 = self.velocity(x + dt * k3, t + dt)
            x, t = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + dt
        return x

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.pi, n, replacement=True, generator=g)
        z = torch.randn(n, self.mu.shape[1], 1, dtype=torch.float64, generator=g)
        return self.mu[k] + (torch.linalg.cholesky(self.cov)[k] @ z)[..., 0]


def ring(n=8, radius=1.5, std=0.15):
    """8 Gaussians on a ring, the toy's data."""
    angles = 2 * np.pi * np.arange(n) / n
    return Mixture(np.ones(n), radius * np.stack([np.cos(angles), np.sin(angles)], 1),
                   np.tile(std ** 2 * np.eye(2), (n, 1, 1)))


def skewed():
    """Four anisotropic components of unequal weight."""
    def cov(sx, sy, a):
        R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        return R @ np.diag([sx ** 2, sy ** 2]) @ R.T
    return Mixture([0.4, 0.3, 0.2, 0.1], [[-1.0, -0.6], [1.0, 1.0], [1.1, -1.2], [-1.2, 1.3]],
                   [cov(0.5, 0.12, 0.6), cov(0.3, 0.3, 0.0), cov(0.4, 0.1, -1.0), cov(0.15, 0.15, 0.0)])


class MixtureShortcut(torch.nn.Module):
    """The exact shortcut (Phi_{t->t+d}(x) - x)/d of a Mixture, the velocity at d = 0, where Phi is
    the midpoint rule on a grid of step h: a discrete flow that composes exactly on its grid, and
    whose jump at d = h still differs from the velocity."""

    def __init__(self, gm, h=1.0 / 128):
        super().__init__()
        self.gm, self.h = gm, h

    def flow_map(self, x, t, d):
        x, t = x.double(), t.double()
        for _ in range(round(d / self.h)):
            x, t = x + self.h * self.gm.velocity(x + self.h / 2 * self.gm.velocity(x, t), t + self.h / 2), t + self.h
        return x

    def forward(self, x, t, d, y=None):
        out = torch.empty_like(x, dtype=torch.float64)
        for dv in torch.unique(d).tolist():
            rows = d == dv
            xr, tr = x[rows], t[rows]
            out[rows] = self.gm.velocity(xr, tr) if dv == 0 else (self.flow_map(xr, tr, dv) - xr.double()) / dv
        return out.to(x.dtype)


def gaussian_as_mixture(mu, s):
    return Mixture([1.0], [mu], [s ** 2 * np.eye(len(mu))])


MU, SCALE = [0.7, -1.2], 0.6


def shortcut_loss(model, x1, y=None, loss_power=0.0, **options):
    """The shortcut objective on a batch: its loss and its parts as floats."""
    loss, parts = S.regress(model, S.shortcut_targets(model, x1, y, **options), loss_power)
    return loss, {k: v.item() for k, v in parts.items()}


def exact_models():
    """The Gaussian case checks the continuous identity (a closed form); the mixture case is the
    midpoint rule on the grid of 1/128, whose discrete flow composes exactly on that grid by
    construction, so it checks the code's bookkeeping of t and d on a non-Gaussian field."""
    return {"gaussian": GaussianShortcut(MU, SCALE), "mixture": MixtureShortcut(skewed())}


def test_mixture_velocity_and_flow_match_the_gaussian_closed_form():
    g, gm = GaussianShortcut(MU, SCALE), gaussian_as_mixture(MU, SCALE)
    x, t = torch.randn(200, 2, dtype=torch.float64), torch.rand(200, dtype=torch.float64)
    torch.testing.assert_close(gm.velocity(x, t), g.velocity(x, t), rtol=0, atol=1e-12)
    t0 = torch.full((200,), 0.25, dtype=torch.float64)
    phi = gm.flow_map(x, t0, 0.5, h=1 / 256)                    # RK4: an error of 3e-11 at this h
    torch.testing.assert_close(phi, g.flow(x, t0, torch.full_like(t0, 0.5)), rtol=0, atol=1e-10)


def test_mixture_flow_transports_noise_to_data():
    """Phi_{0->1} of noise lands in the ring's modes with their weights and spread."""
    gm, n = ring(), 8000
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = gm.flow_map(x0, torch.zeros(n), 1.0, h=1 / 16)
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
    """s(x,t,2d) = two_jumps(s, x, t, d), eq. 5, for the exact shortcut: 4 values of d x 3 of t."""
    model = exact_models()[kind]
    x = 1.5 * torch.randn(256, 2, dtype=torch.float64)
    for d in [1 / 128, 1 / 16, 1 / 4, 1 / 2]:
        for t0 in [0.0, 0.25, 1 - 2 * d]:
            t, dd = torch.full((256,), t0), torch.full((256,), d)
            torch.testing.assert_close(model(x, t, 2 * dd), S.two_jumps(model, x, t, dd, clip=None), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_step_doubling_loss_vanishes_for_the_exact_shortcut_only(kind):
    model = exact_models()[kind]
    x1 = skewed().sample(512, seed=0)
    if kind == "gaussian":
        x1 = torch.tensor(MU, dtype=torch.float64) + SCALE * torch.randn(512, 2, dtype=torch.float64)
    loss, info = shortcut_loss(model, x1, bootstrap_frac=1.0, clip=None)
    assert info["sc"] < 1e-16 and math.isnan(info["fm"])

    class Wrong(torch.nn.Module):       # exact, plus an error that grows with the level
        def forward(self, x, t, d, y=None):
            return model(x, t, d) + 0.1 * S.step_level(d)[:, None].double()

    _, info = shortcut_loss(Wrong(), x1, bootstrap_frac=1.0, clip=None)
    assert info["sc"] > 0.005     # the targets sit one level finer: an error of about 0.1


def test_flow_matching_loss_equals_the_irreducible_loss():
    """With bootstrap_frac=0 and the exact velocity, the loss is E_t[s^2 / sigma(t)^2] per element."""
    torch.manual_seed(0)
    for s in (1.0, 0.5):
        model = GaussianShortcut([0.3, -0.8], s)
        x1 = model.mu + s * torch.randn(400_000, 2, dtype=torch.float64)
        loss, info = shortcut_loss(model, x1, bootstrap_frac=0.0)
        t = np.linspace(0, 1, 200_001)
        f = s ** 2 / ((1 - t) ** 2 + t ** 2 * s ** 2)
        expected = ((f[1:] + f[:-1]) / 2 * np.diff(t)).sum()            # the trapezoid rule
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
    shortcut_loss(spy, torch.randn(700, 2), bootstrap_frac=0.25)
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
    loss, info = shortcut_loss(model, torch.randn(64, 2), bootstrap_frac=0.25)
    assert loss.item() == pytest.approx((16 * info["sc"] + 48 * info["fm"]) / 64, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_targets_come_from_the_teacher_without_gradient():
    torch.manual_seed(0)
    student, teacher = Spy(), Spy()
    loss, _ = shortcut_loss(student, torch.randn(64, 2), teacher=teacher, bootstrap_frac=0.5)
    assert len(teacher.calls) == 2 and len(student.calls) == 1
    loss.backward()
    assert teacher.w.grad is None and student.w.grad is not None


def test_targets_are_clipped():
    class Big(torch.nn.Module):
        def forward(self, x, t, d, y=None):
            return torch.full_like(x, 10.0)
    loss, info = shortcut_loss(Big(), torch.zeros(8, 3), bootstrap_frac=1.0, clip=4.0)
    assert info["sc"] == pytest.approx(36.0)          # (10 - 4)^2


def test_the_distillations_clip_only_their_intermediate_point_as_the_official_code():
    class Far(torch.nn.Module):          # s = c + x: the jumps overshoot +-4
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x, t, d, y=None):
            return self.c + x
    far, x1 = Far(10.0), torch.randn(256, 2)
    tg = B.make_targets("progressive-distillation", far, x1, teacher=far, progress=1.0)     # d = 1 from t = 0
    s1 = 10.0 + tg.x_t
    torch.testing.assert_close(tg.target, (s1 + 10.0 + (tg.x_t + 0.5 * s1).clamp(-4, 4)) / 2)
    assert tg.target.max() > 6                        # the target itself is not clipped
    far = Far(1000.0)                                 # an Euler step of 1/128 moves x_t by about 8
    tg = B.make_targets("consistency-distillation", far, x1, teacher=far)
    t, t2 = tg.t[:, None], tg.t[:, None] + 1 / 128
    x_t2 = (tg.x_t + (1000.0 + tg.x_t) / 128).clamp(-4, 4)
    torch.testing.assert_close(tg.target, (x_t2 + (1 - t2) * (1000.0 + x_t2) - tg.x_t) / (1 - t))


def test_the_robust_loss_weighs_rows_within_each_part():
    """loss_power = 0 is the MSE; p > 0 divides each row's summed error e by (e + 1e-3)^p and
    normalises the weights within the bootstrap rows and within the data rows, so that each part
    keeps its batch share however small its errors are; boot_power q > 0 multiplies the bootstrap
    rows' weights by (e + 1e-3)^q."""
    targets = S.Targets(torch.zeros(6, 3), torch.zeros(6), torch.zeros(6), None, torch.zeros(6, 3), n_boot=2)
    err = torch.tensor([1e-6, 4e-6, 0.5, 1.0, 2.0, 3.0])
    loss = lambda e, p, q=0.0: S.regress(lambda x, t, d, y: e.sqrt()[:, None].expand(6, 3), targets, p,  # noqa: E731
                                         boot_power=q)[0]
    torch.testing.assert_close(loss(err, 0.0), err.mean())
    for p in (0.5, 1.0):
        w = (3 * err + 1e-3) ** -p
        parts = [(w[:2] @ err[:2]) / w[:2].sum() * 2, (w[2:] @ err[2:]) / w[2:].sum() * 4]
        torch.testing.assert_close(loss(err, p), sum(parts) / 6)
    grad = torch.func.grad(lambda e: loss(e, 1.0))(err)
    torch.testing.assert_close(grad[:2].sum(), torch.tensor(2 / 6))    # the bootstrap rows' share of the gradient
    w = (3 * err + 1e-3) ** -1.0
    assert w[:2].sum() / w.sum() > 0.99             # which one weighting over the whole batch gives them
    for q in (0.5, 1.0):                            # boot_power: the bootstrap rows by their error^q, the rest MSE
        w = (3 * err[:2] + 1e-3) ** q
        torch.testing.assert_close(loss(err, 0.0, q), ((w @ err[:2]) / w.sum() * 2 + err[2:].sum()) / 6)
    w = (3 * err[2:] + 1e-3) ** -0.5                # q = p: the bootstrap rows' weights cancel to their mean
    torch.testing.assert_close(loss(err, 0.5, 0.5), (err[:2].sum() + (w @ err[2:]) / w.sum() * 4) / 6)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="loss_power"):
            loss(err, bad)
        with pytest.raises(ValueError, match="boot_power"):
            loss(err, 0.0, bad)


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
        target = model.flow_map(x0, torch.zeros(200), 1.0)
    for n in [1, 2, 4, 8, 16, 32, 64, 128]:
        torch.testing.assert_close(S.sample(model, x0, n), target, rtol=0, atol=1e-9)
    torch.testing.assert_close(S.sample(model, x0, [0.5, 0.25, 0.25]), target, rtol=0, atol=1e-9)


def test_flow_sampling_converges_at_first_order():
    model = GaussianShortcut(MU, SCALE)
    x0 = torch.randn(1000, 2, dtype=torch.float64)
    exact = model.flow(x0, torch.zeros(1000), torch.ones(1000))
    errors = [(S.sample(model, x0, n, rule=S.velocity, off_grid=True) - exact).norm(dim=1).mean().item()
              for n in (8, 16, 32, 64)]
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
    with pytest.raises(ValueError, match="positive"):
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
        tg = B.make_targets("progressive-distillation", exact, x1, teacher=exact, progress=progress, clip=math.inf)
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
    x1, mlp = gaussian_batch(2048), S.MLP().double()
    for progress in [*(np.arange(7) + 0.5) / 7, 1.0]:                # every stage, and the end
        k = min(int(progress * 7), 6)
        tg = B.make_targets("consistency-training", mlp, x1, progress=progress)
        dt = 0.5 ** k                                            # 1, 1/2, ..., 1/64 as training goes on
        assert torch.all(torch.remainder(tg.t, dt) == 0) and tg.t.max() <= 1 - dt
        torch.testing.assert_close(tg.d, 1 - tg.t)
        tg = B.make_targets("progressive-distillation", mlp, x1, teacher=mlp, progress=progress)
        d = 2.0 ** (k - 6)                                       # stage j trains d = 2^-(6-j): 1/64 first
        assert torch.all(tg.d == d) and torch.all(torch.remainder(tg.t, d) == 0) and tg.t.max() <= 1 - d
    stages = [i for i in range(700) if B.new_stage("progressive-distillation", i / 700, (i + 1) / 700)]
    assert stages == [99, 199, 299, 399, 499, 599]               # the teacher is refreshed 6 times
    assert not any(B.new_stage("shortcut", i / 700, (i + 1) / 700) for i in range(700))
    for name in ("flow", "diffusion", "reflow"):                 # velocity objectives are told d = 0
        tg = B.make_targets(name, mlp, x1, teacher=mlp)
        assert torch.all(tg.d == 0)
    tg = B.make_targets("live-reflow", mlp, x1)
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
    x = B.OBJECTIVES["consistency-training"].sample(exact, torch.randn(200_000, 2, dtype=torch.float64), 4)
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


def authors_v1(P_mean_t, P_std_t, P_mean_r, P_std_r, ratio, num_samples):
    """py-meanflow's sample_two_timesteps_t_r_v1, transcribed (their time: 0 at the data)."""
    t = torch.sigmoid(torch.randn(num_samples) * P_std_t + P_mean_t)
    r = torch.sigmoid(torch.randn(num_samples) * P_std_r + P_mean_r)
    mask = torch.rand(num_samples) < 1 - ratio
    r = torch.where(mask, t, r)
    r = torch.minimum(t, r)
    return t, r


def authors_loss(u, u_tgt, norm_p, norm_eps=1e-3):
    """py-meanflow's adaptive loss, transcribed: the per-sample summed error over sg(e + eps)^p, a plain mean."""
    loss = ((u - u_tgt) ** 2).sum(dim=tuple(range(1, u.ndim)))
    adp_wt = (loss + norm_eps) ** norm_p
    return (loss / adp_wt.detach()).mean()


def test_meanflow_draws_its_queries_and_weighs_its_loss_as_its_authors_do():
    torch.manual_seed(0)
    x1 = torch.randn(40_000, 2)
    tg = B.make_targets("meanflow", GaussianShortcut(MU, SCALE), x1)
    torch.manual_seed(0)
    torch.randn(2, 40_000, 2)                                         # the data x1 and the noise x0
    t, r = authors_v1(-0.6, 1.6, -4.0, 1.6, 0.75, 40_000)            # their CIFAR-10 script's values

    def pairs(start, gap):                # the (t, d) pairs in lexicographic order: rows may be permuted
        by_gap = gap.argsort(stable=True)
        rows = by_gap[start[by_gap].argsort(stable=True)]
        return torch.stack([start[rows], gap[rows]])
    torch.testing.assert_close(pairs(tg.t, tg.d), pairs(1 - t, t - r), rtol=0, atol=0)
    assert tg.n_boot == int((t > r).sum()) and torch.all(tg.d[:tg.n_boot] > 0) and torch.all(tg.d[tg.n_boot:] == 0)
    assert 0.28 < 1 - tg.n_boot / 40_000 < 0.32           # r > t rows become flow matching too: ~30%, not 25%
    mf = B.OBJECTIVES["meanflow"]
    assert (mf.loss_power, mf.per_part, mf.t_scale, mf.d_embed) == (0.75, False, 1.0, "gap")
    model = S.MLP(d_embed="gap", t_scale=1.0)
    torch.nn.init.normal_(model.out[1].weight, std=0.1)
    small = S.Targets(tg.x_t[:512], tg.t[:512], tg.d[:512], None, tg.target[:512], 400)
    loss, _ = S.regress(model, small, 0.75, per_part=False)
    expected = authors_loss(model(small.x_t, small.t, small.d), small.target.float(), 0.75)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    tg = B.make_targets("meanflow", GaussianShortcut(MU, SCALE), x1, ratio=0.25)
    below = 0.5 * math.erfc(-3.4 / (1.6 * 2))             # P(logit tau_r < logit tau_t) = P(N(-3.4, 2 * 1.6^2) < 0)
    assert tg.n_boot / 40_000 == pytest.approx(0.25 * below, abs=0.01)     # kept with 1/4, and then if r < t


class GaussianVelocity(GaussianShortcut):
    """Only the velocity of the Gaussian flow, as a flow-matching model answers, and a counter."""
    num_classes, calls = 0, 0

    def forward(self, x, t, d, y=None):
        GaussianVelocity.calls += 1
        return self.velocity(x, t).to(x.dtype)


def test_amed_takes_two_evaluations_a_step_and_learns_a_better_step_than_the_midpoint():
    flow = GaussianVelocity(MU, SCALE).double()
    amed = B.AMED().double()
    x0 = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = flow.flow(x0, torch.zeros(1000), torch.ones(1000))
    one_step = lambda: (S.sample(flow, x0, 1, rule=amed.step) - exact).norm(dim=1).mean()      # noqa: E731
    before = one_step()
    midpoint = (x0 + flow.velocity(x0 + 0.5 * flow.velocity(x0, torch.zeros(1000)), torch.full((1000,), 0.5))
                - exact).norm(dim=1).mean()
    torch.testing.assert_close(before, midpoint)                  # it starts as the midpoint rule
    GaussianVelocity.calls = 0
    S.sample(flow, x0, 4, rule=amed.step)
    assert GaussianVelocity.calls == 8                            # NFE 2 per step
    torch.manual_seed(0)
    amed.fit(flow, x0, iters=80)
    after = one_step()
    assert after < 0.5 * before, (before, after)
    untouched = S.MLP()                                           # AMED reads the flow and leaves it as it was
    B.AMED().fit(untouched, torch.randn(64, 2), iters=2)
    assert all(p.requires_grad and p.grad is None for p in untouched.parameters())
    assert not any(k.startswith("flow") for k in amed.state_dict())


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


def test_told_the_gap_the_network_tells_every_d_apart():
    """d_embed="gap" (MeanFlow's) embeds d itself: below 1/128, where every level is the velocity's,
    each d still has its own answer and a derivative."""
    torch.manual_seed(0)
    x, t, fine, finer = torch.randn(4, 2), torch.rand(4), torch.full((4,), 1 / 256), torch.full((4,), 1 / 512)
    level, gap = S.MLP(), S.MLP(d_embed="gap", t_scale=1.0)
    for model in (level, gap):
        torch.nn.init.normal_(model.out[1].weight, std=0.3)
    torch.testing.assert_close(gap.cond(t, fine), gap.cond.t_emb(t) + gap.cond.d_emb(fine))
    assert torch.equal(level(x, t, fine), level(x, t, finer))
    assert not torch.allclose(gap(x, t, fine), gap(x, t, finer))
    finer.requires_grad_(True)
    gap(x, t, finer).sum().backward()
    assert finer.grad.abs().min() > 0


def test_library_errors_are_one_clear_value_error_each():
    """The library trusts its caller, as nanoGPT and DiT do, except where a mistake would give a
    silent wrong answer (a NaN, an ignored label, a step off the grid): one ValueError each."""
    mlp = S.MLP(dim=2, num_classes=3)
    x, t, d = torch.randn(4, 2), torch.rand(4), torch.zeros(4)
    cases = [
        (lambda: S.MLP()(x, t, d, torch.zeros(4, dtype=torch.long)), "no classes"),
        (lambda: shortcut_loss(mlp, x, bootstrap_frac=1.5), "bootstrap_frac"),
        (lambda: shortcut_loss(mlp, x, clip=-1.0), "clip must be positive"),
        (lambda: shortcut_loss(mlp, x, loss_power=-1.0), "loss_power"),
        (lambda: S.sample(mlp, x, 1, torch.zeros(4, dtype=torch.long), cfg_scale=float("nan")), "cfg_scale"),
        (lambda: B.make_targets("meanflow", mlp, x, ratio=1.5), "ratio"),
        (lambda: B.make_targets("shortcut", mlp, x, progress=1.5), "progress"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_ema_update_is_exact():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expected = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    S.ema_update(a, b, decay=0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p, e)


################################################################################
#                                   Measures                                   #


################################################################################


def test_frechet_distance_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    ca, cb = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    assert images.frechet(mu_a, ca, mu_b, cb) == pytest.approx(5 + (1 - 3) ** 2 + (2 - 1) ** 2)
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])        # invariant under a common rotation
    assert images.frechet(rot @ mu_a, rot @ ca @ rot.T, rot @ mu_b, rot @ cb @ rot.T) == pytest.approx(10.0)


def test_exercise_4_without_stop_gradient_the_targets_carry_gradient():
    def grads(stop_grad, frac=0.5):
        torch.manual_seed(0)
        model = S.MLP(width=32)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        torch.manual_seed(1)
        loss, _ = shortcut_loss(model, torch.randn(64, 2), bootstrap_frac=frac, stop_grad=stop_grad)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(grads(True), grads(False))
    torch.testing.assert_close(grads(True, frac=0.0), grads(False, frac=0.0))   # no targets, no difference


def test_exercise_13_one_mean_value_time_is_exact_along_the_rays_of_symmetry_only():
    """AMED's step x0 + v(x0 + u v(x0, 0), u) with the exact ring flow: on a ray of symmetry
    (through a mode, or half way between two) the flow is one-dimensional and some u lands on
    Phi; off them no single u does."""
    gm = ring()
    angle = torch.tensor([0.0, math.pi / 8, math.pi / 16])      # through a mode, between two, neither
    x0 = torch.stack([torch.cos(angle), torch.sin(angle)], 1).double() * 0.8
    zero = torch.zeros(3, dtype=torch.float64)
    jump = gm.flow_map(x0, zero, 1.0, h=1 / 128) - x0
    v0 = gm.velocity(x0, zero)
    miss = torch.stack([(gm.velocity(x0 + u * v0, zero + u) - jump).norm(dim=1)
                        for u in torch.linspace(0, 1, 1001, dtype=torch.float64)]).min(0).values
    assert max(miss[0], miss[1]) < 0.01 < 0.1 < miss[2], miss
