"""The scripts' tests: the toy's measures and exercises, train_toy.py and train_images.py end to
end, their run records, checkpoints and faults (hostile archives, corrupt checkpoints, a full
disk, NaN, signals, a folder in use, several processes). The method's specification is
test_shortcut.py.

    python -m pytest -q test_scripts.py
"""
import dataclasses
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
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
import runs as R
import shortcut as S
import train_images as ti
import train_toy as toy
from test_shortcut import MU, SCALE, GaussianShortcut, Mixture, MixtureShortcut, Spy, skewed

torch.set_default_dtype(torch.float32)


def unlocked(folder):
    """Whether no run holds the folder: its lock can be taken."""
    try:
        with R.claim(str(folder)):
            return True
    except R.UserError:
        return False


################################################################################
#                   The toy's data, exact flow and measures                    #
################################################################################

def test_the_toy_mixture_flow_is_the_specifications():
    """train_toy's GaussianMixture (solves in each component's eigenbasis) against the
    specification's exact mixture, on the ring and the skewed mixture."""
    for gm in (toy.ring(), toy.GaussianMixture(skewed().pi, skewed().mu, skewed().cov)):
        spec = Mixture(gm.pi.numpy(), gm.mu.numpy(), gm.cov.numpy())
        x, t = 2 * torch.randn(300, 2, dtype=torch.float64), torch.rand(300, dtype=torch.float64)
        torch.testing.assert_close(gm.velocity(x, t), spec.velocity(x, t), rtol=0, atol=1e-12)


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
    gaussian = toy.GaussianMixture([1.0], [MU], [SCALE ** 2 * np.eye(2)])
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
    gm, path = toy.ring(), toy.mixture_paths()
    data = toy.ring().sample(500, np.random.default_rng(0))
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


def test_the_ring_has_unit_scale():
    x = toy.ring().sample(5000, np.random.default_rng(0))
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
    data = toy.ring().sample(20_000, np.random.default_rng(0))
    teacher = quick_train(steps=steps, objective="flow")[0] if B.OBJECTIVES[objective].two_phase else None
    return toy.train(toy.record(args), data, teacher)


def one_step_w2(model, flow=False):
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    data = toy.ring().sample(2000, np.random.default_rng(5))
    return toy.sliced_w2(S.sample(model, x0, 1, rule=S.velocity if flow else S.jump).numpy(), data)


def off_mode(model, objective, steps):
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)                            # the multistep rule draws fresh noise
    return toy.off_mode_fraction(B.OBJECTIVES[objective].sample(model, x0, steps).numpy(), toy.ring())


def test_exercise_2_one_flow_step_lands_on_the_data_mean():
    gm = skewed()
    x0 = torch.randn(300, 2, dtype=torch.float64)
    mean = (gm.pi[:, None] * gm.mu).sum(0)
    x1 = S.sample(MixtureShortcut(gm), x0, 1, rule=S.velocity)             # x0 + v(x0, 0) = E[x1]
    torch.testing.assert_close(x1, mean.expand_as(x1), rtol=0, atol=1e-12)
    model, _ = quick_train(objective="flow")                          # and a trained baseline collapses
    x1 = S.sample(model, torch.randn(2000, 2), 1, rule=S.velocity)
    assert x1.std(0).max() < 0.2 * toy.ring().sample(2000, np.random.default_rng(0)).std(0).min()
    shortcut, _ = quick_train()
    assert one_step_w2(shortcut) < 0.25 * one_step_w2(model, flow=True)


def test_exercise_3_without_flow_matching_nothing_is_learned():
    """bootstrap_frac=1: no ground at all. From the zero init every target is 0, so the loss is
    exactly 0, no gradient flows, and the model still outputs 0 after training."""
    model, log = quick_train("--bootstrap-frac", "1", steps=50)
    assert max(log["sc"]) == 0.0 and all(math.isnan(v) for v in log["fm"])
    x, t, d = torch.randn(100, 2), torch.rand(100), 0.5 ** torch.randint(0, 8, (100,)).float()
    assert torch.all(model(x, t, d) == 0)
    x0 = torch.randn(100, 2)
    torch.testing.assert_close(S.sample(model, x0, 1), x0)


def test_exercise_3_a_missing_level_is_interpolated_by_its_neighbours():
    """--ungrounded drops the 2d = 1/64 targets. Measured: the smooth level embedding fills
    the unsupervised level d = 1/64 in from levels 1/32 and 1/128, so the harm is small."""
    spy = Spy()
    S.regress(spy, S.shortcut_targets(spy, torch.randn(700, 2), grounded=False))
    big_steps = set(spy.calls[-1][2][:175].tolist())            # the student's query of each bootstrap row
    assert big_steps == {2.0 ** -k for k in range(6)} and 1 / 64 not in big_steps
    path = toy.mixture_paths()
    good, bad = toy.exact_errors(quick_train()[0], path), toy.exact_errors(quick_train("--ungrounded")[0], path)
    assert all(bad[n] < 1.5 * good[n] for n in toy.STEP_COUNTS), (good, bad)


def test_exercise_5_a_larger_bootstrap_share_smears_one_step_less(tmp_path):
    small, large = quick_train("--bootstrap-frac", str(1 / 16))[0], quick_train("--bootstrap-frac", "0.5")[0]
    assert off_mode(small, "shortcut", 1) > off_mode(large, "shortcut", 1)
    metrics = toy.main(["--sweep", "bootstrap-frac", "--steps", "20", "--width", "16", "--n-samples", "500",
                        "--out", str(tmp_path)])
    assert list(metrics["train_seconds"]) == ["bootstrap 1/16", "bootstrap 1/8", "bootstrap 1/4", "bootstrap 1/2"]
    assert all((tmp_path / f"sweep.{ext}").stat().st_size > 0 for ext in ("md", "json", "npz", "png"))
    assert "| bootstrap 1/16 |" in (tmp_path / "sweep.md").read_text()


