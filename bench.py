"""Speed: `python train_images.py --benchmark` times a training step of every objective of
Table 1, and sampling, on random data of the dataset's shape (no data loading), and prints
img/s, ms per step, the step time against flow matching, model TFLOP/s and MFU.

FLOPs come from the model's arithmetic (`dit_flops`, checked against PyTorch's FlopCounterMode
by the tests) times the rows that each network forward of one step sees, counted by hooks (3x
for the rows that also go backward); MFU is against the dense bf16 peak of the detected GPU.
"""
import copy
import dataclasses
import time

import torch

from baselines import OBJECTIVES, make_targets, objective, options_of
from images import DATA, generate, get_batch
from shortcut import DiT, ema_update, errors, sample

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


def benchmark(run, args, cfg, device):
    """Training speed of every objective with the run's model and batch, and sampling speed."""
    info = DATA[run.dataset]
    g = torch.Generator(device=device).manual_seed(run.seed)
    shape = (4 * run.batch_size, info.channels, info.size, info.size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(info.classes, shape[:1], device=device, generator=g) if info.classes else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    peak, gpu = peak_tflops(device)
    warmup = args.bench_warmup + (10 if args.compile else 0)
    print(f"benchmark on {gpu}: DiT-{run.model}/{run.patch} at {info.size}x{info.size}x{info.channels}, "
          f"batch {run.batch_size}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', compiled' if args.compile else ''}, {args.bench_steps} timed steps after {warmup} warm-up; "
          f"peak {peak or 'unknown'} TFLOP/s dense bf16")
    print(f"  {'objective':26s}{'img/s':>10s}{'ms/step':>10s}{'vs flow':>9s}{'TFLOP/s':>10s}{'MFU':>8s}")
    times = {}
    for name in OBJECTIVES:
        model = DiT(cfg).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        teacher = copy.deepcopy(model).requires_grad_(False) if objective(name).two_phase else None
        opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay,
                                fused=device.type in ("cuda", "cpu"))
        options = options_of(name, {**dataclasses.asdict(run), "pair": "independent"})

        def step(net):        # the training loop of train_images.py, without its bookkeeping
            x1, y = get_batch(data, labels, run.batch_size, info.flip)
            with autocast:
                loss = errors(net, make_targets(name, net, x1, y, teacher=teacher, progress=0.5, **options)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, run.ema)
        rows = forward_rows(lambda: step(model), [model] + [teacher] * (teacher is not None))
        net = torch.compile(model) if args.compile else model
        dt = times[name] = timed(lambda: step(net), warmup, args.bench_steps, device)
        flops = dit_flops(model, 3 * rows[0] + rows[1])
        mfu = f"{flops / dt / 1e12 / peak:7.1%}" if peak else "    n/a"
        print(f"  {name:26s}{run.batch_size / dt:10.0f}{dt * 1e3:10.2f}{dt / times['flow']:9.3f}"
              f"{flops / dt / 1e12:10.3g} {mfu}", flush=True)
    x0 = torch.randn(args.eval_batch_size, *shape[1:], device=device, generator=g)
    y = torch.arange(args.eval_batch_size, device=device) % info.classes if info.classes else None
    sampler = torch.compile(ema.eval()) if args.compile else ema.eval()
    for N in (1, 128):
        dt = timed(lambda: generate(sample, sampler, x0, N, y, args.cfg_scale, args.eval_batch_size, to_cpu=False),
                   int(N == 1), max(1, args.bench_steps // N), device)      # N = 1 warms up for both
        print(f"  sampling, {N:3d} step{'s' if N > 1 else ' '}       {args.eval_batch_size / dt:10.0f} img/s "
              f"(batch {args.eval_batch_size})")
    return times


def forward_rows(step, nets):
    """The rows that the networks' forwards see in one step: [with gradient, without]."""
    rows = [0, 0]

    def count(module, inputs):
        rows[not torch.is_grad_enabled()] += len(inputs[0])
    hooks = [net.register_forward_pre_hook(count) for net in nets]
    step()
    for h in hooks:
        h.remove()
    return rows
