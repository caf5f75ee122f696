"""Train a DiT on images by any objective of Table 1 and measure it at 1, 2, 4, 8 and 128 steps.

    python train_images.py                                   # a shortcut model on 8x8 digits, CPU
    python train_images.py --objective flow --out out/flow   # the flow-matching baseline
    python train_images.py --objective reflow --teacher out/flow/checkpoint.pt --out out/reflow
    python train_images.py --device cuda --dataset cifar10 --data-dir data --download
    python train_images.py --device cuda --dataset celeba --data-dir data/img_align_celeba
    python train_images.py --resume out/images/checkpoint.pt --steps 20000   # continue a run
    python train_images.py --sample-only --resume out/images/checkpoint.pt   # evaluate only

Writes to --out: checkpoint.pt (every --save-every steps, at the end and on Ctrl-C, atomically),
grid_N.png for each N, steps.png (a column per N from the same noise), samples.npz and
metrics.json. Sampling and evaluation use the EMA weights, and each objective's own sampler
(baselines.OBJECTIVES); a shortcut model is also sampled by Euler with its velocity (d = 0).

Data: digits are scikit-learn's bundled 8x8 digits (1,797 images, offline). CIFAR-10 is read
from the python archive cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py)
in --data-dir; --download fetches it and checks its md5. CelebA is read from a folder of the
aligned JPEGs (img_align_celeba), center-cropped and resized to 64x64 once, then cached as
celeba64.npy beside them.

Metrics: for digits, the Frechet distance in the hidden features of a small classifier fit on
the real digits (with the same distance between two halves of the real digits beside it), and
that classifier's accuracy on the requested labels. For CIFAR-10 and CelebA, FID with the
standard Inception network when pytorch-fid (or torchmetrics with torch-fidelity) is installed;
it fetches the weights on first use.

Speed: --benchmark times a training step of every objective and sampling on random data, and
prints img/s, TFLOP/s and MFU. Several GPUs: torchrun --nproc_per_node=N train_images.py ...
(--batch-size is global).
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import signal
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch

try:                                   # where numpy pickles keep the array constructor
    from numpy._core.multiarray import _reconstruct
except ImportError:                    # numpy < 2
    from numpy.core.multiarray import _reconstruct

from baselines import OBJECTIVES, make_targets, new_stage, objective
from shortcut import (LEVELS, DiT, dit_config, ema_update, errors, pick_device, sample, seed_everything,
                      step_sizes, write_atomic)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCH_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                   "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                   "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"}



@dataclass(frozen=True)
class Data:
    """Facts about a data set."""
    size: int          # images are size x size
    channels: int
    classes: int       # 0: unconditional
    flip: bool         # random horizontal flips


DATA = {"digits": Data(8, 1, 10, False), "cifar10": Data(32, 3, 10, True), "celeba": Data(64, 3, 0, True)}

# The defaults of the flags that depend on the data set: the official recipe's learning rate
# and batch sizes for the image sets, and what was measured best for digits (README).
DEFAULTS = {
    "digits": dict(model="XS", patch=2, batch_size=128, steps=3000, lr=2e-3, warmup=200, n_samples=1000,
                   save_every=1000),
    "cifar10": dict(model="B", patch=2, batch_size=256, steps=400_000, lr=1e-4, warmup=5000, n_samples=10_000,
                    save_every=5000),
    "celeba": dict(model="B", patch=4, batch_size=64, steps=400_000, lr=1e-4, warmup=5000, n_samples=10_000,
                   save_every=5000),
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class TrainingDiverged(Exception):
    """The loss or the weights became non-finite: exit code 1, the last good checkpoint kept."""


class Interrupted(Exception):
    """Ctrl-C: the current step was saved; exit code 130."""


################################################################################
#                                     Data                                     #
################################################################################

def load_digits():
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = np.round(d.images * (255 / 16)).clip(0, 255).astype(np.uint8)[:, None]   # (1797, 1, 8, 8)
    return x, d.target.astype(np.int64)


def load_cifar10(data_dir, download=False):
    """CIFAR-10's training set as uint8 (50000, 3, 32, 32) and int64 labels.

    Nothing is unpickled before its bytes match the published md5 (of the archive, then of
    each batch file), and the unpickler only builds what a batch holds, so a crafted archive
    can neither run code nor load wrong data silently.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder) and not os.path.isfile(archive):
        if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
            raise UserError(f"cannot read the directory {data_dir!r} (permission denied)")
        if not download:
            raise UserError(f"no CIFAR-10 in {data_dir!r}: put cifar-10-python.tar.gz there "
                            f"(from {CIFAR_URL}) or pass --download")
        fetch(CIFAR_URL, archive, CIFAR_MD5)
    where = folder if os.path.isdir(folder) else archive
    try:
        if where == folder:
            def read(name):
                with open(os.path.join(folder, name), "rb") as f:
                    return f.read()
            xs, ys = zip(*(cifar_batch(read(n), n, os.path.join(folder, n)) for n in CIFAR_BATCH_MD5))
        else:
            check_md5(archive, CIFAR_MD5)
            with tarfile.open(archive, "r:gz") as tar:
                xs, ys = zip(*(cifar_batch(tar.extractfile(f"cifar-10-batches-py/{n}").read(), n,
                                           f"{archive}:{n}") for n in CIFAR_BATCH_MD5))
    except OSError as e:
        raise UserError(f"cannot read {e.filename or where!r} ({e.strerror or e})") from None
    except (EOFError, KeyError, AttributeError, tarfile.TarError, zlib.error) as e:
        raise UserError(f"{where!r} is not a complete CIFAR-10 archive ({type(e).__name__}: {e}); "
                        "fetch it again (--download into an empty --data-dir)") from None
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def cifar_batch(raw, name, where):
    """Checks the bytes of the batch file `name` against its md5, unpickles them safely and
    checks the contents: returns uint8 data (n, 3072) and int64 labels (n,) in 0..9."""
    if hashlib.md5(raw).hexdigest() != CIFAR_BATCH_MD5[name]:
        raise UserError(f"{where!r} has md5 {hashlib.md5(raw).hexdigest()}, not the published "
                        f"{CIFAR_BATCH_MD5[name]}: it is corrupt or altered, and was not unpickled; "
                        "fetch CIFAR-10 again (--download into an empty --data-dir)")
    try:
        batch = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        x, y = batch[b"data"], np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"{where!r} is not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    ok = (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
          and y.dtype.kind in "iu" and y.shape == (len(x),) and (len(y) == 0 or 0 <= y.min() <= y.max() <= 9))
    if not ok:
        raise UserError(f"{where!r} does not hold a CIFAR-10 batch: it needs uint8 data of shape "
                        "(n, 3072) and n integer labels in 0..9")
    return x, y.astype(np.int64)


class CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers and numpy
    arrays. Any other global (os.system, say) is refused instead of being called."""

    NUMPY = {"ndarray": np.ndarray, "dtype": np.dtype, "_reconstruct": _reconstruct}

    def find_class(self, module, name):
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in self.NUMPY:
            return self.NUMPY[name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds "
                                     "only arrays, lists, strings and numbers")


def fetch(url, path, md5):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} ...", flush=True)
    try:
        urllib.request.urlretrieve(url, path + ".part")
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); fetch it by hand into {os.path.dirname(path)!r}") from None
    check_md5(path + ".part", md5)
    os.replace(path + ".part", path)


def check_md5(path, md5):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != md5:
        raise UserError(f"{path!r} has md5 {h.hexdigest()}, not the published {md5}: it is corrupt, "
                        "truncated or altered, and nothing in it was unpickled; fetch it again "
                        "(--download into an empty --data-dir)")


def load_celeba(data_dir, size=64):
    """Aligned CelebA JPEGs, center-cropped and resized to size x size, cached as .npy."""
    from PIL import Image
    cache = os.path.join(data_dir, f"celeba{size}.npy")
    if os.path.isfile(cache):
        try:
            x = np.load(cache, allow_pickle=False)
            if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, size, size) and len(x):
                return x, None
            problem = f"holds {x.dtype} of shape {x.shape}, not uint8 (n, 3, {size}, {size})"
        except (OSError, ValueError, EOFError) as e:
            problem = f"is unreadable ({type(e).__name__}: {e})"
        print(f"the cache {cache} {problem}: rebuilding it from the images", flush=True)
    files = sorted(f for f in os.listdir(data_dir) if f.lower().endswith((".jpg", ".jpeg", ".png"))) \
        if os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK) else []
    if not files:
        raise UserError(f"no CelebA images in {data_dir!r}: download img_align_celeba.zip from the "
                        "CelebA page (mmlab.ie.cuhk.edu.hk/projects/CelebA.html), unzip it and pass "
                        "--data-dir path/to/img_align_celeba")
    x = np.empty((len(files), 3, size, size), np.uint8)
    t0 = time.time()
    for i, name in enumerate(files):
        try:
            with Image.open(os.path.join(data_dir, name)) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                x[i] = np.asarray(im.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read {name!r} in {data_dir!r} ({type(e).__name__}: {e}); "
                            "remove it or re-extract the folder") from None
        if i % 20000 == 0 and i:
            print(f"  decoded {i}/{len(files)} images ({time.time() - t0:.0f}s)", flush=True)
    save_cache(cache, lambda f: np.save(f, x))   # a read-only folder still keeps the decoded images
    return x, None


def load_dataset(name, data_dir, download=False):
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    return load_celeba(data_dir, DATA[name].size)


def get_batch(data, labels, batch_size, flip):
    """A random batch in [-1, 1], flipped on the device; torch's generator makes it resumable."""
    idx = torch.randint(len(data), (batch_size,), device=data.device)
    x = data[idx].float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return x, None if labels is None else labels[idx]


################################################################################
#                                  Checkpoints                                 #
################################################################################

def save_checkpoint(path, args, model, ema, opt, step, teacher=None):
    """The whole training state; a two-phase run keeps its teacher too (progressive
    distillation's changes from stage to stage)."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "config": {"model": dataclasses.asdict(model.cfg),
                        "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()}},
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if teacher is not None and objective(args.objective).two_phase:
        state["teacher"] = teacher.state_dict()
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, cfg, what="--resume"):
    """A checkpoint's state, checked to hold a model of config cfg; UserError otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}; check the {what} path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = {"model", "ema", "opt", "step", "config", "rng_cpu"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"missing {sorted(keys - set(state)) if isinstance(state, dict) else sorted(keys)}")
        if not isinstance(state["config"], dict) or not isinstance(state["config"].get("model"), dict):
            raise ValueError("its config holds no model")
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"bad step {state['step']!r}")
    except Exception as e:
        raise UserError(f"{path!r} is corrupt or not a shortcut checkpoint ({type(e).__name__}: "
                        f"{first_line(e)}); resume from another one or start afresh") from None
    if state["config"]["model"] != dataclasses.asdict(cfg):
        raise UserError(f"{path!r} holds model {state['config']['model']}, but the flags ask for "
                        f"{dataclasses.asdict(cfg)}; pass the same --dataset, --model and --patch as that run")
    return state


