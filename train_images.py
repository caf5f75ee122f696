"""Train a DiT on images by any objective of Table 1, then sample it at 1, 2, 4, 8 and 128 steps.

    python train_images.py                                   # a shortcut model on 8x8 digits, CPU
    python train_images.py --objective flow --out out/flow   # the flow-matching baseline
    python train_images.py --objective reflow --teacher out/flow/checkpoint.pt --out out/reflow
    python train_images.py --device cuda --dataset cifar10 --data-dir data --download --compile
    python train_images.py --resume out/images/checkpoint.pt --steps 6000   # continue a run
    python train_images.py --sample-only --resume out/images/checkpoint.pt  # sample and measure it
    torchrun --nproc_per_node=8 train_images.py --device cuda --dataset cifar10 --compile

A run is defined by its record (`Run`): the data, the model, the objective and every setting of
its training. The record is saved in every checkpoint and in metrics.json; --resume restores it
and refuses a flag that contradicts it. Writes to --out: checkpoint.pt (every --save-every
steps, at the end, and on Ctrl-C or SIGTERM), grid_N.png and steps.png (a column per N, from
the same noise), samples.npz and metrics.json. Sampling uses the EMA weights and the
objective's own sampler. The data and the measures are in images.py; --benchmark is bench.py.

--batch-size is the global batch: under torchrun each of P processes draws batch/P rows with a
seed of its own and builds the targets of its own rows, as DiT does, and DDP averages the
gradients. Label dropout reaches the bootstrap rows too; the official code keeps their labels.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

import bench
from baselines import OBJECTIVES, defaults, make_targets, new_stage, objective, options_of, stage
from images import DATA, NO_FID, DigitsJudge, evaluate, fid_backend, get_batch, load_dataset
from shortcut import (BOOTSTRAP_LEVELS, DIT_SIZES, DiT, Interrupted, Parser, TrainingDiverged, UserError, add_settings,
                      as_count, as_positive, as_power, as_seed, as_share, checked, claim, cli, dit_config, ema_update,
                      errors, loss_of, pick_device, setting, step_sizes, stop_requests, write_atomic)


################################################################################
#                                 The run record                               #
################################################################################

@dataclass(frozen=True)
class Run:
    """Every setting that defines a run, each with its flag; the defaults are those of digits. A
    two-phase run also holds the record of its flow-matching teacher."""
    dataset: str = setting("digits", "digits (default; 8x8, CPU), cifar10 or celeba (images.py)", choices=list(DATA))
    model: str = setting("XS", "DiT size (default: XS for digits, B otherwise)", choices=list(DIT_SIZES))
    patch: int = setting(2, "patch size (default: 2; 4 for celeba)", type=as_count)
    objective: str = setting("shortcut", "training objective (default: shortcut), see baselines.py",
                             choices=list(OBJECTIVES))
    pair: str = setting("independent", "how noise and data are paired in a batch: independently (default) or by "
                        "minibatch optimal transport (a host sync per step); not for reflow",
                        choices=["independent", "ot"])
    bootstrap_frac: float = setting(0.25, "share of each batch with self-consistency targets (default: 0.25)",
                                    type=as_share)
    lr: float = setting(2e-3, "peak AdamW learning rate (default: 2e-3 for digits, 1e-4 otherwise, the official "
                        "value)", type=as_positive)
    lr_schedule: str = setting("constant", "after warmup: constant (official, default) or a cosine decay to 0",
                               choices=["constant", "cosine"])
    warmup: int = setting(200, "learning-rate warmup steps (default: 200 for digits, 5000 otherwise)",
                          type=checked(int, lambda v: v >= 0, "0 or more"))
    weight_decay: float = setting(0.1, "AdamW weight decay (default: 0.1, official)",
                                  type=checked(float, lambda v: 0 <= v < math.inf, "finite and 0 or more"))
    grad_clip: float = setting(1.0, "gradient-norm clipping (default: 1.0; inf turns it off)",
                               type=checked(float, lambda v: v > 0, "above 0"))
    steps: int = setting(3000, "training steps in all (default: 3000 for digits, 400k otherwise); with --resume, "
                         "the new total", type=as_count)
    batch_size: int = setting(128, "the global batch, split evenly over the processes (default: 128 for digits, "
                              "256 cifar10, 64 celeba)", type=as_count)
    ema: float = setting(0.999, "EMA decay (default: 0.999, official)", type=checked(float, lambda v: 0 <= v < 1,
                                                                                       "in [0, 1)"))
    ema_teacher: bool = setting(False, "build the targets with the EMA weights (the official default)")
    label_dropout: float = setting(0.1, "probability of replacing a label by the null class (default: 0.1)",
                                   type=as_share)
    seed: int = setting(0, "random seed (default: 0)", type=as_seed)
    loss_power: float = setting(None, "p of the robust loss of shortcut.loss_of; 0 is the MSE (default: the "
                                "objective's own: 0, and 1 for meanflow)", type=as_power)
    t_scale: float = setting(None, "the scale of t before its embedding (default: the objective's, 1000 or 1)",
                             type=as_positive)
    teacher: "Run | None" = None

    @staticmethod
    def load(record):
        return Run(**{**record, "teacher": record["teacher"] and Run.load(record["teacher"])})


# The defaults that differ from digits': the official recipe's learning rate and batch sizes.
DEFAULTS = {"digits": {},
            "cifar10": dict(model="B", batch_size=256, steps=400_000, lr=1e-4, warmup=5000),
            "celeba": dict(model="B", patch=4, batch_size=64, steps=400_000, lr=1e-4, warmup=5000)}
FREE = "only --steps, --out, --save-every, the evaluation flags, --device and --compile may change"


################################################################################
#                                     Flags                                    #
################################################################################

def eval_steps(text):
    try:
        counts = [int(s) for s in text.split(",")]
        for N in counts:
            step_sizes(N)                     # refuses a count off the training grid
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated step counts, each a power of two from 1 to "
                                         f"128; got {text!r}") from None
    return counts


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p.add_argument_group("the run record (fixed for a run: --resume restores it; " + FREE + ")"), Run,
                 default=argparse.SUPPRESS)
    a = p.add_argument
    a("--teacher", help="for a two-phase objective (consistency-distillation, progressive-distillation, reflow): "
      "the checkpoint.pt of a finished flow-matching run of the same data and model, whose EMA weights teach")
    a("--resume", help="continue the run of this checkpoint up to --steps, with its record (a run already at "
      "--steps is only sampled and measured)")
    a("--sample-only", action="store_true", help="with --resume: sample and measure the checkpoint, train nothing")
    a("--out", help="output folder (default: the folder of --resume, else out/images)")
    a("--data-dir", default="data", help="where the data and the cached statistics live (default: data)")
    a("--download", action="store_true", help="fetch CIFAR-10 into --data-dir if it is not there, checking its md5")
    a("--save-every", type=as_count, help="steps between checkpoints (default: 1000 for digits, 5000 otherwise)")
    a("--eval-steps", type=eval_steps, default=[1, 2, 4, 8, 128], help="comma-separated sampling step counts, "
      "each a power of two up to 128 (default: 1,2,4,8,128)")
    a("--n-samples", type=checked(int, lambda v: v >= 2, "at least 2 (the metrics fit a covariance)"),
      help="samples per step count for the metrics (default: 1000 for digits, 10000 otherwise)")
    a("--eval-batch-size", type=as_count, default=1000, help="batch size when sampling (default: 1000)")
    a("--amed-iters", type=checked(int, lambda v: v >= 0, "0 or more"), default=400,
      help="for a flow-matching run: steps that fit AMED's step predictor, which then samples at 2, 4 and 8 "
      "evaluations (default: 400; 0: no AMED)")
    a("--cfg-scale", type=checked(float, math.isfinite, "a finite number"), default=1.0,
      help="classifier-free guidance scale at sampling; 1 is none (default: 1)")
    a("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    a("--compile", action="store_true", help="torch.compile the model for training and sampling (CUDA)")
    a("--log-every", type=checked(float, lambda v: v >= 0, "0 or more"), default=5.0,
      help="seconds between progress lines (default: 5)")
    a("--benchmark", action="store_true", help="time a training step of every objective and sampling on random "
      "data of the dataset's shape, and print img/s, TFLOP/s and MFU (bench.py); trains and writes nothing")
    a("--bench-steps", type=as_count, default=20, help="timed steps in --benchmark (default: 20)")
    a("--bench-warmup", type=checked(int, lambda v: v >= 0, "0 or more"), default=3,
      help="untimed steps before timing, 10 more with --compile (default: 3)")
    args = p.parse_args(argv)
    if args.sample_only and not args.resume:
        raise UserError("--sample-only needs --resume PATH, the checkpoint to sample")
    if args.resume and args.teacher:
        raise UserError("--teacher cannot change on --resume: the checkpoint of a two-phase run holds its teacher")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from None
    return args


def the_run(args):
    """The run record, from the flags or restored from --resume, and the checkpoint's state."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Run) if "help" in f.metadata
             and hasattr(args, f.name)}
    if args.resume is None:
        settings = {**DEFAULTS[given.get("dataset", "digits")], **given}
        run = Run(**defaults(settings.get("objective", "shortcut"), **settings))
        if run.pair == "ot" and run.objective == "reflow":
            raise UserError("--pair ot does not apply to reflow, whose pairs come from its teacher")
        if objective(run.objective).two_phase and args.teacher is None and not args.benchmark:
            raise UserError(f"--objective {run.objective} is two-phase: pass --teacher PATH, the checkpoint.pt of "
                            "a flow-matching run (python train_images.py --objective flow --out out/flow)")
        state = None
    else:
        state = load_checkpoint(args.resume)
        run = state["run"]
        for name, value in given.items():
            if name != "steps" and getattr(run, name) != value:
                raise UserError(f"--{name.replace('_', '-')} {value} contradicts {args.resume!r}, whose run has "
                                f"{name} = {getattr(run, name)}: a resumed run keeps its record; {FREE}")
        run = dataclasses.replace(run, steps=given.get("steps", run.steps))
    args.out = args.out or (os.path.dirname(args.resume) or "." if args.resume else "out/images")
    digits = run.dataset == "digits"
    args.save_every = args.save_every or (1000 if digits else 5000)
    args.n_samples = args.n_samples or (1000 if digits else 10_000)
    return run, state


