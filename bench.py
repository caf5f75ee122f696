"""Speed (train_images.py --benchmark): a training step of every objective of Table 1, and sampling, on random data.
FLOPs are FlopCounterMode's over one eager step (forward, backward, MeanFlow's JVP); MFU is against the bf16 peak."""
import copy
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from baselines import OBJECTIVES, make_targets, options_of
from images import DATA, generate, get_batch
from runs import as_count
from shortcut import DiT, ema_update, regress, sample

PEAK_BF16 = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125),
             ("4090", 165)]      # dense bf16 TFLOP/s from the data sheets; the first name in the device's counts


def add_flags(a):
    """train_images.py's benchmark flags, given its parser's add_argument."""
    a("--benchmark", action="store_true", help="time a training step of every objective and sampling on random "
      "data (bench.py); trains nothing")
    a("--bench-steps", type=as_count, default=20, help="timed steps in --benchmark (default: 20)")


def timed(fn, warmup, reps, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + reps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def benchmark(run, args, cfg, device):
    """Returns {objective: (seconds per step, FLOPs per step)}, for the run's model and batch."""
    info, cuda, g = DATA[run.dataset], device.type == "cuda", torch.Generator(device=device).manual_seed(run.seed)
    shape = (4 * run.batch_size, info.channels, info.size, info.size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(info.classes, shape[:1], device=device, generator=g) if info.classes else None
    gpu = torch.cuda.get_device_name(device) if cuda else device.type
    peak = next((p for key, p in PEAK_BF16 if key in gpu), None)
    warmup, times = 3 + 10 * args.compile, {}      # compiling takes the first steps
    print(f"benchmark on {gpu}: DiT-{run.model}/{run.patch} at {info.size}x{info.size}x{info.channels}, "
          f"batch {run.batch_size}, {'bf16 autocast' if cuda else 'fp32'}{', compiled' if args.compile else ''}, "
          f"{args.bench_steps} timed steps after {warmup} warm-up; peak {peak or 'unknown'} TFLOP/s dense bf16")
    print(f"  {'objective':26s}{'img/s':>10s}{'ms/step':>10s}{'vs flow':>9s}{'GFLOP':>9s}{'TFLOP/s':>10s}{'MFU':>8s}")
    for name in OBJECTIVES:
        model = DiT(cfg).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        teacher = copy.deepcopy(model).requires_grad_(False) if OBJECTIVES[name].two_phase else None
        opt = torch.optim.AdamW(model.parameters(), run.lr, weight_decay=run.weight_decay, fused=device.type != "mps")
        options = options_of(name, {**vars(run), "pair": "independent"})

        def step(net):        # the training loop of train_images.py, without its bookkeeping
            x1, y = get_batch(data, labels, run.batch_size, info.flip)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss, _ = regress(net, make_targets(name, net, x1, y, teacher=teacher, progress=0.5, **options))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, run.ema)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step(model)          # the math kernel spells attention as matmuls, which every device counts
        net = torch.compile(model) if args.compile else model
        times[name] = dt, flops = timed(lambda: step(net), warmup, args.bench_steps, device), counter.get_total_flops()
        print(f"  {name:26s}{run.batch_size / dt:10.0f}{dt * 1e3:10.2f}{dt / times['flow'][0]:9.3f}{flops / 1e9:9.2f}"
              f"{flops / dt / 1e12:10.3g} " + (f"{flops / dt / 1e12 / peak:7.1%}" if peak else "    n/a"), flush=True)
    x0 = torch.randn(args.eval_batch_size, *shape[1:], device=device, generator=g)
    y = torch.arange(args.eval_batch_size, device=device) % info.classes if info.classes else None
    sampler = torch.compile(ema.eval()) if args.compile else ema.eval()
    for N in (1, 128):          # N = 1 warms up for both
        dt = timed(lambda: generate(sample, sampler, x0, N, y, args.cfg_scale, args.eval_batch_size, to_cpu=False),
                   int(N == 1), max(1, args.bench_steps // N), device)
        print(f"  sampling, {N:3d} step{'s' if N > 1 else ' '}       {len(x0) / dt:10.0f} img/s (batch {len(x0)})")
    return times
