"""Image data and measures for train_images.py: digits (offline), CIFAR-10 and CelebA; FID when it is installed."""
import collections
import functools
import hashlib
import importlib.util
import os
import pathlib
import pickle
import tarfile
import time
import urllib.request

import numpy as np
import torch

from baselines import AMED, OBJECTIVES, sampler
from runs import UserError, as_count, checked, first_line, refuse, write_atomic
from shortcut import step_sizes

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
Data = collections.namedtuple("Data", "size channels classes flip")   # size x size images; classes 0: unconditional
DATA = {"digits": Data(8, 1, 10, False), "cifar10": Data(32, 3, 10, True), "celeba": Data(64, 3, 0, True)}
fid_backend = functools.partial(importlib.util.find_spec, "pytorch_fid")   # FID as the official code, if installed


def add_flags(a):
    """train_images.py's flags for sampling and measuring, given its parser's add_argument."""
    a("--data-dir", default="data", help="where the data and the cached statistics live (default: data)")
    a("--download", action="store_true", help="fetch CIFAR-10 into --data-dir, checking its md5")
    a("--eval-steps", type=checked(lambda text: [len(step_sizes(int(s))) for s in text.split(",")], bool,
                                   "comma-separated powers of two from 1 to 128"),   # step_sizes refuses the others
      default=[1, 2, 4, 8, 128], help="sampling step counts (default: 1,2,4,8,128)")
    a("--n-samples", type=checked(int, lambda v: 2 <= v <= 10 ** 6, "from 2 to 10^6"),
      help="samples per step count (default: 1000 for digits, 10000 otherwise)")
    a("--eval-batch-size", type=as_count, default=1000, help="batch size when sampling (default: 1000)")
    a("--amed-iters", type=checked(int, lambda v: 0 <= v <= 10 ** 6, "from 0 to 10^6"), default=400,
      help="a flow run's AMED fit steps; AMED then samples at 2, 4, 8 evaluations (default: 400; 0: none)")
    a("--cfg-scale", type=checked(float, lambda v: abs(v) <= 100, "a number from -100 to 100"), default=1.0,
      help="classifier-free guidance scale at sampling, for class-conditional data (default: 1, none)")
    a("--no-fid", action="store_true", help="skip FID, whose Inception weights are downloaded the first time")


def load_digits():
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    return np.round(d.images * (255 / 16)).clip(0, 255).astype(np.uint8)[:, None], d.target.astype(np.int64)


def load_cifar10(data_dir, download=False):
    """The python archive in data_dir (fetched with download): nothing in it is unpickled before its md5 matches."""
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.isfile(archive):
        refuse(os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK),
               f"cannot read the directory {data_dir!r} (permission denied)")
        refuse(not download, f"no CIFAR-10 in {data_dir!r}: put cifar-10-python.tar.gz there (from {CIFAR_URL}) or "
               "pass --download")
        os.makedirs(data_dir or ".", exist_ok=True)
        print(f"downloading {CIFAR_URL} ...", flush=True)
        try:
            urllib.request.urlretrieve(CIFAR_URL, archive + ".part")
        except OSError as e:
            raise UserError(f"could not download {CIFAR_URL} ({e}); fetch it by hand into {data_dir!r}") from None
        check_md5(archive + ".part", CIFAR_MD5)
        os.replace(archive + ".part", archive)
    else:                       # a download was checked before it became the archive
        check_md5(archive, CIFAR_MD5)
    try:                # the archive matched its md5: only reading can fail, or a crafted pickle's global
        with tarfile.open(archive, "r:gz") as tar:
            batches = [CifarUnpickler(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}"), encoding="bytes").load()
                       for i in range(1, 6)]
    except (OSError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read {archive!r} ({getattr(e, 'strerror', None) or e})") from None
    return (np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32),
            np.concatenate([b[b"labels"] for b in batches]).astype(np.int64))