def restore(state, path, model, ema, opt, teacher=None):
    """Loads a checkpoint's weights, optimiser, teacher and random state; returns its step."""
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if teacher is not None and "teacher" in state:
            teacher.load_state_dict(state["teacher"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"][0])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"{path!r} is corrupt or not a shortcut checkpoint ({type(e).__name__}: "
                        f"{first_line(e)}); resume from another one or start afresh") from None
    return state["step"]


def first_line(e):
    return (str(e).splitlines() or [""])[0][:200]


################################################################################
#                                   Training                                   #
################################################################################

def lr_at(step, args):
    """Linear warmup, then constant (the official schedule) or a cosine decay to 0 by --steps."""
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    if args.lr_schedule == "cosine":
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))
    return args.lr * warm


STATS = ("fm_sum", "sc_sum", "fm_rows", "sc_rows", "non_finite")   # what a step returns, in order


def make_step(args, model, ema, opt, teacher=None):
    """One optimisation step on a global batch: step(x1, y, i) -> a tensor of the STATS of
    this process's rows (the summed errors of each part, their row counts, a non-finite flag).

    Every process builds the targets of the whole batch (the same draws everywhere) and
    regresses its own rows of them. Nothing in it waits for the GPU. With --compile the
    targets, forward and backward are compiled together; AdamW is fused and the EMA is one
    foreach op, so they stay outside.
    """
    rank, world = process_rank()
    raw = model.module if world > 1 else model
    device = next(raw.parameters()).device
    if teacher is None and args.ema_teacher:
        teacher = ema
    options = {"bootstrap_frac": args.bootstrap_frac} if args.objective == "shortcut" else {}
    if args.objective != "reflow":
        options["pair"] = args.pair
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward_backward(x1, y, progress):
        with autocast:
            # no_grad target queries use the raw model: they skip the DDP wrapper
            tg = make_targets(args.objective, raw, x1, y, teacher=teacher, progress=progress, **options)
            if world > 1:
                tg = tg.rows(slice(rank, None, world))
            err = errors(model, tg)
        loss = err.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        e, n = err.detach(), tg.n_boot
        return torch.stack([e[n:].sum(), e[:n].sum(), e.new_tensor(len(e) - n), e.new_tensor(n),
                            (~torch.isfinite(loss)).float()])

    if args.compile and device.type == "mps":
        print("--compile is skipped on mps", flush=True)
    elif args.compile:
        forward_backward = torch.compile(forward_backward)

    def step(x1, y, i):
        for g in opt.param_groups:
            g["lr"] = lr_at(i, args)
        opt.zero_grad(set_to_none=True)
        # the curricula move in LEVELS stages: passing the stage's start keeps a compiled step
        # from recompiling for every new value of the float
        stats = forward_backward(x1, y, math.floor(i / args.steps * LEVELS) / LEVELS)
        opt.step()
        ema_update(ema, raw, min(args.ema, (1 + i) / (10 + i)))
        if new_stage(args.objective, i / args.steps, (i + 1) / args.steps):
            teacher.load_state_dict(raw.state_dict())       # progressive distillation's next stage
        return stats
    return step


def drop_labels(y, p, null):
    """Label dropout to the null class, for classifier-free guidance."""
    return None if y is None else torch.where(torch.rand(len(y), device=y.device) < p, null, y)


@contextlib.contextmanager
def deferred_interrupt(enabled):
    """Ctrl-C appends to the yielded list instead of raising, so that the training loop can
    finish its step, save a checkpoint and stop; resuming from it stays bit-exact."""
    flag, previous = [], None
    if enabled:
        previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def train(args, model, ema, opt, data, labels, start, teacher=None):
    """Steps start .. --steps: logs, checkpoints (only finite ones) and stops on Ctrl-C."""
    rank, world = process_rank()
    raw = model.module if world > 1 else model
    step = make_step(args, model, ema, opt, teacher)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    sums = torch.zeros(len(STATS), device=data.device)      # summed on the device: no sync per step
    t0, last, done = time.time(), time.time(), 0
    with deferred_interrupt(world == 1) as interrupted:
        for i in range(start, args.steps):
            # every process draws the same global batch and noise, and computes its own rows
            x1, y = get_batch(data, labels, args.batch_size, DATA[args.dataset].flip)
            sums += step(x1, drop_labels(y, args.label_dropout, raw.num_classes), i)
            done += 1
            now = time.time()
            saving = (i + 1) % args.save_every == 0 or i + 1 == args.steps or bool(interrupted)
            if now - last > args.log_every or saving:
                if world > 1:
                    torch.distributed.all_reduce(sums)
                s = dict(zip(STATS, sums.tolist()))
                if s["non_finite"]:
                    raise TrainingDiverged(f"the loss became non-finite by step {i + 1}; the last good "
                                           f"checkpoint is kept at {ckpt!r}; lower --lr or raise --warmup")
                rate = done * args.batch_size / (now - t0)
                log(f"step {i + 1:7d}/{args.steps}  fm {s['fm_sum'] / max(s['fm_rows'], 1):.4f}  "
                    f"sc {s['sc_sum'] / max(s['sc_rows'], 1):.4f}  {rate:7.0f} img/s  "
                    f"ETA {fmt_time((args.steps - i - 1) * args.batch_size / rate)}")
                sums.zero_()
                last = now
            if saving and not all(bool(p.isfinite().all()) for m in (raw, ema) for p in m.parameters()):
                # the loss of step i was finite, but update i (or the EMA) may not be
                raise TrainingDiverged(f"the weights or their EMA became non-finite by step {i + 1}; the last "
                                       f"good checkpoint is kept at {ckpt!r}; lower --lr or raise --warmup")
            if saving and rank == 0:
                save_checkpoint(ckpt, args, raw, ema, opt, i + 1, teacher)
            if interrupted:
                raise Interrupted(f"interrupted: saved step {i + 1} to {ckpt!r}; continue with --resume {ckpt}")
    if world > 1:
        check_replicas(raw, world)