def test_exercise_6_uniform_d_samples_in_one_step_with_less_accurate_jumps():
    uniform, dyadic = quick_train("--d-sampling", "uniform")[0], quick_train()[0]
    flow = quick_train(objective="flow")[0]
    assert max(off_mode(uniform, "shortcut", 1), off_mode(dyadic, "shortcut", 1)) < 0.5 * off_mode(flow, "flow", 1)
    path = toy.mixture_paths()
    coarse = lambda m: np.mean([toy.exact_errors(m, path)[n] for n in (2, 4, 8)])     # noqa: E731
    assert coarse(uniform) > coarse(dyadic)


def test_exercise_7_the_exact_error_falls_with_training_at_every_d():
    path = toy.mixture_paths()
    run = toy.record(toy.parse_args(["--steps", "400", "--width", "64"]))
    data = toy.ring().sample(20_000, np.random.default_rng(0))
    _, log = toy.train(run, data, track=(200, lambda m: toy.exact_errors(m, path)))
    first, last = log["exact"][1], log["exact"][400]
    assert set(log["exact"]) == {1, 200, 400}
    assert all(last[n] < 0.75 * first[n] for n in toy.STEP_COUNTS), (first, last)


def test_exercise_8_a_slow_ema_teacher_lags_in_a_short_run():
    online, ema = quick_train()[0], quick_train("--ema-teacher")[0]     # decay 0.999: a horizon of ~1000 steps
    assert off_mode(ema, "shortcut", 1) > 1.5 * off_mode(online, "shortcut", 1)


def test_exercise_10_without_its_curriculum_consistency_training_smears_less():
    with_curriculum = quick_train(objective="consistency-training")[0]
    fixed_step = quick_train("--no-curriculum", objective="consistency-training")[0]
    tg = B.make_targets("consistency-training", fixed_step, torch.randn(64, 2), progress=0.0, curriculum=False)
    assert torch.all(torch.remainder(tg.t, 1 / 64) == 0) and tg.t.max() == 63 / 64     # dt = 1/64 from step 1
    for n in (1, 4):
        assert off_mode(fixed_step, "consistency-training", n) < off_mode(with_curriculum, "consistency-training", n)


def test_exercise_11_progressive_distillation_is_a_one_step_model():
    """At an equal total budget (teacher + student = shortcut), the distilled network gets
    worse with more steps: only its last stage, d = 1, is trained at the end."""
    distilled, shortcut = quick_train(objective="progressive-distillation", steps=200)[0], quick_train()[0]
    assert off_mode(distilled, "progressive-distillation", 128) > off_mode(distilled, "progressive-distillation", 1)
    assert off_mode(shortcut, "shortcut", 128) < off_mode(shortcut, "shortcut", 1)


def test_exercise_12_meanflow_wins_by_the_off_mode_share_with_tighter_samples():
    """MeanFlow's recipe (v1 times, adaptive weight p = 0.75, d told continuously) beats the shortcut model's one
    step by the off-mode share after 400 steps of the same MLP, and its samples are far tighter by the spread
    (measured: 11% against 30% off-mode; spread 0.94 against 2.9 at four steps). At full size they end too tight
    (spread 0.35 at four steps), which the off-mode share cannot see."""
    meanflow, shortcut = quick_train("--width", "128", objective="meanflow")[0], quick_train("--width", "128")[0]
    assert off_mode(meanflow, "meanflow", 1) < 0.6 * off_mode(shortcut, "shortcut", 1)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    spread = {m: toy.spread(S.sample(m, x0, 4).numpy(), toy.ring()) for m in (meanflow, shortcut)}
    assert spread[meanflow] < 0.5 * spread[shortcut]


def test_exercise_14_the_end_time_as_the_step_coordinate_changes_little():
    level, end, flow = quick_train()[0], quick_train("--d-embed", "end")[0], quick_train(objective="flow")[0]
    assert abs(off_mode(end, "shortcut", 1) - off_mode(level, "shortcut", 1)) < 0.05
    assert off_mode(end, "shortcut", 1) < 0.5 * off_mode(flow, "flow", 1)


def exercise(number, folder, monkeypatch):
    """Runs the python of exercise NUMBER's command in docs/EXERCISES.md on the models in `folder`, from there."""
    with open(os.path.join("docs", "EXERCISES.md")) as f:
        code = f.read().split(f"\n## {number}. ", 1)[1].split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["-", str(folder)])
    namespace = {}
    exec(code, namespace)
    return namespace


def saved_quick_model(folder):
    run = toy.record(toy.parse_args(["--steps", "400", "--width", "64"]))
    toy.save_model(str(folder / "shortcut.pt"), run, quick_train()[0], 0.0)


def test_exercise_15_the_telescope_closes_the_gap_by_doubling(tmp_path, monkeypatch):
    saved_quick_model(tmp_path)
    tel = exercise(15, tmp_path, monkeypatch)["telescope"][0]      # (step counts, measures)
    to_phi, to_128 = tel[:, 0], tel[:, 1]
    assert to_128[-1] == 0 and to_phi[0] > to_phi[-1] and to_128[0] > to_128[3]      # N = 1 against N = 8
    assert (tmp_path / "ex15_telescope.png").stat().st_size > 0


def test_exercise_16_a_level_inherits_its_error_and_the_last_jump_is_the_worst(tmp_path, monkeypatch):
    saved_quick_model(tmp_path)
    errors = exercise(16, tmp_path, monkeypatch)["errors"][0]      # (levels, first/last jump, total/fit/inherited)
    assert errors[0, 0, 2] > errors[0, 0, 1]                       # d = 1: more inherited than not fitted
    assert errors[1, 1, 0] > errors[1, 0, 0]                       # d = 1/2: the jump to the data is worse
    assert (tmp_path / "ex16_local_inherited.png").stat().st_size > 0


################################################################################
#                      train_toy.py: runs, records, faults                     #
################################################################################