class CifarUnpickler(pickle.Unpickler):
    """Builds only what a batch holds: any other global (os.system, say) is refused instead of being called."""
    NUMPY = dict(ndarray=np.ndarray, dtype=np.dtype, _reconstruct=np.empty(0).__reduce__()[0])  # arrays' constructor

    def find_class(self, module, name):
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in self.NUMPY:
            return self.NUMPY[name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                     "lists, strings and numbers")


def check_md5(path, md5):
    """Refuses the file at `path` unless its md5 is the published one."""
    digest = hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()
    refuse(digest != md5, f"{path!r} has md5 {digest}, not the published {md5}: it is corrupt, truncated or altered, "
           "and nothing in it was unpickled; fetch CIFAR-10 again (--download into an empty --data-dir)")


def load_celeba(data_dir, size=64):
    """The images of data_dir, center-cropped and resized, decoded once into data_dir/celebaSIZE.npz."""
    readable = os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK)
    files = sorted(f for f in os.listdir(data_dir) if f.lower().endswith((".jpg", ".jpeg", ".png"))) if readable else []
    refuse(not files, f"no CelebA images in {data_dir!r}: download img_align_celeba.zip from the CelebA page (mmlab.ie."
           "cuhk.edu.hk/projects/CelebA.html), unzip it and pass --data-dir path/to/img_align_celeba")
    shape, cache = (len(files), 3, size, size), os.path.join(data_dir, f"celeba{size}.npz")

    def decode():
        from PIL import Image
        x, t0 = np.empty(shape, np.uint8), time.time()
        for i, name in enumerate(files):
            try:
                with Image.open(os.path.join(data_dir, name)) as im:
                    (w, h), s = im.size, min(im.size)
                    im = im.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
                    x[i] = np.asarray(im.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise UserError(f"cannot read {name!r} in {data_dir!r} ({type(e).__name__}: {e}); remove it or "
                                "re-extract the folder") from None
            if i % 20000 == 0 and i:
                print(f"  decoded {i}/{len(files)} images ({time.time() - t0:.0f}s)", flush=True)
        return [x]
    return cached(cache, {"x": shape}, "the cached CelebA images", decode)[0], None


def get_batch(data, labels, batch_size, flip):
    """A random batch in [-1, 1], flipped on the device; torch's generator makes it resumable."""
    idx = torch.randint(len(data), (batch_size,), device=data.device)
    x = data[idx].float() / 127.5 - 1
    x = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x) if flip else x
    return x, None if labels is None else labels[idx]


@torch.no_grad()
def generate(sampler, model, x0, steps, y, cfg_scale, batch_size, to_cpu=True):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        out = [sampler(model, x0[i:i + batch_size], steps, None if y is None else y[i:i + batch_size], cfg_scale)
               .float().to("cpu" if to_cpu else x0.device) for i in range(0, len(x0), batch_size)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def moments(f):
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(mu_a, cov_a, mu_b, cov_b):
    """tr sqrt(A B) is the sum of the square roots of the eigenvalues of A B, which are real and >= 0."""
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum())


class DigitsJudge:
    """A small MLP classifier of the real digits, whose hidden layer gives features; refit when `cache` is unusable."""

    def __init__(self, cache):
        def fit():
            from sklearn.neural_network import MLPClassifier
            x, y = load_digits()
            clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0).fit(x.reshape(-1, 64) / 255, y)
            return [clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1]]
        self.w = cached(cache, {"w0": (64, 128), "b0": (128,), "w1": (128, 10), "b1": (10,)}, "the cached judge", fit)

    def features(self, x01):
        return np.maximum(x01.reshape(len(x01), -1) @ self.w[0] + self.w[1], 0)

    def predict(self, x01):
        return (self.features(x01) @ self.w[2] + self.w[3]).argmax(1)


@functools.lru_cache(maxsize=1)
def inception(device):
    from pytorch_fid.inception import InceptionV3
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    return lambda x: net(x)[0].flatten(1)


@torch.no_grad()
def inception_features(x01, device, batch_size=200):
    return torch.cat([inception(device)(torch.as_tensor(x01[i:i + batch_size], device=device).float()).cpu()
                      for i in range(0, len(x01), batch_size)]).double().numpy()