def process_rank():
    """(rank, world size): (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_replicas(model, world):
    """All processes must hold bit-identical weights: compare the elementwise max and min."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError("the DDP replicas drifted apart")
    if torch.distributed.get_rank() == 0:
        print(f"all {world} processes hold identical weights", flush=True)


def fmt_time(s):
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}min" if s < 7200 else f"{s / 3600:.1f}h"


################################################################################
#                                  Evaluation                                  #
################################################################################

def sampler_model(ema, args):
    """The EMA model, compiled for sampling under --compile (one graph per batch shape)."""
    return torch.compile(ema) if args.compile and args.device.type == "cuda" else ema


@torch.no_grad()
def generate(sampler, model, x0, steps, y, cfg_scale, batch_size, to_cpu=True):
    """Samples by sampler(model, x0, steps, y, cfg_scale) in batches (bf16 on CUDA), mapped to
    [0, 1]: (n, C, H, W)."""
    out = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        for i in range(0, len(x0), batch_size):
            yb = None if y is None else y[i:i + batch_size]
            x = sampler(model, x0[i:i + batch_size], steps, yb, cfg_scale).float()
            out.append(x.cpu() if to_cpu else x)
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fit to two feature sets (n, k)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_from_stats(mu_a, cov_a, mu_b, cov_b)


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b):
    # tr sqrt(A B) = sum of the square roots of the eigenvalues of A B, which are real and >= 0.
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum())


class DigitsJudge:
    """A small MLP classifier fit once on the real digits; its hidden layer gives features.
    The weights are cached in `cache`; an unreadable cache is refit and rewritten."""

    SHAPES = {"w0": (64, 128), "b0": (128,), "w1": (128, 10), "b1": (10,)}

    def __init__(self, cache):
        self.w = load_arrays(cache, self.SHAPES, "the cached digit classifier")
        if self.w is None:
            from sklearn.neural_network import MLPClassifier
            x, y = load_digits()
            clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0)
            clf.fit(x.reshape(len(x), -1) / 255.0, y)
            self.w = [clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1]]
            save_cache(cache, lambda f: np.savez(f, **dict(zip(self.SHAPES, self.w))))

    def features(self, x01):
        return np.maximum(x01.reshape(len(x01), -1) @ self.w[0] + self.w[1], 0)

    def predict(self, x01):
        return (self.features(x01) @ self.w[2] + self.w[3]).argmax(1)


NO_FID = "install pytorch-fid (pip install pytorch-fid) or torchmetrics[image] for FID"


def fid_backend():
    """Which Inception network is installed: 'pytorch_fid', 'torchmetrics' or None."""
    return next((m for m in ("pytorch_fid", "torchmetrics") if importlib.util.find_spec(m)), None)


@functools.lru_cache(maxsize=1)
def inception(device):
    """The standard FID Inception network (pool3, 2048 features) as x01 -> features."""
    if fid_backend() == "pytorch_fid":
        from pytorch_fid.inception import InceptionV3
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        return lambda x: net(x)[0].flatten(1)
    from torchmetrics.image.fid import FrechetInceptionDistance
    net = FrechetInceptionDistance(feature=2048).inception.to(device).eval()
    return lambda x: net((x * 255).round().to(torch.uint8)).flatten(1)


@torch.no_grad()
def inception_features(x01, device, batch_size=200):
    embed = inception(device)
    feats = [embed(torch.as_tensor(x01[i:i + batch_size], device=device).float()).cpu()
             for i in range(0, len(x01), batch_size)]
    return torch.cat(feats).double().numpy()


def reference_stats(args, data, device):
    cache = os.path.join(args.data_dir, f"{args.dataset}_fid_stats.npz")
    stats = load_arrays(cache, {"mu": (2048,), "cov": (2048, 2048)}, "the cached FID statistics")
    if stats is not None:
        return stats
    n = min(len(data), 50_000)
    print(f"computing FID reference statistics from {n} training images (cached in {cache}) ...", flush=True)
    f = inception_features(data[:n].float() / 255, device)
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    save_cache(cache, lambda fh: np.savez(fh, mu=mu, cov=cov))
    return mu, cov