def run_cli(script, argv, capsys):
    """A script's exit code and stderr, run in-process through its cli."""
    with pytest.raises(SystemExit) as e:
        R.cli(script.main, "lower --batch-size", argv)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """One short --table1 run for the tests: every objective for 30 steps."""
    out = tmp_path_factory.mktemp("table1")
    flags = ["--table1", "--steps", "30", "--width", "16", "--n-samples", "500", "--out", str(out)]
    return out, flags, toy.main(flags)


def test_table1_writes_its_outputs_and_every_objective_samples(tiny_table):
    out, _, metrics = tiny_table
    npz = np.load(out / "table1.npz")
    assert npz["data"].shape == (500, 2)
    for name in [*B.OBJECTIVES, "shortcut_robust_loss"]:
        assert (out / f"{name}.pt").exists()
        for n in (1, 2, 4, 8, 128):
            assert npz[f"{name}_{n}"].shape == (500, 2) and np.isfinite(npz[f"{name}_{n}"]).all(), (name, n)
    md = (out / "table1.md").read_text()
    rows = [*B.OBJECTIVES, "shortcut, robust loss", "AMED on flow", "midpoint on flow"]
    assert all(f"| {name} |" in md for name in rows)
    assert all(npz[f"AMED_on_flow_{n}"].shape == (500, 2) for n in (2, 4, 8, 128)) and "AMED_on_flow_1" not in npz
    _, flow, _ = toy.load_model(str(out / "flow.pt"))          # the midpoint row is the midpoint rule on the flow row
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v0 = flow(x0, torch.zeros(500), torch.zeros(500))
        midpoint = x0 + flow(x0 + 0.5 * v0, torch.full((500,), 0.5), torch.zeros(500))
    np.testing.assert_allclose(npz["midpoint_on_flow_2"], midpoint, atol=1e-6)
    assert not np.allclose(npz["midpoint_on_flow_2"], npz["AMED_on_flow_2"], atol=1e-3)     # AMED learned a step
    assert (out / "table1.png").stat().st_size > 0
    assert metrics["seeds"] == [0] and 0 <= metrics["off_mode"]["shortcut"][1] <= 1
    assert metrics["exact_error"]["diffusion"] is None
    saved = json.loads((out / "table1.json").read_text())
    assert saved["run"]["steps"] == 30 and toy.load_model(out / "reflow.pt")[0].teacher.objective == "flow"


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