def reference_stats(dataset, data_dir, data):
    cache, n = os.path.join(data_dir, f"{dataset}_fid_stats.npz"), min(len(data), 50_000)

    def compute():
        print(f"computing FID reference statistics from {n} training images (cached in {cache}) ...", flush=True)
        return moments(inception_features(data[:n].float() / 255, data.device))
    return cached(cache, {"mu": (2048,), "cov": (2048, 2048)}, "the cached FID statistics", compute)


def cached(path, shapes, what, compute):
    """The arrays named in `shapes` from the .npz cache at `path`, else compute()'s, which are then cached there."""
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in shapes]
            if [a.shape for a in arrays] == list(shapes.values()) and all(np.isfinite(a).all() for a in arrays):
                return arrays
            problem = "has the wrong shapes or non-finite values"
        except Exception as e:         # a truncated or foreign file: zipfile, pickle and key errors alike
            problem = f"is unreadable ({type(e).__name__})"
        print(f"{what} {path} {problem}: computing it afresh", flush=True)
    arrays = compute()
    try:                # a cache is a convenience: a read-only folder still gets its arrays
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, lambda f: np.savez(f, **dict(zip(shapes, arrays))))
    except OSError as e:
        print(f"could not write the cache {path} ({e.strerror or e}); continuing without it", flush=True)
    return arrays