################################################################################
#                                  Checkpoints                                 #
################################################################################

def model_config(run):
    info = DATA[run.dataset]
    try:
        return dit_config(run.model, img_size=info.size, channels=info.channels, patch=run.patch,
                          num_classes=info.classes, t_scale=run.t_scale)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_checkpoint(path, flag="--resume"):
    """A checkpoint's state, its record as a Run; UserError unless it is whole and finite."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}; check the {flag} path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["run"] = Run.load(state["run"])
        weights = {k: state[k] for k in ["model", "ema"] + ["teacher"] * ("teacher" in state)}
        if not isinstance(state["step"], int) or state["step"] < 0 or not state["rng"] or "opt" not in state:
            raise ValueError(f"bad step {state['step']!r} or random state")
    except Exception as e:
        raise UserError(f"{path!r} is corrupt or not a checkpoint of train_images.py ({type(e).__name__}: "
                        f"{first_line(e)}); use another one or start afresh") from None
    bad = [f"{k}.{name}" for k, w in weights.items() for name, v in w.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path!r} holds non-finite weights ({bad[0]}): a diverged run cannot be resumed, sampled "
                        "or taught from; use an earlier checkpoint")
    return state


def load_teacher(path, run):
    """The state of --teacher, which must be a finished flow-matching run of the same data and model."""
    state = load_checkpoint(path, "--teacher")
    t = state["run"]
    if t.objective != "flow" or (t.dataset, t.model, t.patch) != (run.dataset, run.model, run.patch) \
            or state["step"] < t.steps:
        raise UserError(f"--teacher {path!r} must be a finished flow-matching run of {run.dataset} with "
                        f"DiT-{run.model}/{run.patch}; its record says {t.objective} on {t.dataset} with "
                        f"DiT-{t.model}/{t.patch}, at step {state['step']} of {t.steps}")
    if run.objective == "progressive-distillation" and t.t_scale != run.t_scale:
        raise UserError(f"progressive distillation starts as its teacher, so it needs the teacher's --t-scale "
                        f"{t.t_scale:g}, not {run.t_scale:g}")
    return state


def save_checkpoint(path, run, model, ema, opt, step, teacher, world):
    """The whole state of training; every process's random state goes in (all must call it)."""
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return
    state = {"run": dataclasses.asdict(run), "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict(), "rng": rngs}
    if teacher is not None:                    # progressive distillation changes it from stage to stage
        state["teacher"] = teacher.state_dict()
    write_atomic(path, lambda f: torch.save(state, f))


def first_line(e):
    return (str(e).splitlines() or [""])[0][:200]


################################################################################
#                                   Training                                   #
################################################################################

def lr_at(step, run):
    """Linear warmup, then constant (the official schedule) or a cosine decay to 0 by run.steps."""
    warm = min(1.0, (step + 1) / max(run.warmup, 1))
    if run.lr_schedule == "cosine":
        return run.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / run.steps, 1.0)))
    return run.lr * warm