def test_toy_script_writes_its_outputs(tmp_path):
    metrics = toy.main(["--steps", "30", "--n-samples", "2000", "--width", "32", "--out", str(tmp_path)])
    for f in ("toy.png", "exact.png", "toy.npz", "toy.json", "toy.md",
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
    assert unlocked(tmp_path)


def test_a_toy_teacher_is_trained_with_the_students_record(tmp_path, capsys):
    """The two-phase rows learn from the flow row of the same seed and record (but for the
    objective): progressive distillation, which starts as its teacher, reads d as its teacher
    does (--d-embed) and t at its scale; a teacher from elsewhere (--teacher) is not a flag."""
    base = ["--steps", "5", "--width", "16", "--n-samples", "200", "--objective", "progressive-distillation"]
    metrics = toy.main(base + ["--d-embed", "end", "--t-scale", "1", "--seeds", "2", "--out", str(tmp_path / "pd")])
    for seed in ("", "_seed1"):
        teacher, student = (toy.load_model(tmp_path / "pd" / f"{name}{seed}.pt")[0]
                            for name in ("flow", "progressive-distillation"))
        assert teacher.objective == "flow" and (teacher.d_embed, teacher.t_scale) == ("end", 1.0)
        assert student.teacher == teacher and teacher.seed == student.seed
    assert len(metrics["per_seed"]) == 2
    code, err = run_cli(toy, base + ["--teacher", "x.pt", "--seeds", "3"], capsys)
    assert code == 2 and "unrecognized arguments: --teacher" in err


def test_boot_power_reaches_the_loss_and_keeps_the_one_step_map():
    """--boot-power weighs the bootstrap rows by their error: the record holds it (a record saved before the flag
    existed loads as 0), the same seed trains other weights, and the flow-matching rows' MSE still grounds a
    one-step map far from a flow model's one step."""
    saved = dataclasses.asdict(toy.record(toy.parse_args(["--boot-power", "0.5"])))
    assert saved["boot_power"] == 0.5 and toy.Run.load({**saved, "boot_power": 0.0}) == toy.Run.load(
        {k: v for k, v in saved.items() if k != "boot_power"})
    weighted, plain = quick_train("--boot-power", "0.5")[0], quick_train()[0]
    x, t, d = torch.randn(100, 2), torch.rand(100), torch.full((100,), 0.5)
    assert not torch.allclose(weighted(x, t, d), plain(x, t, d), atol=1e-3)
    assert off_mode(weighted, "shortcut", 1) < 0.5 * off_mode(quick_train(objective="flow")[0], "flow", 1)


def test_toy_cli_rejects_bad_flags_in_one_line(tmp_path, capsys):
    """Bad or contradicting flags stop in one line with exit code 2 before anything is trained;
    a finite loss whose update makes the weights non-finite stops too, and nothing is saved."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for flags in (["--bootstrap-frac", "2"], ["--steps", "0"], ["--lr", "nan"],
                  ["--seed", "-1"], ["--out", str(a_file)], ["--out", ""], ["--objective", "reflow", "--pair", "ot"],
                  ["--table1", "--pair", "ot"], ["--table1", "--objective", "flow"], ["--sweep", "bootstrap-frac",
                  "--bootstrap-frac", "0.5"], ["--table1", "--ema-teacher"], ["--objective", "reflow", "--ema-teacher"],
                  ["--steps", "9" * 400], ["--t-scale", "1e300"], ["--n-samples", "1"], ["--boot-power", "-1"],
                  ["--boot-power", "1", "--objective", "flow"], ["--boot-power", "1", "--table1"]):
        code, err = run_cli(toy, flags + ["--out", str(tmp_path / "never")] * ("--out" not in flags), capsys)
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (flags, err)
    assert not (tmp_path / "never").exists()
    code, err = run_cli(toy, ["--steps", "1", "--lr", "1e100", "--no-baseline", "--width", "16", "--n-samples", "100",
                              "--out", str(tmp_path / "nan")], capsys)
    assert code == 1 and "non-finite" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nan" / "shortcut.pt").exists()
    r = subprocess.run([sys.executable, "train_toy.py", "--steps", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: argument --steps: must be an integer from 1 to 10^9, got '0'"


def test_a_toy_folder_is_replaced_only_by_a_run_of_the_same_record(tmp_path, capsys):
    flags = ["--steps", "5", "--width", "16", "--n-samples", "200", "--no-baseline", "--out", str(tmp_path)]
    toy.main(flags)
    before = (tmp_path / "toy.json").read_bytes()
    code, err = run_cli(toy, flags + ["--lr", "1e-3"], capsys)
    assert code == 2 and "holds the outputs of another run" in err and (tmp_path / "toy.json").read_bytes() == before
    toy.main(flags + ["--reuse"])                                # the same record may replace them
    assert json.loads((tmp_path / "toy.json").read_bytes())["run"] == json.loads(before)["run"]


################################################################################
#                           train_images.py: data                              #
################################################################################

def write_cifar(root, monkeypatch=None, n=20, batches=None):
    """A small CIFAR-10 archive in the real python-pickle format: 5 training batches, a test batch, meta.
    With monkeypatch, its md5 stands in for the published one, so the loader accepts it."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = batches or {name: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": name.encode()}
                          for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    shutil.rmtree(folder)               # the extracted folder is not read: only the archive has a published md5
    if monkeypatch is not None:
        monkeypatch.setattr(images, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return batches


def test_cifar_loader_reads_the_python_archive(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path, monkeypatch)
    x, y = images.load_cifar10(str(tmp_path))
    assert x.shape == (100, 3, 32, 32) and x.dtype == np.uint8 and y.shape == (100,)
    first = batches["data_batch_1"]
    assert np.array_equal(x[0, 1].ravel(), first[b"data"][0, 1024:2048])   # channel-major rows
    assert np.array_equal(x[20], batches["data_batch_2"][b"data"][0].reshape(3, 32, 32))
    assert y[:20].tolist() == list(first[b"labels"])


def test_cifar_loader_errors(tmp_path):
    with pytest.raises(R.UserError, match="--download"):
        images.load_cifar10(str(tmp_path / "nowhere"))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(R.UserError, match="corrupt"):
        images.load_cifar10(str(tmp_path))
    with pytest.raises(R.UserError, match="md5"):
        images.check_md5(str(tmp_path / "cifar-10-python.tar.gz"), images.CIFAR_MD5)


class RunsCode:
    """Unpickling this runs a shell command: what a crafted CIFAR-10 batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_archive_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    evil = {f"data_batch_{i}": {b"data": RunsCode(marker), b"labels": [0]} for i in range(1, 6)}
    write_cifar(tmp_path / "data", batches=evil)
    with pytest.raises(R.UserError, match="not the published.*unpickled"):       # the published md5 fails first
        images.load_cifar10(str(tmp_path / "data"))
    write_cifar(tmp_path / "data2", monkeypatch, batches=evil)
    with pytest.raises(R.UserError, match="refusing to unpickle .*system"):       # the unpickler refuses
        images.load_cifar10(str(tmp_path / "data2"))
    assert not marker.exists()


def test_a_flipped_byte_in_the_cifar_archive_is_caught_by_its_md5(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    images.load_cifar10(str(tmp_path))
    archive = tmp_path / "cifar-10-python.tar.gz"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 1
    archive.write_bytes(bytes(raw))
    with pytest.raises(R.UserError, match="not the published"):
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
    assert (tmp_path / "celeba64.npz").exists()
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
    with pytest.raises(R.UserError, match="000002.png.*DecompressionBomb"):
        images.load_celeba(str(tmp_path))
    (tmp_path / "000002.png").unlink()
    for bad in (b"garbage", None):             # unreadable, then a readable array of the wrong shape
        if bad is None:
            np.savez(tmp_path / "celeba64.npz", x=np.zeros((2, 3, 32, 32), np.uint8))
        else:
            (tmp_path / "celeba64.npz").write_bytes(bad)
        x, _ = images.load_celeba(str(tmp_path))
        assert x.shape == (1, 3, 64, 64) and "computing it afresh" in capsys.readouterr().out

    def read_only(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(images, "write_atomic", read_only)
    (tmp_path / "celeba64.npz").unlink()
    x, _ = images.load_celeba(str(tmp_path))             # the decoded images survive a read-only folder
    assert x.shape == (1, 3, 64, 64) and "continuing without it" in capsys.readouterr().out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))      # shares the cached digit classifier


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
    assert weights(out / "checkpoint.pt")["step"] == 4 and unlocked(out)
    judge = images.DigitsJudge(os.path.join(data_dir, "digits_judge.npz"))
    x, y = images.load_digits()
    assert (judge.predict(x / 255.0) == y).mean() > 0.97


def stopped_at_first_save(monkeypatch, argv):
    """Runs train_images.py with argv and stops it right after its first checkpoint, as Ctrl-C would."""
    save = ti.save_checkpoint

    def save_and_stop(path, *a, **k):
        save(path, *a, **k)
        raise R.Interrupted("stopped after the first checkpoint", "SIGINT")
    monkeypatch.setattr(ti, "save_checkpoint", save_and_stop)
    with pytest.raises(R.Interrupted):
        ti.main(argv)
    monkeypatch.setattr(ti, "save_checkpoint", save)


def test_resume_is_bit_exact_and_restores_the_record(tmp_path, data_dir, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    common = TINY + ["--data-dir", data_dir, "--save-every", "3", "--ema-teacher", "--lr", "1e-3", "--steps", "6"]
    ti.main(common + ["--out", str(full)])
    stopped_at_first_save(monkeypatch, common + ["--out", str(part)])
    assert weights(part / "checkpoint.pt")["step"] == 3
    ti.main(["--resume", str(part / "checkpoint.pt"), *TINY[4:]])   # no record flags at all
    a, b = weights(full / "checkpoint.pt"), weights(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and a["run"] == b["run"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


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
    stopped_at_first_save(monkeypatch, common + pd + ["--out", str(part)])
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


def test_sample_only_samples_with_the_checkpoints_objective_into_its_own_folder(tmp_path, data_dir, capsys):
    out = tmp_path / "ct"
    ti.main(TINY + ["--objective", "consistency-training", "--steps", "2", "--out", str(out), "--data-dir", data_dir])
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    metrics = ti.main(["--sample-only", "--resume", str(out / "checkpoint.pt"), "--data-dir", data_dir, *TINY[4:]])
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == files      # the run's own files stay
    assert metrics["run"]["objective"] == "consistency-training" and "consistency-training_1" in metrics
    assert metrics["train_seconds"] is None and "shortcut_1" not in metrics
    before, after = np.load(io.BytesIO(files["samples.npz"])), np.load(out / "sampled" / "samples.npz")
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
    for flags, message in ((["--out", str(out)], "writes its own files"), (["--steps", "5"], "--steps 5 contradicts")):
        code, err = run_cli(ti, ["--sample-only", "--resume", str(out / "checkpoint.pt"), "--data-dir", data_dir,
                                 *TINY[4:], *flags], capsys)
        assert code == 2 and message in err, err


def test_a_teacher_must_be_a_finished_flow_run_of_the_same_data_and_model(tmp_path, data_dir, capsys):
    common = TINY + ["--steps", "2", "--data-dir", data_dir]
    flow, shortcut = tmp_path / "flow", tmp_path / "shortcut"
    metrics = ti.main(common + ["--objective", "flow", "--out", str(flow), "--amed-iters", "2"])
    assert {"flow_1", "amed_2", "amed_4", "amed_8", "midpoint_2", "midpoint_8"} <= set(metrics)   # and by AMED
    ti.main(common + ["--out", str(shortcut)])
    state = weights(flow / "checkpoint.pt")
    unfinished, nan, broken = tmp_path / "unfinished.pt", tmp_path / "nan.pt", tmp_path / "broken.pt"
    torch.save({**state, "step": 1}, unfinished)
    torch.save({**state, "ema": {k: v * float("nan") for k, v in state["ema"].items()}}, nan)
    torch.save({**state, "ema": dict(list(state["ema"].items())[1:])}, broken)
    cases = [(shortcut / "checkpoint.pt", "its record says shortcut"), (unfinished, "unfinished"),
             (nan, "non-finite values"), (broken, "does not fit"),
             (flow / "checkpoint.pt", "patch 2 (not 4)", ["--patch", "4"]), (tmp_path / "none.pt", "no checkpoint")]
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
              "nan ema": {**state, "ema": {k: v * float("nan") for k, v in state["ema"].items()}},
              "unknown objective": {**state, "run": {**state["run"], "objective": "distill"}},
              "nan lr": {**state, "run": {**state["run"], "lr": float("nan")}},
              "nan moments": {**state, "opt": {**state["opt"], "state": {
                  k: {**v, "exp_avg": v["exp_avg"] * float("nan")} for k, v in state["opt"]["state"].items()}}}}
    paths = {}
    for name, s in faults.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pt"
        if s is None:
            paths[name].write_bytes(b"")
        else:
            torch.save(s, paths[name])
    return paths


def test_bad_input_stops_in_one_line_before_anything_is_written(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    cases = [(["--dataset", "mnist"], "invalid choice: 'mnist'"), (["--patch", "0"], "from 1 to 10^9"),
             (["--patch", "-2"], "from 1 to 10^9"), (["--lr", "nan"], "finite number above 0"),
             (["--lr", "-1"], "--lr"),
             (["--weight-decay", "-0.1"], "--weight-decay"), (["--seed", "-1"], "--seed"),
             (["--out", str(a_file)], "File exists"), (["--out", str(a_file / "sub")], "Not a directory"),
             (["--benchmark", "--bench-steps", "0"], "--bench-steps"), (["--cfg-scale", "inf"], "from -100 to 100"),
             (["--cfg-scale", "nan"], "from -100 to 100"), (["--n-samples", "1"], "from 2"),
             (["--grad-clip", "-1"], "above 0"),
             (["--grad-clip", "nan"], "above 0"), (["--ema", "2"], "[0, 1)"), (["--ema", "-1"], "[0, 1)"),
             (["--ema", "nan"], "[0, 1)"), (["--label-dropout", "-1"], "[0, 1]"),
             (["--eval-steps", "1,3"], "powers of two"), (["--eval-steps", "1,x"], "powers of two"),
             (["--objective", "reflow", "--pair", "ot", "--teacher", str(ckpt)], "--pair ot: reflow takes"),
             (["--sample-only"], "needs --resume"),
             (["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], "--download"),
             (["--dataset", "cifar10", "--data-dir", str(tmp_path)], "corrupt"),
             (["--out", str(out)], "exists: continue that run"),
             (["--resume", str(ckpt), "--model", "XS"], "--model XS contradicts"),
             (["--resume", str(ckpt), "--objective", "flow"], "--objective flow contradicts"),
             (["--resume", str(ckpt), "--lr", "1e-3"], "a resumed run keeps its record"),
             (["--teacher", str(ckpt)], "--teacher is for the two-phase objectives"),
             (["--data-dir", str(a_file)], "is a file"), (["--dataset", "celeba", "--cfg-scale", "2"], "no classes"),
             (["--objective", "reflow", "--ema-teacher", "--teacher", str(ckpt)], "come from its teacher"),
             (["--out", ""], "a folder"), (["--steps", "9" * 400], "--steps"), (["--t-scale", "1e300"], "--t-scale"),
             (["--log-every", "-1"], "--log-every")]
    cases += [(["--resume", str(p)], "nan_ema" in p.name and "non-finite values" or str(p))
              for p in bad_checkpoints(tmp_path, ckpt).values()]
    for i, (flags, message) in enumerate(cases):
        target = tmp_path / f"c{i}"
        argv = TINY + ["--steps", "4", "--data-dir", data_dir, "--out", str(target)] + flags
        code, err = run_cli(ti, argv, capsys)
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (flags, err)
        assert message in err, (flags, err)
        assert not (target / "checkpoint.pt").exists()
    assert ckpt.read_bytes() == before


def test_resume_into_another_runs_folder_is_refused(tmp_path, data_dir, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    before = (b / "checkpoint.pt").read_bytes()
    code, err = run_cli(ti, TINY + ["--data-dir", data_dir, "--resume", str(a / "checkpoint.pt"), "--out", str(b)],
                        capsys)
    assert code == 2 and "exists: continue that run" in err and len(err.splitlines()) == 1
    assert (b / "checkpoint.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    calls = {"n": 0}
    real = ti.regress

    def poisoned(*a, **k):
        loss, parts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), parts
    monkeypatch.setattr(ti, "regress", poisoned)
    out = tmp_path / "run"
    code, err = run_cli(ti, TINY + ["--steps", "8", "--save-every", "2", "--out", str(out), "--data-dir", data_dir],
                        capsys)
    assert code == 1 and "non-finite" in err and "kept at" in err
    state = weights(out / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--save-every", "1", "--out", str(out), "--data-dir", data_dir])
    state = weights(out / "checkpoint.pt")                       # lr 1e39 overflows float32 at the first update
    torch.save({**state, "run": {**state["run"], "lr": 1e39, "warmup": 1, "steps": 4}}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code, err = run_cli(ti, TINY + ["--steps", "4", "--save-every", "1", "--data-dir", data_dir,
                                    "--resume", str(out / "checkpoint.pt")], capsys)
    assert code == 1 and "non-finite by step 3" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_full_disk_keeps_the_previous_outputs(tmp_path, data_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "2", "--out", str(out), "--data-dir", data_dir])
    again = ["--sample-only", "--resume", str(out / "checkpoint.pt"), "--data-dir", data_dir, *TINY[4:]]
    ti.main(again)
    before = {f: (out / "sampled" / f).read_bytes() for f in ("samples.npz", "metrics.json", "steps.png")}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code, err = run_cli(ti, again, capsys)
    assert code == 2 and err == f"error: No space left on device: {out / 'sampled' / 'samples.npz'}"
    assert {f: (out / "sampled" / f).read_bytes() for f in before} == before
    assert not list(out.glob("**/*.tmp"))


def test_out_of_memory_is_one_line(capsys):
    """A bare MemoryError (no message) and torch's out-of-memory RuntimeError alike."""
    for error in (MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")):
        def main(argv):
            raise error
        with pytest.raises(SystemExit) as e:
            R.cli(main, "lower --batch-size")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "out of memory" in err and "--batch-size" in err and len(err.splitlines()) == 1


def test_a_finished_run_is_only_sampled_and_its_steps_cannot_change(tmp_path, data_dir, capsys):
    """--resume of a finished run samples it; --steps is part of the record, which a resumed run
    keeps: the learning-rate schedule and the curricula are laid out over it."""
    out = tmp_path / "run"
    ti.main(TINY + ["--steps", "4", "--out", str(out), "--data-dir", data_dir])
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    ti.main(["--data-dir", data_dir, "--resume", str(out / "checkpoint.pt"), *TINY[4:]])
    assert "it is only sampled" in capsys.readouterr().out and (out / "checkpoint.pt").read_bytes() == before
    for steps in ("2", "8"):
        code, err = run_cli(ti, ["--steps", steps, "--data-dir", data_dir, "--resume", str(out / "checkpoint.pt"),
                                 *TINY[4:]], capsys)
        assert code == 2 and f"--steps {steps} contradicts" in err and len(err.splitlines()) == 1, err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_cifar_run_without_an_inception_network_says_so(tmp_path, data_dir, capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("pytorch_fid"):
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

@pytest.mark.parametrize("script,sig", [("train_images.py", signal.SIGTERM), ("train_toy.py", signal.SIGINT)])
def test_ctrl_c_and_sigterm_stop_after_saving(tmp_path, data_dir, script, sig):
    out = tmp_path / "run"
    flags = [*TINY, "--data-dir", data_dir, "--save-every", "100000", "--log-every", "1"] \
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
    assert unlocked(out)


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    argv = TINY + ["--steps", "2", "--data-dir", data_dir, "--out", str(out)]
    with R.claim(str(out)):                                    # a live run holds the folder
        code, err = run_cli(ti, argv, capsys)
        assert code == 2 and f"is in use by another run (pid {os.getpid()})" in err
        code, err = run_cli(toy, ["--steps", "2", "--out", str(out)], capsys)
        assert code == 2 and "in use by another run" in err
    assert not (out / "checkpoint.pt").exists() and unlocked(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(dead.stdout)                  # left by a process killed with kill -9
    ti.main(argv)
    assert weights(out / "checkpoint.pt")["step"] == 2 and unlocked(out)


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    code = ("import sys, runs\n"
            "for i in range(300):\n"
            "    runs.write_atomic(sys.argv[1], lambda f: f.write(bytes(4096)))\n")
    target = str(tmp_path / "checkpoint.pt")
    procs = [subprocess.Popen([sys.executable, "-c", code, target], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert os.path.getsize(target) == 4096 and not list(tmp_path.glob("*.tmp"))


################################################################################
#                   Speed and scale: the benchmark, two processes              #
################################################################################

def test_benchmark_mode_prints_its_figures(capsys):
    figures = ti.main(["--benchmark", "--device", "cpu", "--model", "tiny", "--batch-size", "16",
                       "--bench-steps", "2", "--eval-batch-size", "100"])   # > 4 batches
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in B.OBJECTIVES}
    assert list(rows) == list(B.OBJECTIVES)
    assert all(float(r[0]) > 0 and float(r[1]) > 0 for r in rows.values()) and rows["flow"][2] == "1.000"
    assert [line.split()[1] for line in out.splitlines() if "sampling," in line] == ["1", "128"]
    # a step's FLOPs: flow matching is a forward and a backward (2x) of 16 rows; the shortcut's
    # 4 bootstrap rows add the 2 forwards of their targets, 8 more row-forwards on 48
    assert figures["shortcut"][1] / figures["flow"][1] == pytest.approx(1 + 8 / 48, rel=0.01)


def torchrun(*argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_images.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def test_two_processes_finish_with_every_log_every_and_stay_identical(tmp_path, data_dir):
    """torchrun with 2 CPU processes over gloo, three runs at once: whatever --log-every, every
    collective (the logged loss, a save, the stop check) is taken by both processes at the same
    step, so each run finishes. DDP keeps the replicas identical, and the checkpoint holds each
    process's own random state, so that each draws its own half of the global batch."""
    common = [*TINY, "--steps", "40", "--save-every", "15", "--data-dir", data_dir, "--batch-size", "4"]
    runs = {k: torchrun(*common, "--log-every", str(k), "--out", str(tmp_path / f"log{k}")) for k in (0, 1, 5)}
    said = {k: p.communicate(timeout=600)[0] for k, p in runs.items()}
    for k, p in runs.items():
        assert p.returncode == 0 and "all 2 processes hold identical weights" in said[k], (k, said[k][-2000:])
        assert sum(line.startswith("step ") for line in said[k].splitlines()) == {0: 3, 1: 40, 5: 8}[k]
    state = weights(tmp_path / "log5" / "checkpoint.pt")
    assert state["step"] == 40 and len(state["rng"]) == 2 and not torch.equal(state["rng"][0][0], state["rng"][1][0])


def test_sigterm_to_torchrun_saves_once_and_the_checkpoint_resumes_in_one_process(tmp_path, data_dir):
    """torchrun forwards SIGTERM to its processes: they agree on a step, process 0 saves it, and
    each exits 128 + 15. The checkpoint resumes in one process, bit-exactly from what was saved."""
    out = tmp_path / "run"
    proc = torchrun(*TINY, "--steps", "300", "--save-every", "300", "--log-every", "20", "--data-dir", data_dir,
                    "--batch-size", "4", "--out", str(out))
    for line in proc.stdout:                 # wait until training runs
        if line.startswith("step ") and "/300" in line:
            break
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate(timeout=120)[0]
    assert said.count("SIGTERM: saved step") == 2, said[-3000:]           # said by both, saved by process 0
    saved = int(said.split("saved step ")[1].split()[0])
    assert weights(out / "checkpoint.pt")["step"] == saved > 0 and unlocked(out)
    copies = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
        ti.main(["--resume", str(tmp_path / name / "checkpoint.pt"), *TINY[4:], "--data-dir", data_dir])
        copies.append(weights(tmp_path / name / "checkpoint.pt"))
    assert copies[0]["step"] == 300 > saved
    assert all(torch.equal(copies[0]["model"][k], copies[1]["model"][k]) for k in copies[0]["model"])


def test_links_are_never_followed_and_a_dead_writers_temporary_files_are_removed(tmp_path, data_dir, capsys):
    victim, out = tmp_path / "victim", tmp_path / "run"
    victim.write_text("precious")
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    code, err = run_cli(ti, TINY + ["--steps", "2", "--data-dir", data_dir, "--out", str(out)], capsys)
    assert code == 2 and "symbolic link" in err and victim.read_text() == "precious"
    (out / "run.lock").unlink()
    (out / f"metrics.json.{os.getpid()}.tmp").symlink_to(victim)            # this process's own temporary name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"checkpoint.pt.{dead.stdout.strip()}.tmp"                  # left by a writer killed with kill -9
    stale.write_bytes(b"half a checkpoint")
    ti.main(TINY + ["--steps", "2", "--data-dir", data_dir, "--out", str(out)])
    assert victim.read_text() == "precious" and not stale.exists() and not list(out.glob("*.tmp"))
    assert json.loads((out / "metrics.json").read_text())["step"] == 2 and (out / "run.lock").exists()


def test_ctrl_c_while_sampling_stops_in_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_images.py", *TINY, "--steps", "1", "--n-samples", "100000",
                             "--eval-batch-size", "50", "--eval-steps", "128", "--data-dir", data_dir,
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("trained"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and err.strip().startswith("SIGINT") and "Traceback" not in err
    assert weights(out / "checkpoint.pt")["step"] == 1 and unlocked(out)


def test_fid_without_its_weights_writes_every_other_measure_first(tmp_path, data_dir, monkeypatch, capsys):
    """On a node without network the Inception weights cannot be fetched: the run says where to
    put them, and metrics.json already holds everything else."""
    write_cifar(tmp_path / "data", monkeypatch)
    monkeypatch.setattr(images, "fid_backend", lambda: True)

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(images, "reference_stats", offline)
    flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "tiny", "--batch-size", "8",
             "--steps", "2", "--n-samples", "10", "--eval-steps", "1", "--device", "cpu"]
    code, err = run_cli(ti, flags + ["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--no-fid" in err and "checkpoints" in err and len(err.splitlines()) == 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["step"] == 2 and "fid" not in json.dumps(saved)
    metrics = ti.main(flags + ["--no-fid", "--out", str(tmp_path / "nofid")])
    assert "shortcut_1" not in metrics and (tmp_path / "nofid" / "samples.npz").exists()


def test_a_cifar_archive_that_is_not_a_regular_file_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    os.mkfifo(archive)                                      # reading a FIFO would wait for ever
    with pytest.raises(R.UserError, match="no CIFAR-10"):
        images.load_cifar10(str(tmp_path))
    archive.unlink()
    archive.symlink_to("/dev/zero")                         # and /dev/zero would never end
    with pytest.raises(R.UserError, match="no CIFAR-10"):
        images.load_cifar10(str(tmp_path))


################################################################################
#                  The documents' numbers against their results                 #
################################################################################

def table_after(path, anchor):
    """The body rows of the first markdown table after `anchor` in the file at `path`, as lists of cells."""
    with open(path) as f:
        lines = f.read().split(anchor, 1)[1].split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def shows(cell, *values, percent=False):
    """Whether a cell such as "10.0 ± 0.3%" or "0.683" shows `values`, rounded to the digits it shows."""
    shown = re.findall(r"\d+(?:\.\d+)?", cell)
    return len(shown) == len(values) and all(
        s == f"{v * (100 if percent else 1):.{len(s.partition('.')[2])}f}" for s, v in zip(shown, values))


def test_documented_numbers_match_their_results_files():
    """The README's toy and digits tables and RESULTS' Table 1, digits, one-step-gap and compute tables are
    docs/results' files, to the digits they show: a number edited by hand, or a results file written by another run,
    fails here."""
    def load(name):
        with open(os.path.join("docs", "results", name)) as f:
            return json.load(f)
    toy_m = load("toy/toy.json")
    measures = {"off-mode": ("off_mode", True), "spread": ("spread", False), "SW2": ("sliced_w2", False)}
    rows = table_after("README.md", "## The toy: Figure 1 in 2-D")
    assert len(rows) == 6
    for label, *cells in rows:
        model, measure = label.split(", ")
        key, percent = measures[measure]
        for n, cell in zip([1, 2, 4, 8, 128], cells):
            per_seed = [m[key][model][str(n)] for m in toy_m["per_seed"]]
            assert shows(cell, toy_m[key][model][str(n)], np.std(per_seed, ddof=1), percent=percent), (label, n, cell)
    digits = {"shortcut": load("digits/metrics.json"), "flow matching": load("digits-flow/metrics.json")}
    rows = table_after("README.md", "### The digits result")
    assert len(rows) == 4
    for label, *cells in rows:
        model, measure = label.split(", ")
        metrics = digits[model]
        for n, cell in zip([1, 2, 4, 8, 128], cells):
            value = metrics[f"{metrics['run']['objective']}_{n}"]["fd" if measure == "FD" else "accuracy"]
            assert shows(cell, value), (label, n, cell)
    table1 = load("table1/table1.json")
    columns = [("off_mode", n, True) for n in (1, 2, 4, 128)] + [("spread", n, False) for n in (1, 4, 128)]
    rows = table_after(os.path.join("docs", "RESULTS.md"), "## Table 1 in miniature")
    assert len(rows) == len(table1["train_seconds"])
    for row, *cells in rows:
        for (key, n, percent), cell in zip(columns, cells):
            mean = table1[key][row].get(str(n))
            assert cell == "n/a" if mean is None else shows(
                cell, mean, np.std([m[key][row][str(n)] for m in table1["per_seed"]], ddof=1), percent=percent), \
                (row, n, cell)
        assert shows(cells[-1], table1["train_seconds"][row]), (row, cells[-1])
    for anchor, n_rows, n_cells in (("**Every objective on digits.**", 12, 6), ("**Compute on digits.**", 8, 5)):
        rows = table_after(os.path.join("docs", "RESULTS.md"), anchor)
        assert len(rows) == n_rows
        for _, *cells, folders in rows:         # each row is the mean (± the standard deviation) over its folders
            runs = [load(f"{folder.strip('`')}/metrics.json") for folder in folders.split(", ")]
            if anchor == "**Compute on digits.**":                  # its steps, then the FD alone
                steps, *cells = cells
                assert {m["run"]["steps"] for m in runs} == {int(steps.replace(",", ""))}, (folders, steps)
            assert len(cells) == n_cells, (folders, cells)
            values = {(n, key): [m[f"{m['run']['objective']}_{n}"][key] for m in runs]
                      for n in (1, 2, 4, 8, 128) for key in ("fd", "accuracy")}
            shown = [values[n, "fd"] for n in (1, 2, 4, 8, 128)] + [values[1, "accuracy"] + values[128, "accuracy"]]
            for cell, vals in zip(cells, shown):
                halves = [vals] if len(vals) == len(runs) else [vals[:len(runs)], vals[len(runs):]]
                stats = [v for h in halves for v in ([np.mean(h), np.std(h, ddof=1)] if len(runs) > 1 else h)]
                assert shows(cell, *stats), (folders, cell)
    rows = table_after(os.path.join("docs", "RESULTS.md"), "## The one-step gap")
    for _, folder, off, spread, seconds in rows:              # the first (or only) row of each folder's toy.json
        m = load(f"{folder.strip('`')}/toy.json")
        row = next(iter(m["train_seconds"]))
        sd = lambda key, n: np.std([p[key][row][str(n)] for p in m["per_seed"]], ddof=1)      # noqa: E731
        assert shows(off, *(v for n in (1, 128) for v in (m["off_mode"][row][str(n)], sd("off_mode", n))),
                     percent=True), (folder, off)
        assert shows(spread, *(m["spread"][row][str(n)] for n in (1, 4, 128))), (folder, spread)
        assert shows(seconds, m["train_seconds"][row]), (folder, seconds)
    rows = table_after(os.path.join("docs", "RESULTS.md"), "## Compute")
    for row, _, folder, off, spread in rows:                  # the row named first, with its standard deviations
        m, row = load(f"{folder.strip('`')}/toy.json"), row.split(",")[0]
        sd = lambda key, n: np.std([p[key][row][str(n)] for p in m["per_seed"]], ddof=1)      # noqa: E731
        assert shows(off, *(v for n in (1, 4, 128) for v in (m["off_mode"][row][str(n)], sd("off_mode", n))),
                     percent=True), (folder, off)
        assert shows(spread, *(v for n in (1, 4, 128) for v in (m["spread"][row][str(n)], sd("spread", n)))), \
            (folder, spread)