def save_grid(path, x01, nrow, col_labels=()):
    """Images in [0, 1] as a PNG of `nrow` rows, filled column by column and enlarged to about 512 pixels."""
    from PIL import Image, ImageDraw
    n, C, H, W = x01.shape
    cells = np.ones((nrow * -(-n // nrow), H + 1, W + 1, C), np.float32)    # a white line above and left of each image
    cells[:n, 1:, 1:] = x01.transpose(0, 2, 3, 1)
    grid = cells.reshape(-1, nrow, H + 1, W + 1, C).transpose(1, 2, 0, 3, 4).reshape(nrow * (H + 1), -1, C)
    grid = (np.pad(grid, ((0, 1), (0, 1), (0, 0)), constant_values=1) * 255).round().astype(np.uint8)
    scale = max(1, 512 // max(grid.shape[:2]))
    grid = grid.repeat(scale, 0).repeat(scale, 1).repeat(3 // C, 2)
    img = Image.fromarray(np.pad(grid, ((16 if col_labels else 0, 0), (0, 0), (0, 0)), constant_values=255))
    for c, label in enumerate(col_labels):
        ImageDraw.Draw(img).text((scale * (c * (W + 1) + 1 + W // 2) - 3 * len(label), 2), label, fill="black")
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def evaluate(model, run, args, data):
    """Samples one noise by the objective's sampler, and by Euler at d = 0 (shortcut) or midpoint and AMED steps (flow),
    into grids and samples.npz. Returns the digits' measures and samples; FID, which may download, is fid_scores's."""
    info, device, name, n = DATA[run.dataset], data.device, run.objective, args.n_samples
    shape, cuda = (info.channels, info.size, info.size), [device] if device.type == "cuda" else []
    x0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(run.seed + 1)).to(device)
    y = (torch.arange(n) % info.classes).to(device) if info.classes else None
    settings = [(f"{name}_{N}", OBJECTIVES[name].sample, N) for N in args.eval_steps] + [
        (f"velocity_{N}", OBJECTIVES["flow"].sample, N) for N in args.eval_steps if N < 128 and name == "shortcut"] + [
        (f"midpoint_{2 * N}", sampler(AMED().to(device).step), N) for N in (1, 2, 4) if name == "flow"]  # unfit AMED
    if name == "flow" and args.amed_iters:
        t0, k = time.time(), min(n, 2048)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(run.seed + 3)
            amed = AMED().to(device)
            x0_fit = torch.randn(k, *shape, generator=torch.Generator().manual_seed(run.seed + 3)).to(device)
            amed.fit(model, x0_fit, None if y is None else y[:k], iters=args.amed_iters)
        print(f"fitted AMED's step predictor in {time.time() - t0:.1f}s", flush=True)
        settings += [(f"amed_{2 * N}", sampler(amed.step), N) for N in (1, 2, 4)]
    samples, t0 = {}, time.time()
    for key, draw, N in settings:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(run.seed + 2)        # the fresh noise of the multistep sampler
            samples[key] = generate(draw, model, x0, N, y, args.cfg_scale, args.eval_batch_size)
    print(f"sampled {n} images for each of {len(settings)} settings in {time.time() - t0:.1f}s"
          + (" (velocity_128 is shortcut_128: d = 0 is the finest level)" if name == "shortcut" else ""), flush=True)
    labels = y[:1000].cpu().numpy() if info.classes else np.zeros(0, np.int64)
    write_atomic(os.path.join(args.out, "samples.npz"),      # the first 1000 of each setting
                 lambda f: np.savez_compressed(f, labels=labels, **{k: v[:1000].numpy() for k, v in samples.items()}))
    ours, rows = [samples[f"{name}_{N}"] for N in args.eval_steps], min(info.classes or 8, n)   # a class per row
    for N, x in zip(args.eval_steps, ours):
        save_grid(os.path.join(args.out, f"grid_{N}.png"), x[:rows * min(10, n // rows)].numpy(), nrow=rows)
    save_grid(os.path.join(args.out, "steps.png"), torch.cat([x[:rows] for x in ours]).numpy(), nrow=rows,
              col_labels=[f"N={N}" for N in args.eval_steps])
    metrics = {"n_samples": n, "cfg_scale": args.cfg_scale}
    if run.dataset == "digits":
        judge = DigitsJudge(os.path.join(args.data_dir, "digits_judge.npz"))
        real = np.random.default_rng(0).permutation(load_digits()[0]).astype(np.float64) / 255
        held, ref = real[len(real) // 2:], moments(judge.features(real[:len(real) // 2]))
        metrics.update(metric="Frechet distance in digit-classifier features",   # sample sizes match real vs real
                       real_vs_real=frechet(*moments(judge.features(held)), *ref))
        for k, v in samples.items():
            metrics[k] = {"fd": frechet(*moments(judge.features(v[:len(held)].double().numpy())), *ref),
                          "accuracy": float((judge.predict(v.double().numpy()) == y.cpu().numpy()).mean())}
        print_table(metrics)
    return metrics, samples


def fid_scores(samples, run, args, data):
    if not fid_backend():
        print("FID skipped: install pytorch-fid (pip install pytorch-fid) for FID", flush=True)
        return {}
    try:
        mu, cov = reference_stats(run.dataset, args.data_dir, data)
    except (OSError, RuntimeError) as e:          # urllib's URLError is an OSError
        raise UserError(f"cannot load the Inception weights ({first_line(e)}): put the file it names in "
                        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass --no-fid; every other "
                        f"measure is in {os.path.join(args.out, 'metrics.json')}") from None
    metrics = {"metric": f"FID over {args.n_samples} samples against the training set's statistics (Inception "
                         "pool3 of pytorch-fid; the paper's FID-50k draws 50,000)"}
    for k, v in samples.items():
        metrics[k] = {"fid": frechet(*moments(inception_features(v.numpy(), data.device)), mu, cov)}
    print_table(metrics)
    return metrics


def print_table(metrics):
    """The rows of `metrics` that are dicts, under its "metric" (and its real_vs_real)."""
    keys = [k for k, v in metrics.items() if isinstance(v, dict)]
    cols, ref = list(metrics[keys[0]]), metrics.get("real_vs_real")
    print(f"\n{metrics['metric']}" + (f" (real vs real: {ref:.3f})" if ref is not None else ""))
    print(f"  {'sampler':28s}" + "".join(f"{c:>10s}" for c in cols))
    for k in keys:
        print(f"  {k:28s}" + "".join(f"{metrics[k][c]:10.3f}" for c in cols))