def load_arrays(path, shapes, what):
    """The arrays named in `shapes` from an .npz cache, or None when it is missing or unusable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = [z[k] for k in shapes]
        if [a.shape for a in arrays] == list(shapes.values()) and all(np.isfinite(a).all() for a in arrays):
            return arrays
        problem = "has the wrong shapes"
    except Exception as e:         # a truncated or foreign file: zipfile, pickle and key errors alike
        problem = f"is unreadable ({type(e).__name__})"
    print(f"{what} {path} {problem}: computing it afresh", flush=True)
    return None


def save_cache(path, write):
    """A cache is a convenience: failing to write one is reported and the run goes on."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, write)
    except OSError as e:
        print(f"could not write the cache {path} ({e.strerror or e}); continuing without it", flush=True)


def save_grid(path, x01, nrow, col_labels=None):
    """Images (n, C, H, W) in [0, 1] as a PNG grid of nrow rows, scaled up to about 512
    pixels, with an optional label over each column."""
    from PIL import Image, ImageDraw
    n, C, H, W = x01.shape
    ncol = math.ceil(n / nrow)
    grid = np.ones((C, nrow * (H + 1) + 1, ncol * (W + 1) + 1), np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = x01[i]
    img = (grid.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    img = Image.fromarray(img[..., 0] if C == 1 else img).convert("RGB")
    scale = max(1, 512 // max(img.height, img.width))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if col_labels:
        framed = Image.new("RGB", (img.width, img.height + 16), "white")
        framed.paste(img, (0, 16))
        draw = ImageDraw.Draw(framed)
        for c, label in enumerate(col_labels):
            draw.text((scale * (c * (W + 1) + 1 + W // 2) - 3 * len(str(label)), 2), str(label), fill="black")
        img = framed
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def evaluate(args, ema, data, judge=None):
    """Samples with each of --eval-steps from the same noise, by the objective's sampler (and,
    for a shortcut model, also by Euler with its velocity d = 0); writes the grids,
    samples.npz and metrics.json; returns the metrics."""
    info, device = DATA[args.dataset], data.device
    classes, n, name = info.classes, args.n_samples, args.objective
    g = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn(n, info.channels, info.size, info.size, generator=g).to(device)
    y = (torch.arange(n) % classes).to(device) if classes else None
    runs = [(name, objective(name).sample, N) for N in args.eval_steps]
    if name == "shortcut":
        runs += [("velocity", objective("flow").sample, N) for N in args.eval_steps if N < 128]
    samples, t0, model = {}, time.time(), sampler_model(ema, args)
    for kind, sampler, N in runs:
        samples[f"{kind}_{N}"] = generate(sampler, model, x0, N, y, args.cfg_scale, args.eval_batch_size)
    print(f"sampled {n} images for each of {len(runs)} settings in {time.time() - t0:.1f}s"
          + (" (velocity_128 is shortcut_128: d = 0 is the finest level)" if name == "shortcut" else ""), flush=True)

    keep = min(n, 1000)
    arrays = {"labels": y[:keep].cpu().numpy() if classes else np.zeros(0, np.int64),
              **{k: v[:keep].numpy() for k, v in samples.items()}}
    write_atomic(os.path.join(args.out, "samples.npz"), lambda f: np.savez_compressed(f, **arrays))
    rows = min(classes or 8, n)
    per_row = max(1, min(10, n // rows))
    order = torch.arange(rows * per_row).view(per_row, rows).T.flatten()   # sample i has class i % classes
    for N in args.eval_steps:
        save_grid(os.path.join(args.out, f"grid_{N}.png"), samples[f"{name}_{N}"][order].numpy(), nrow=rows)
    cols = [samples[f"{name}_{N}"][:rows] for N in args.eval_steps]
    save_grid(os.path.join(args.out, "steps.png"), torch.stack(cols, 1).flatten(0, 1).numpy(), nrow=rows,
              col_labels=[f"N={N}" for N in args.eval_steps])

    metrics = {"dataset": args.dataset, "objective": name, "n_samples": n, "cfg_scale": args.cfg_scale}
    if judge is not None:
        real, _ = load_digits()
        real = real.astype(np.float64) / 255
        perm = np.random.default_rng(0).permutation(len(real))
        ref, held = real[perm[:len(real) // 2]], real[perm[len(real) // 2:]]
        f_ref = judge.features(ref)
        m = len(held)          # the same sample size on both sides keeps real vs real comparable
        metrics["metric"] = "Frechet distance in digit-classifier features"
        metrics["real_vs_real"] = frechet_distance(judge.features(held), f_ref)
        for k, v in samples.items():
            x = v.double().numpy()
            metrics[k] = {"fd": frechet_distance(judge.features(x[:m]), f_ref),
                          "accuracy": float((judge.predict(x) == y.cpu().numpy()).mean())}
    elif fid_backend() is None:
        print(f"FID skipped: {NO_FID}", flush=True)
    else:
        mu, cov = reference_stats(args, data, device)
        metrics["metric"] = f"FID (Inception pool3, {fid_backend()}) against the training set"
        for k, v in samples.items():
            f = inception_features(v.numpy(), device)
            metrics[k] = {"fid": frechet_from_stats(f.mean(0), np.cov(f, rowvar=False), mu, cov)}
    print_table(metrics)
    return metrics


def print_table(metrics):
    keys = [k for k, v in metrics.items() if isinstance(v, dict)]
    if not keys:
        return
    cols = list(metrics[keys[0]])
    ref = metrics.get("real_vs_real")
    print(f"\n{metrics['metric']}" + (f" (real vs real: {ref:.3f})" if ref is not None else ""))
    print(f"  {'sampler':28s}" + "".join(f"{c:>10s}" for c in cols))
    for k in keys:
        print(f"  {k:28s}" + "".join(f"{metrics[k][c]:10.3f}" for c in cols))


################################################################################
#                                   Benchmark                                  #
################################################################################

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device name.
PEAK_BF16 = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
             ("L4", 121), ("A10", 125), ("4090", 165)]


def dit_flops(model, n=1):
    """Forward FLOPs of a DiT on n images: matmuls and attention, 2 per multiply-add.

    With T = (img_size/patch)^2 tokens, C = width, P = patch^2 * channels, r = mlp_ratio and
    F sinusoidal features: patchify 2TPC; per block qkv 6TC^2, attention (QK^T and AV) 4T^2C,
    projection 2TC^2, MLP 4rTC^2 and adaLN 12C^2; final adaLN 4C^2 and linear 2TCP; the t
    and d embedders 2(2FC + 2C^2). Norms, activations and adds are left out, as is usual.
    """
    c = model.cfg
    T, C, P, F = (c.img_size // c.patch) ** 2, c.width, c.patch ** 2 * c.channels, 2 * len(model.cond.t_emb.freqs)
    block = (8 + 4 * c.mlp_ratio) * T * C * C + 4 * T * T * C + 12 * C * C
    return n * (2 * T * P * C + c.depth * block + 4 * C * C + 2 * T * C * P + 2 * (2 * F * C + 2 * C * C))


def peak_tflops(device):
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None), name


def timed(fn, warmup, reps, device):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def benchmark(args, cfg, device):
    """Training speed of every objective, and sampling speed, on random data of the dataset's
    shape (no data loading). FLOPs count every network forward a step makes (3x for the rows
    that are trained, which also go backward)."""
    info = DATA[args.dataset]
    g = torch.Generator(device=device).manual_seed(args.seed)
    shape = (4 * args.batch_size, info.channels, info.size, info.size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(max(info.classes, 1), shape[:1], device=device, generator=g) if info.classes else None
    batch = lambda: get_batch(data, labels, args.batch_size, info.flip)          # noqa: E731
    peak, gpu = peak_tflops(device)
    warmup = args.bench_warmup + (10 if args.compile else 0)
    print(f"benchmark on {gpu}: DiT-{args.model}/{args.patch} at {info.size}x{info.size}x{info.channels}, "
          f"batch {args.batch_size}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', compiled' if args.compile else ''}, {args.bench_steps} timed steps after {warmup} warm-up; "
          f"peak {peak or 'unknown'} TFLOP/s dense bf16")
    print(f"  {'objective':26s}{'img/s':>10s}{'ms/step':>10s}{'vs flow':>9s}{'TFLOP/s':>10s}{'MFU':>8s}")
    times = {}
    for name in OBJECTIVES:
        run = argparse.Namespace(**{**vars(args), "objective": name, "pair": "independent"})
        model, ema, opt = build(run, cfg, device)
        teacher = copy.deepcopy(model) if objective(name).two_phase else None
        rows = forward_rows(make_step(argparse.Namespace(**{**vars(run), "compile": False}), model, ema, opt,
                                      teacher), batch, [model, teacher or ema])
        step, it = make_step(run, model, ema, opt, teacher), iter(range(10 ** 9))
        dt = times[name] = timed(lambda: step(*batch(), next(it)), warmup, args.bench_steps, device)
        flops = dit_flops(model, 3 * rows[0] + rows[1])
        mfu = f"{flops / dt / 1e12 / peak:7.1%}" if peak else "    n/a"
        print(f"  {name:26s}{args.batch_size / dt:10.0f}{dt * 1e3:10.2f}{dt / times['flow']:9.3f}"
              f"{flops / dt / 1e12:10.3g} {mfu}", flush=True)
    x0 = torch.randn(args.eval_batch_size, *shape[1:], device=device, generator=g)
    y = torch.arange(args.eval_batch_size, device=device) % info.classes if info.classes else None
    model = sampler_model(ema.eval(), args)
    for N in (1, 128):
        dt = timed(lambda: generate(sample, model, x0, N, y, args.cfg_scale, args.eval_batch_size, to_cpu=False),
                   int(N == 1), max(1, args.bench_steps // N), device)      # N = 1 warms up for both
        print(f"  sampling, {N:3d} step{'s' if N > 1 else ' '}       {args.eval_batch_size / dt:10.0f} img/s "
              f"(batch {args.eval_batch_size})")
    return times


def forward_rows(step, batch, nets):
    """The rows that the networks' forwards see in one step: [with gradient, without]."""
    rows = [0, 0]

    def count(module, inputs):
        rows[not torch.is_grad_enabled()] += len(inputs[0])
    hooks = [net.register_forward_pre_hook(count) for net in nets]
    step(*batch(), 0)
    for h in hooks:
        h.remove()
    return rows


################################################################################
#                                     Main                                     #
################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", help="digits (default), cifar10 or celeba")
    a("--objective", default="shortcut", help=f"training objective, one of {', '.join(OBJECTIVES)} "
      "(default: shortcut); see baselines.py")
    a("--teacher", default=None, help="for the two-phase objectives (consistency-distillation, "
      "progressive-distillation, reflow): the checkpoint.pt of a trained flow-matching run, whose EMA weights "
      "teach; not needed when resuming a two-phase run, whose checkpoint holds its teacher")
    a("--data-dir", default="data", help="where the data (and cached statistics) live (default: data)")
    a("--download", action="store_true", help="fetch CIFAR-10 into --data-dir if it is not there, checking its md5")
    a("--out", default="out/images", help="output folder (default: out/images)")
    a("--model", default=None, help="DiT size: tiny, XS, S or B (default: XS for digits, B otherwise)")
    a("--patch", type=int, default=None, help="patch size (default: 2; 4 for celeba)")
    a("--steps", type=int, default=None, help="total training steps (default: 3000 for digits, 400k otherwise)")
    a("--batch-size", type=int, default=None, help="batch size (default: 128 digits, 256 cifar10, 64 celeba)")
    a("--lr", type=float, default=None, help="peak AdamW learning rate (default: 2e-3 digits, 1e-4 otherwise)")
    a("--warmup", type=int, default=None, help="learning-rate warmup steps (default: 200 digits, 5000 otherwise)")
    a("--lr-schedule", default="constant", choices=["constant", "cosine"],
      help="after warmup: constant (official, default) or cosine decay to 0 by --steps; resuming a cosine run stays exact only with the same --steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1, official)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    a("--ema", type=float, default=0.999, help="EMA decay (default: 0.999, official)")
    a("--ema-teacher", action="store_true", help="bootstrap targets from the EMA weights (the official default)")
    a("--pair", default="independent", choices=["independent", "ot"],
      help="how noise and data are paired in a batch: independently (default) or by minibatch optimal transport "
      "(scipy's linear_sum_assignment on the CPU: one host sync per step); not for reflow")
    a("--bootstrap-frac", type=float, default=0.25, help="share of each batch with self-consistency targets; 0 trains the flow-matching baseline (default: 0.25)")
    a("--label-dropout", type=float, default=0.1, help="probability of replacing a label by the null class (default: 0.1)")
    a("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale at sampling; 1 is none (default: 1)")
    a("--eval-steps", default="1,2,4,8,128", help="comma-separated sampling step counts, each a power of two up to 128")
    a("--n-samples", type=int, default=None, help="samples per step count for the metrics (default: 1000 digits, 10000 otherwise)")
    a("--eval-batch-size", type=int, default=1000, help="batch size when sampling (default: 1000)")
    a("--seed", type=int, default=0, help="random seed (default: 0)")
    a("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    a("--compile", action="store_true", help="torch.compile the training step (CUDA)")
    a("--save-every", type=int, default=None, help="steps between checkpoints (default: 1000 digits, 5000 otherwise)")
    a("--resume", default=None, help="continue from this checkpoint up to --steps in all; one already at or past "
      "--steps is only sampled and measured. --out must be its folder or hold no checkpoint")
    a("--sample-only", action="store_true", help="with --resume: write the grids and metrics without training")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines (default: 5)")
    a("--benchmark", action="store_true", help="time training and sampling on random data of the dataset's "
      "shape and print img/s, ms/step, TFLOP/s and MFU; trains nothing, writes nothing")
    a("--bench-steps", type=int, default=20, help="timed steps in --benchmark (default: 20)")
    a("--bench-warmup", type=int, default=3, help="untimed steps before timing, 10 more with --compile (default: 3)")
    dataset = p.parse_known_args(argv)[0].dataset
    if dataset not in DATA:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATA)}")
    p.set_defaults(**DEFAULTS[dataset])
    args = p.parse_args(argv)
    if args.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {args.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if args.pair == "ot" and args.objective == "reflow":
        raise UserError("--pair ot does not apply to reflow, whose pairs come from its teacher")
    if objective(args.objective).two_phase and not (args.teacher or args.resume or args.benchmark):
        raise UserError(f"--objective {args.objective} is two-phase: pass --teacher PATH, the checkpoint.pt of a "
                        "flow-matching run (python train_images.py --objective flow --out out/flow)")
    try:
        args.eval_steps = [int(s) for s in args.eval_steps.split(",")]
        for N in args.eval_steps:
            step_sizes(N)
    except ValueError as e:
        raise UserError(f"--eval-steps {args.eval_steps!r}: {e}") from None
    for flag, ok, need in [
            ("--steps", args.steps >= 1, "at least 1"),
            ("--batch-size", args.batch_size >= 1, "at least 1"),
            ("--save-every", args.save_every >= 1, "at least 1"),
            ("--eval-batch-size", args.eval_batch_size >= 1, "at least 1"),
            ("--n-samples", args.n_samples >= 2, "at least 2 (the metrics fit a covariance)"),
            ("--bench-steps", args.bench_steps >= 1, "at least 1"),
            ("--bench-warmup", args.bench_warmup >= 0, "0 or more"),
            ("--warmup", args.warmup >= 0, "0 or more"),
            ("--patch", args.patch >= 1, "at least 1"),
            ("--lr", math.isfinite(args.lr) and args.lr > 0, "a finite number above 0"),
            ("--weight-decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0, "finite and 0 or more"),
            ("--grad-clip", args.grad_clip > 0, "above 0 (inf turns clipping off)"),
            ("--ema", 0 <= args.ema < 1, "in [0, 1)"),
            ("--bootstrap-frac", 0 <= args.bootstrap_frac <= 1, "in [0, 1]"),
            ("--label-dropout", 0 <= args.label_dropout <= 1, "in [0, 1]"),
            ("--cfg-scale", math.isfinite(args.cfg_scale), "a finite number"),
            ("--seed", 0 <= args.seed < 2 ** 32, "in [0, 2^32)"),
            ("--log-every", args.log_every >= 0, "0 or more seconds")]:
        if not ok:
            raise UserError(f"{flag} must be {need}, got {getattr(args, flag[2:].replace('-', '_'))}")
    for flag, path in (("--out", args.out), ("--data-dir", args.data_dir)):
        if not path:
            raise UserError(f"{flag} must name a folder")
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path!r} is a file, not a folder")
    if args.sample_only and not args.resume:
        raise UserError("--sample-only needs --resume PATH, the checkpoint to sample from")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    return args


def model_config(args):
    info = DATA[args.dataset]
    try:
        return dit_config(args.model, img_size=info.size, channels=info.channels, patch=args.patch,
                          num_classes=info.classes)
    except ValueError as e:
        raise UserError(str(e)) from None


def setup_distributed(device):
    """Under torchrun: one process per GPU (NCCL) or per CPU worker (gloo). Returns rank, world, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def build(args, cfg, device):
    model = DiT(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    return model, ema, opt


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch: it must divide evenly "
                        f"over the {world} processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)        # the same seed everywhere: processes draw the same global batch
    cfg = model_config(args)
    if args.benchmark:
        return benchmark(args, cfg, device)
    state = load_checkpoint(args.resume, cfg) if args.resume else None
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.isfile(ckpt) and not (args.resume and os.path.samefile(args.resume, ckpt)):
        raise UserError(f"{ckpt!r} exists; pass --resume {ckpt} to continue that run, or choose another --out"
                        + (f" (resuming {args.resume!r} there would overwrite it)" if args.resume else ""))
    two_phase = objective(args.objective).two_phase
    if two_phase and args.teacher is None and "teacher" not in (state or {}):
        raise UserError(f"{args.resume!r} holds no teacher: pass --teacher PATH for --objective {args.objective}")
    taught = load_checkpoint(args.teacher, cfg, "--teacher") if two_phase and args.teacher else None
    check_writable(args.out)
    judge = DigitsJudge(os.path.join(args.data_dir, "digits_judge.npz")) if args.dataset == "digits" and rank == 0 else None
    if args.dataset != "digits" and fid_backend() is None:
        log(f"note: no Inception network, so no FID at the end ({NO_FID})")
    x, y = load_dataset(args.dataset, args.data_dir, args.download)
    data = torch.as_tensor(x).to(device)
    labels = None if y is None else torch.as_tensor(y).to(device)

    model, ema, opt = build(args, cfg, device)
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if two_phase else None
    if taught is not None:
        teacher.load_state_dict(taught["ema"])
        if args.objective == "progressive-distillation":     # the student starts as its teacher
            model.load_state_dict(taught["ema"])
            ema.load_state_dict(taught["ema"])
    start = 0
    if state is not None:
        start = restore(state, args.resume, model, ema, opt, teacher if taught is None else None)
        log(f"resumed from {args.resume} at step {start}")
        if start >= args.steps and not args.sample_only:
            log(f"the checkpoint is at step {start}, at or past --steps {args.steps}: nothing to train, "
                "so it is only sampled and measured (raise --steps to train on)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.dataset}: {len(data)} images, DiT-{args.model}/{args.patch} ({n_params / 1e6:.2f}M params), "
        f"device {device} x {world}, batch {args.batch_size}, objective {args.objective}"
        + (f" (bootstrap_frac {args.bootstrap_frac})" if args.objective == "shortcut" else "")
        + (f", teacher {args.teacher or args.resume}" if two_phase else ""))
    t0, train_seconds = time.time(), None
    trains = not args.sample_only and start < args.steps
    if trains:
        ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        train(args, ddp, ema, opt, data, labels, start, teacher)
        train_seconds = round(time.time() - t0, 1)
        log(f"trained {args.steps - start} steps in {train_seconds}s")
    metrics = None
    if rank == 0:
        metrics = {**evaluate(args, ema.eval(), data, judge), "train_seconds": train_seconds}
        write_atomic(os.path.join(args.out, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        wrote = "checkpoint.pt, " if trains else ""
        print(f"\ndone in {time.time() - t0:.1f}s; wrote {wrote}grid_N.png, steps.png, samples.npz "
              f"and metrics.json to {args.out}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def check_writable(folder):
    """Fails now, not after hours of training, when the outputs could not be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to --out {folder!r} ({e.strerror or e})") from None


def log(msg):
    """Prints on the first process only."""
    if process_rank()[0] == 0:
        print(msg, flush=True)


def cli(argv=None):
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:       # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({first_line(e)[:120]}); lower --batch-size or --eval-batch-size",
              file=sys.stderr)
        sys.exit(2)
    except OSError as e:                           # a full disk, say, while writing the outputs
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
