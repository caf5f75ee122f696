"""Train a DiT on images by any objective of Table 1, then sample it at 1, 2, 4, 8 and 128 steps.

    python train_images.py                                   # a shortcut model on 8x8 digits, CPU
    python train_images.py --objective flow --out out/flow   # the flow-matching baseline
    python train_images.py --objective reflow --teacher out/flow/checkpoint.pt --out out/reflow
    python train_images.py --device cuda --dataset cifar10 --data-dir data --download --compile
    python train_images.py --resume out/images/checkpoint.pt                # continue a run
    python train_images.py --sample-only --resume out/images/checkpoint.pt  # sample and measure it
    torchrun --nproc_per_node=8 train_images.py --device cuda --dataset cifar10 --compile

A run is its record (`Run`), saved in every checkpoint and in metrics.json: --resume restores it. Writes to --out:
checkpoint.pt (every --save-every steps, at the end, and on Ctrl-C or SIGTERM), grid_N.png, steps.png, samples.npz
and metrics.json, sampled with the EMA weights by the objective's own sampler (images.py). --batch-size is the global
batch: under torchrun each process draws its share with a seed of its own, as DiT does.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import time

import torch

import bench
from baselines import OBJECTIVES, defaults, make_targets, new_stage, options_of, stage
import images
from runs import (Interrupted, Parser, Record, TrainingDiverged, UserError, add_settings, agreed_stop, as_count,
                  as_positive, as_share, check_outputs, checked, claim, cli, deferred_stop, first_line,
                  load_checkpoint, refuse, setting, write_atomic)
from shortcut import BOOTSTRAP_LEVELS, DIT_SIZES, DiT, dit_config, ema_update, regress


@dataclasses.dataclass(frozen=True)
class Run(Record):
    """Every setting that defines a run, each with its flag; the defaults are those of digits."""
    dataset: str = setting("digits", "digits (8x8, CPU; default), cifar10 or celeba", choices=list(images.DATA))
    model: str = setting("XS", "DiT size (default: XS for digits, B otherwise)", choices=list(DIT_SIZES))
    patch: int = setting(2, "patch size (default: 2; 4 for celeba)", type=as_count)
    lr: float = setting(2e-3, "peak AdamW lr (default: 2e-3 for digits, 1e-4 otherwise, official)", type=as_positive)
    warmup: int = setting(200, "lr warmup steps (default: 200 for digits, 5000 otherwise; official: 0)",
                          type=checked(int, lambda v: 0 <= v <= 10 ** 9, "from 0 to 10^9"))
    weight_decay: float = setting(0.1, "AdamW weight decay (default: 0.1, official)",
                                  type=checked(float, lambda v: 0 <= v < math.inf, "finite and 0 or more"))
    grad_clip: float = setting(1.0, "gradient-norm clip (default: 1; official: inf, none)",
                               type=checked(float, lambda v: v > 0, "above 0"))
    steps: int = setting(3000, "training steps in all (default: 3000 for digits, 400k otherwise)", type=as_count)
    batch_size: int = setting(128, "the global batch (default: 128 digits, 256 cifar10, 64 celeba)", type=as_count)
    ema: float = setting(0.999, "EMA decay (default: 0.999, official)",
                         type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"))
    label_dropout: float = setting(0.1, "share of labels replaced by the null class (default: 0.1)", type=as_share)


DEFAULTS = {"digits": {}, "cifar10": dict(model="B", batch_size=256, steps=400_000, lr=1e-4, warmup=5000),
            "celeba": dict(model="B", patch=4, batch_size=64, steps=400_000, lr=1e-4, warmup=5000)}
FREE = "only --out, --save-every, the evaluation flags, --device and --compile may change"


def save_checkpoint(path, run, model, ema, opt, step, teacher, world):
    """The whole state of training; every process's random state goes in (all must call it)."""
    rngs = [(torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rngs[0])
        if torch.distributed.get_rank() > 0:
            return
    state = {"run": dataclasses.asdict(run), "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict(), "rng": rngs, **({"teacher": teacher.state_dict()} if teacher else {})}
    write_atomic(path, lambda f: torch.save(state, f))      # PD's teacher changes from stage to stage


def main(argv=None):
    # The flags, and the run record that they define or --resume restores, with the checkpoint's state and the
    # teacher's. Every flag and path is checked here, before anything is trained or written.
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p.add_argument_group(f"the run record (--resume restores it; {FREE})"), Run, default=argparse.SUPPRESS)
    a = p.add_argument
    a("--teacher", help="two-phase objectives: checkpoint.pt of a finished flow-matching run, same data and model")
    a("--resume", help="continue this checkpoint's run to its --steps, with its record; a finished run is only sampled")
    a("--sample-only", action="store_true", help="with --resume: only sample and measure, into a folder of its own "
      "(default: sampled/ beside the checkpoint)")
    a("--out", type=checked(str, bool, "a folder"), help="output folder (default: --resume's folder, else out/images)")
    a("--save-every", type=as_count, help="steps between checkpoints (default: 1000 for digits, 5000 otherwise)")
    a("--log-every", type=checked(int, lambda v: v >= 0, "0 or more"), default=100,
      help="steps between progress lines (default: 100; 0: at saves only)")
    images.add_flags(a)
    usable = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    a("--device", default="auto", choices=["auto", *usable], help="auto (default): the first that this torch can use")
    a("--compile", action="store_true", help="torch.compile the model for training and sampling (CUDA)")
    bench.add_flags(a)
    args = p.parse_args(argv)
    refuse(not usable.get(args.device, True), f"--device {args.device} was asked for but this torch cannot use it here")
    device = torch.device(next(d for d, ok in usable.items() if ok) if args.device == "auto" else args.device)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Run) if f.name != "teacher"
             and hasattr(args, f.name)}
    refuse(args.sample_only and not args.resume, "--sample-only needs --resume PATH, the checkpoint to sample")
    refuse(args.resume and args.teacher, "--teacher cannot change on --resume: the checkpoint holds its teacher")
    refuse(os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is a file")
    state = load_checkpoint(args.resume, Run, "--resume", "train_images.py") if args.resume else None
    settings = {**DEFAULTS[given.get("dataset", "digits")], **given}
    run = state["run"] if state else Run(**defaults(settings.get("objective", "shortcut"), **settings))
    for name, value in given.items() if state else []:
        refuse(getattr(run, name) != value, f"--{name.replace('_', '-')} {value} contradicts {args.resume!r}, whose "
               f"run has {name} = {getattr(run, name)}: a resumed run keeps its record; {FREE}")
    two_phase, info = OBJECTIVES[run.objective].two_phase, images.DATA[run.dataset]
    pd = run.objective == "progressive-distillation"
    refuse(info.size % run.patch, f"--patch {run.patch} does not divide the {info.size}x{info.size} images")
    refuse(args.cfg_scale != 1 and not info.classes, f"--cfg-scale: {run.dataset} has no classes")
    refuse(args.teacher and not two_phase, f"--teacher is for the two-phase objectives, not {run.objective}")
    refuse(two_phase and not (args.teacher or state or args.benchmark), f"--objective {run.objective} is two-phase: "
           "pass --teacher PATH, the checkpoint.pt of a flow-matching run (--objective flow --out out/flow)")
    taught = load_checkpoint(args.teacher, Run, "--teacher", "train_images.py") if args.teacher else None
    if taught:          # the student inherits its data, model and, for PD, how t and d are told
        run = dataclasses.replace(run, teacher=taught["run"])
        same = ("dataset", "model", "patch") + ("t_scale", "d_embed") * pd
        faults = "".join(f", {k} {getattr(run.teacher, k)} (not {getattr(run, k)})" for k in same
                         if getattr(run.teacher, k) != getattr(run, k))
        faults += ", unfinished" * (taught["step"] < run.teacher.steps)
        refuse(run.teacher.objective != "flow" or faults, f"--teacher {args.teacher} must be a finished flow-matching "
               f"run with the student's {', '.join(same)}; its record says {run.teacher.objective}{faults}")
    folder = (os.path.dirname(args.resume) or ".") if args.resume else "out/images"
    args.out = args.out or (os.path.join(folder, "sampled") if args.sample_only else folder)
    refuse(args.sample_only and os.path.realpath(args.out) == os.path.realpath(folder),
           f"--sample-only writes its own files: choose an --out other than the run's folder {folder!r}")
    args.save_every = args.save_every or (1000 if run.dataset == "digits" else 5000)
    args.n_samples = args.n_samples or (1000 if run.dataset == "digits" else 10_000)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with contextlib.ExitStack() as held:    # until the end: the process group, and the output folder (process 0)
        if world > 1:                       # under torchrun: one process per GPU (NCCL) or per CPU worker (gloo)
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            held.callback(torch.distributed.destroy_process_group)
        cfg = dit_config(run.model, img_size=info.size, channels=info.channels, patch=run.patch,
                         num_classes=info.classes, t_scale=run.t_scale, d_embed=run.d_embed)
        if args.benchmark:
            return bench.benchmark(run, args, cfg, device)
        refuse(run.batch_size % world, f"global --batch-size {run.batch_size} is not a multiple of {world} processes")
        log = print if rank == 0 else (lambda *a, **k: None)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        held.enter_context(claim(args.out) if rank == 0 else contextlib.nullcontext())
        ckpt = os.path.join(args.out, "checkpoint.pt")
        if not (args.resume and os.path.exists(ckpt) and os.path.samefile(args.resume, ckpt)):
            refuse(os.path.exists(ckpt), f"{ckpt!r} exists: continue that run with --resume {ckpt}, or another --out")
            check_outputs(args.out, "metrics.json", dataclasses.asdict(run))
        x, y = images.load_digits() if run.dataset == "digits" else images.load_cifar10(args.data_dir, args.download) \
            if run.dataset == "cifar10" else images.load_celeba(args.data_dir, info.size)
        data, labels = torch.as_tensor(x).to(device), None if y is None else torch.as_tensor(y).to(device)

        # The model, its EMA, the optimiser and, for a two-phase run, the teacher.
        torch.manual_seed(run.seed * world + rank)    # as DiT: each process draws its own batches and noise
        model = DiT(cfg).to(device)
        net = torch.compile(model) if args.compile else model
        ddp = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net    # all with process 0's weights
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay,
                                fused=device.type in ("cuda", "cpu"))
        teacher = DiT(dataclasses.replace(cfg, t_scale=run.teacher.t_scale, d_embed=run.teacher.d_embed)).to(
            device).requires_grad_(False) if two_phase else None
        # A resumed run restores what it saved; a taught one starts its teacher (and PD's student) from its EMA.
        loads = ([(model, "model"), (ema, "ema"), (opt, "opt")] + [(teacher, "teacher")] * two_phase if state
                 else [(teacher, "ema")] + [(model, "ema"), (ema, "ema")] * pd if taught else [])
        try:
            for part, key in loads:
                part.load_state_dict((state or taught)[key])
            if state and len(state["rng"]) == world:        # else, under another world size: fresh draws
                torch.set_rng_state(state["rng"][rank][0])
                if device.type == "cuda" and state["rng"][rank][1] is not None:
                    torch.cuda.set_rng_state(state["rng"][rank][1], device)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
            raise UserError(f"{args.resume or args.teacher!r} does not fit its record's model "
                            f"({type(e).__name__}: {first_line(e)})") from None
        start = state["step"] if state else 0
        end = start if args.sample_only else run.steps
        log(f"{run.dataset}: {len(data)} images, DiT-{run.model}/{run.patch} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), device {device} x {world}, "
            f"batch {run.batch_size}, objective {run.objective}" + (f", resumed at step {start}" if state else "")
            + ("; the checkpoint is finished: it is only sampled" if start >= run.steps else ""))

        # The loop. A builder of baselines.py draws the queries and targets; the network regresses them.
        options = options_of(run.objective, dataclasses.asdict(run))
        builds_targets = teacher if two_phase else ema if run.ema_teacher else None
        total, n, t0 = torch.zeros((), device=device), 0, time.time()
        with deferred_stop() as requests:
            for step in range(start, end):
                x1, y = images.get_batch(data, labels, run.batch_size // world, info.flip)
                if y is not None:       # label dropout to the null class, for classifier-free guidance
                    y = torch.where(torch.rand(len(y), device=device) < run.label_dropout, info.classes, y)
                opt.param_groups[0]["lr"] = run.lr * min(1.0, (step + 1) / max(run.warmup, 1))   # then constant
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    # the curricula move in stages: the stage's start keeps a compiled graph fixed
                    tg = make_targets(run.objective, net, x1, y, teacher=builds_targets,
                                      progress=stage(step / run.steps) / BOOTSTRAP_LEVELS, **options)
                    loss, _ = regress(ddp, tg, run.loss_power, OBJECTIVES[run.objective].per_part, run.boot_power)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
                opt.step()
                ema_update(ema, model, min(run.ema, (1 + step) / (10 + step)))
                if new_stage(run.objective, step / run.steps, (step + 1) / run.steps):
                    teacher.load_state_dict(model.state_dict())      # progressive distillation's next stage
                total, n, done = total + loss.detach(), n + 1, step + 1     # summed on the device: no sync

                # Log, save and stop at step counts every process knows; a stop is agreed on first.
                saving = done % args.save_every == 0 or done == end
                logging = args.log_every and done % args.log_every == 0 or saving
                stop = agreed_stop(requests, world, device) if logging or world == 1 or done % 10 == 0 else None
                if not (logging or stop):
                    continue
                if world > 1:
                    torch.distributed.all_reduce(total)
                mean, rate = total.item() / n / world, (done - start) * run.batch_size / (time.time() - t0)
                if not (math.isfinite(mean) and all(p.isfinite().all() for m in (model, ema) for p in m.parameters())):
                    kept = f"the last good checkpoint is kept at {ckpt!r}" if os.path.isfile(ckpt) else "none saved"
                    raise TrainingDiverged(f"the loss or the weights became non-finite by step {done}; {kept}; "
                                           "lower --lr or raise --warmup")
                log(f"step {done:7d}/{run.steps}  loss {mean:.4f}  {rate:7.0f} img/s  "
                    f"ETA {(run.steps - done) * run.batch_size / rate / 60:.1f} min", flush=True)
                total, n = torch.zeros_like(total), 0
                if saving or stop:
                    save_checkpoint(ckpt, run, model, ema, opt, done, teacher, world)
                if stop:
                    raise Interrupted(f"{stop}: saved step {done} to {ckpt!r}; continue with --resume {ckpt}", stop)
        train_seconds = round(time.time() - t0, 1) if end > start else None
        if end > start:
            log(f"trained {end - start} steps in {train_seconds}s")
        if world > 1:           # DDP keeps the replicas bit-identical: each weight's max over the processes is its min
            bounds = torch.stack([w := torch.cat([p.detach().flatten() for p in model.parameters()]), -w])
            torch.distributed.all_reduce(bounds, torch.distributed.ReduceOp.MAX)
            if not torch.equal(bounds[0], -bounds[1]):
                raise RuntimeError("the DDP replicas drifted apart")
            log(f"all {world} processes hold identical weights", flush=True)

        # Evaluation, with the EMA weights and the objective's own sampler; FID last, as it may need a download.
        if rank > 0:
            return None
        sampler = torch.compile(ema.eval()) if args.compile and device.type == "cuda" else ema.eval()
        scores, samples = images.evaluate(sampler, run, args, data)
        metrics = {"run": dataclasses.asdict(run), "step": end, "train_seconds": train_seconds, **scores}
        path = os.path.join(args.out, "metrics.json")
        write_atomic(path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        if not args.no_fid and run.dataset != "digits":
            metrics.update(images.fid_scores(samples, run, args, data))
            write_atomic(path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        log(f"\ndone in {time.time() - t0:.1f}s; wrote {'checkpoint.pt, ' * (end > start)}grid_N.png, "
            f"steps.png, samples.npz and metrics.json to {args.out}")
        return metrics


if __name__ == "__main__":
    cli(main, "lower --batch-size (training), or --eval-batch-size or --n-samples (sampling)")