def setup_distributed(device):
    """Under torchrun: one process per GPU (NCCL) or per CPU worker (gloo). Returns rank, world, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def main(argv=None):
    args = parse_args(argv)
    run, state = the_run(args)
    rank, world, device = setup_distributed(args.device)
    cfg = model_config(run)
    if args.benchmark:
        return bench.benchmark(run, args, cfg, device)
    if run.batch_size % world:
        raise UserError(f"--batch-size {run.batch_size} is the global batch: it must divide evenly over the "
                        f"{world} processes")
    taught = load_teacher(args.teacher, run) if args.teacher else None
    if taught is not None:
        run = dataclasses.replace(run, teacher=taught["run"])
    log = print if rank == 0 else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    with claim(args.out) if rank == 0 else contextlib.nullcontext():
        ckpt = os.path.join(args.out, "checkpoint.pt")
        if os.path.isfile(ckpt) and not (args.resume and os.path.samefile(args.resume, ckpt)):
            raise UserError(f"{ckpt!r} exists; pass --resume {ckpt} to continue that run, or choose another --out"
                            + (f" (resuming {args.resume!r} there would overwrite it)" if args.resume else ""))
        judge = DigitsJudge(os.path.join(args.data_dir, "digits_judge.npz")) if run.dataset == "digits" else None
        if run.dataset != "digits" and fid_backend() is None:
            log(f"note: no Inception network, so no FID at the end ({NO_FID})")
        x, y = load_dataset(run.dataset, args.data_dir, args.download)
        data = torch.as_tensor(x).to(device)
        labels = None if y is None else torch.as_tensor(y).to(device)

        # The model, its EMA, the optimiser and, for a two-phase run, the teacher.
        torch.manual_seed(run.seed * world + rank)    # as DiT: each process draws its own batches and noise
        model = DiT(cfg).to(device)
        for p in model.parameters() if world > 1 else []:
            torch.distributed.broadcast(p.detach(), 0)    # but all start from the same weights
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay,
                                fused=device.type in ("cuda", "cpu"))
        two_phase = objective(run.objective).two_phase
        teacher = DiT(model_config(run.teacher)).to(device).requires_grad_(False).eval() if two_phase else None
        start = state["step"] if state else 0
        try:
            if taught is not None:
                teacher.load_state_dict(taught["ema"])
                if run.objective == "progressive-distillation":     # the student starts as its teacher
                    model.load_state_dict(taught["ema"])
                    ema.load_state_dict(taught["ema"])
            if state is not None:
                model.load_state_dict(state["model"])
                ema.load_state_dict(state["ema"])
                opt.load_state_dict(state["opt"])
                if teacher is not None:
                    teacher.load_state_dict(state["teacher"])
                if len(state["rng"]) == world:        # else, under another world size: fresh draws
                    torch.set_rng_state(state["rng"][rank][0])
                    if device.type == "cuda" and state["rng"][rank][1] is not None:
                        torch.cuda.set_rng_state(state["rng"][rank][1], device)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
            path = args.resume if state is not None else args.teacher
            raise UserError(f"{path!r} does not fit this model ({type(e).__name__}: {first_line(e)})") from None
        log(f"{run.dataset}: {len(data)} images, DiT-{run.model}/{run.patch} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), device {device} x {world}, "
            f"batch {run.batch_size}, objective {run.objective}" + (f", resumed at step {start}" if state else ""))
        if start >= run.steps and not args.sample_only:
            log(f"the checkpoint is at step {start}, at or past --steps {run.steps}: nothing to train, so it is "
                "only sampled and measured (raise --steps to train on)")

        # The loop. A builder of baselines.py draws the queries and targets; the network regresses them.
        net = torch.compile(model) if args.compile else model
        cuda_ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=cuda_ids) if world > 1 else net
        options = options_of(run.objective, dataclasses.asdict(run))
        builds_targets = teacher if two_phase else ema if run.ema_teacher else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        total, n, t0, last, trained = torch.zeros((), device=device), 0, time.time(), time.time(), 0
        with stop_requests() if world == 1 else contextlib.nullcontext([]) as stop:
            for step in range(start, run.steps if not args.sample_only else start):
                x1, y = get_batch(data, labels, run.batch_size // world, DATA[run.dataset].flip)
                if y is not None:       # label dropout to the null class, for classifier-free guidance
                    y = torch.where(torch.rand(len(y), device=device) < run.label_dropout, cfg.num_classes, y)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, run)
                with autocast:
                    # the curricula move in stages: the stage's start keeps a compiled graph fixed
                    tg = make_targets(run.objective, net, x1, y, teacher=builds_targets,
                                      progress=stage(step / run.steps) / BOOTSTRAP_LEVELS, **options)
                    loss = loss_of(errors(ddp, tg), tg, run.loss_power)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
                opt.step()
                ema_update(ema, model, min(run.ema, (1 + step) / (10 + step)))
                if new_stage(run.objective, step / run.steps, (step + 1) / run.steps):
                    teacher.load_state_dict(model.state_dict())      # progressive distillation's next stage
                total += loss.detach()                    # summed on the device: no host sync per step
                n, trained = n + 1, trained + 1
                saving = (step + 1) % args.save_every == 0 or step + 1 == run.steps or bool(stop)
                if saving or time.time() - last > args.log_every:
                    if world > 1:
                        torch.distributed.all_reduce(total)
                    mean, now = total.item() / n / world, time.time()
                    last_good = f"the last good checkpoint is kept at {ckpt!r}" if os.path.isfile(ckpt) else \
                        "no checkpoint was saved"
                    if not math.isfinite(mean):
                        raise TrainingDiverged(f"the loss became non-finite by step {step + 1}; {last_good}; "
                                               "lower --lr or raise --warmup")
                    rate = trained * run.batch_size / (now - t0)
                    log(f"step {step + 1:7d}/{run.steps}  loss {mean:.4f}  {rate:7.0f} img/s  "
                        f"ETA {fmt_time((run.steps - step - 1) * run.batch_size / rate)}", flush=True)
                    total.zero_()
                    n, last = 0, now
                if saving:
                    if not all(p.isfinite().all() for m in (model, ema) for p in m.parameters()):
                        # the loss of this step was finite, but its update (or the EMA) may not be
                        raise TrainingDiverged(f"the weights or their EMA became non-finite by step {step + 1}; "
                                               f"{last_good}; lower --lr or raise --warmup")
                    save_checkpoint(ckpt, run, model, ema, opt, step + 1, teacher, world)
                if stop:
                    raise Interrupted(f"{stop[0]}: saved step {step + 1} to {ckpt!r}; continue with --resume {ckpt}",
                                      stop[0])
        train_seconds = round(time.time() - t0, 1) if trained else None
        if trained:
            log(f"trained {trained} steps in {train_seconds}s")
        if world > 1:
            check_replicas(model, world)

        # Evaluation, with the EMA weights and the objective's own sampler.
        metrics = None
        if rank == 0:
            sampler = torch.compile(ema.eval()) if args.compile and device.type == "cuda" else ema.eval()
            metrics = {"run": dataclasses.asdict(run), "step": max(start, trained + start),
                       **evaluate(sampler, run, args, data, judge), "train_seconds": train_seconds}
            write_atomic(os.path.join(args.out, "metrics.json"),
                         lambda f: f.write(json.dumps(metrics, indent=2).encode()))
            print(f"\ndone in {time.time() - t0:.1f}s; wrote {'checkpoint.pt, ' * bool(trained)}grid_N.png, "
                  f"steps.png, samples.npz and metrics.json to {args.out}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


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


if __name__ == "__main__":
    cli(main)
