"""Image data and measures for train_images.py.

Data: digits are scikit-learn's bundled 8x8 digits (1,797 images, offline). CIFAR-10 is read
from cifar-10-python.tar.gz (or its extracted folder); nothing is unpickled before its bytes
match the published md5, and then only through an unpickler that builds arrays. CelebA is read
from a folder of the aligned JPEGs, center-cropped and resized to 64x64 once, then cached.

Measures: for digits, the Frechet distance in the hidden features of a small classifier fit on
the real digits, and that classifier's accuracy on the requested labels. For CIFAR-10 and
CelebA, FID with the standard Inception network when pytorch-fid (or torchmetrics) is installed.
"""
import functools
import hashlib
import importlib.util
import io
import math
import os
import pickle
import tarfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:                                   # where numpy pickles keep the array constructor
    from numpy._core.multiarray import _reconstruct
except ImportError:                    # numpy < 2
    from numpy.core.multiarray import _reconstruct

from baselines import AMED, objective
from runs import UserError, first_line, write_atomic
from shortcut import sample

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCH_MD5 = {f"data_batch_{i + 1}": md5 for i, md5 in enumerate([
    "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec", "54ebc095f3ab1f0389bbae665268c751",
    "634d18415352ddfa80567beed471001a", "482c414d41f54cd18b22e5b47cb7c3cb"])}


@dataclass(frozen=True)
class Data:
    """Facts about a data set."""
    size: int          # images are size x size
    channels: int
    classes: int       # 0: unconditional
    flip: bool         # random horizontal flips


DATA = {"digits": Data(8, 1, 10, False), "cifar10": Data(32, 3, 10, True), "celeba": Data(64, 3, 0, True)}


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
            xs, ys = zip(*(cifar_batch(read_file(Path(folder, n)), n, os.path.join(folder, n)) for n in CIFAR_BATCH_MD5))
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


def read_file(path, limit=1 << 26):
    """The bytes of a regular file of at most `limit` bytes (a CIFAR batch is 31 MB): a FIFO or a
    device such as /dev/zero is refused rather than read for ever."""
    if not path.is_file() or path.stat().st_size > limit:
        raise UserError(f"{str(path)!r} is not a CIFAR-10 batch file (a regular file of at most {limit >> 20} MB)")
    return path.read_bytes()


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
#                                   Measures                                   #
################################################################################

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


def moments(f):
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(mu_a, cov_a, mu_b, cov_b):
    """The Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b); tr sqrt(A B) is the sum
    of the square roots of the eigenvalues of A B, which are real and >= 0."""
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


def reference_stats(dataset, data_dir, data, device):
    cache = os.path.join(data_dir, f"{dataset}_fid_stats.npz")
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


################################################################################
#                            Grids and the evaluation                          #
################################################################################

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


def evaluate(model, run, args, data):
    """Samples with each of --eval-steps from the same noise, by the run's objective's sampler;
    a shortcut model also by Euler with its velocity d = 0, and a flow-matching model also by
    AMED (baselines.AMED, fitted here) at 2, 4 and 8 network evaluations. Writes the grids and
    samples.npz to --out and returns the measures, keyed SAMPLER_N (N steps; AMED: N
    evaluations), and the samples. Digits are measured here; FID, which may need a download, is
    fid_scores."""
    info, device, name = DATA[run.dataset], data.device, run.objective
    n, classes = args.n_samples, info.classes
    noise = lambda k, seed: torch.randn(k, info.channels, info.size, info.size,       # noqa: E731
                                        generator=torch.Generator().manual_seed(seed)).to(device)
    x0, y = noise(n, run.seed + 1), (torch.arange(n) % classes).to(device) if classes else None
    settings = [(f"{name}_{N}", objective(name).sample, N) for N in args.eval_steps]
    if name == "shortcut":
        settings += [(f"velocity_{N}", objective("flow").sample, N) for N in args.eval_steps if N < 128]
    if name == "flow" and args.amed_iters:
        t0 = time.time()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(run.seed + 3)
            amed = AMED().to(device)
            k = min(n, 2048)
            amed.fit(model, noise(k, run.seed + 3), None if y is None else y[:k], iters=args.amed_iters)
        print(f"fitted AMED's step predictor in {time.time() - t0:.1f}s", flush=True)
        settings += [(f"amed_{2 * N}", functools.partial(sample, rule=amed.step, off_grid=True), N) for N in (1, 2, 4)]
    samples, t0 = {}, time.time()
    for key, sampler, N in settings:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(run.seed + 2)        # the fresh noise of the multistep sampler
            samples[key] = generate(sampler, model, x0, N, y, args.cfg_scale, args.eval_batch_size)
    print(f"sampled {n} images for each of {len(settings)} settings in {time.time() - t0:.1f}s"
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

    metrics = {"n_samples": n, "cfg_scale": args.cfg_scale}
    if run.dataset == "digits":
        judge = DigitsJudge(os.path.join(args.data_dir, "digits_judge.npz"))
        real, _ = load_digits()
        real = real.astype(np.float64) / 255
        perm = np.random.default_rng(0).permutation(len(real))
        ref, held = real[perm[:len(real) // 2]], real[perm[len(real) // 2:]]
        f_ref = moments(judge.features(ref))
        m = len(held)          # the same sample size on both sides keeps real vs real comparable
        metrics["metric"] = "Frechet distance in digit-classifier features"
        metrics["real_vs_real"] = frechet(*moments(judge.features(held)), *f_ref)
        for k, v in samples.items():
            x = v.double().numpy()
            metrics[k] = {"fd": frechet(*moments(judge.features(x[:m])), *f_ref),
                          "accuracy": float((judge.predict(x) == y.cpu().numpy()).mean())}
        print_table(metrics)
    return metrics, samples


def fid_scores(samples, run, args, data):
    """FID of the samples of `evaluate`, over --n-samples of them against the training
    set's Inception statistics (the paper's FID-50k draws 50,000): {SAMPLER_N: {"fid": ...}}."""
    if fid_backend() is None:
        print(f"FID skipped: {NO_FID}", flush=True)
        return {}
    try:
        mu, cov = reference_stats(run.dataset, args.data_dir, data, data.device)
    except (OSError, RuntimeError) as e:          # urllib's URLError is an OSError
        raise UserError(f"cannot load the Inception weights ({first_line(e)}): put the file it names in "
                        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass --no-fid; every other "
                        f"measure is in {os.path.join(args.out, 'metrics.json')}") from None
    n = args.n_samples
    metrics = {"metric": f"FID over {n} samples against the training set's statistics (Inception pool3, "
                         f"{fid_backend()}; the paper's FID-50k draws 50,000)"}
    for k, v in samples.items():
        metrics[k] = {"fid": frechet(*moments(inception_features(v.numpy(), data.device)), mu, cov)}
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
