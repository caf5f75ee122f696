"""What both training scripts share: run records and their flags, checkpoints, an output folder's lock, signals,
atomic writes and one-line errors."""
import argparse
import contextlib
import dataclasses
import errno
import glob
import json
import math
import os
import signal
import sys

import torch

from baselines import OBJECTIVES
from shortcut import D_EMBEDS, require

try:
    import fcntl
except ImportError:      # Windows: no lock, so keep one run per folder by hand
    fcntl = None


class UserError(Exception):
    """Bad input: one line on stderr, exit code 2, nothing overwritten."""


class TrainingDiverged(Exception):
    """Non-finite loss or weights: exit code 1; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Interrupted(message, signal's name), of Ctrl-C or SIGTERM: exit code 128 + the signal's number."""


def refuse(condition, message):
    if condition:
        raise UserError(message)


def first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def cli(main, oom_hint, argv=None):
    """Runs main(argv): Ctrl-C and SIGTERM stop it at once (a loop defers them); errors exit with one line on stderr."""
    def interrupt(number, _):
        name = signal.Signals(number).name
        raise Interrupted(f"{name}: stopped; what was saved before is whole", name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        main(argv)
    except (Interrupted, UserError, TrainingDiverged) as e:
        interrupted = isinstance(e, Interrupted)
        print(e.args[0] if interrupted else f"error: {e}", file=sys.stderr)
        sys.exit(128 + signal.Signals[e.args[1]] if interrupted else 2 if isinstance(e, UserError) else 1)
    except OSError as e:                                    # a full disk, an --out that is a file
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:                # torch.OutOfMemoryError is a RuntimeError
        if not (isinstance(e, MemoryError) or "out of memory" in str(e) or "allocate memory" in str(e)):
            raise
        print(f"error: out of memory ({first_line(e)}); {oom_hint}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def deferred_stop():
    """Within it, Ctrl-C and SIGTERM (what timeout, Slurm, torchrun and docker send) append the
    signal's name to the yielded list, so that a training loop can finish its step, save and stop."""
    requests = []
    previous = {sig: signal.signal(sig, lambda n, _: requests.append(signal.Signals(n).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agreed_stop(requests, world, device):
    """The signal that stops every process, or None: the same answer in each, so all must call it
    at the same step. One process's request is enough (torchrun forwards a signal to each)."""
    if world == 1:
        return requests[0] if requests else None
    number = torch.tensor([signal.Signals[requests[0]] if requests else 0], device=device)
    torch.distributed.all_reduce(number, torch.distributed.ReduceOp.MAX)     # SIGTERM (15) wins over SIGINT (2)
    return signal.Signals(int(number)).name if int(number) else None


########################### Flags and the run record ###########################

class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, like every other bad input
        raise UserError(message)


def setting(default, help, **flag):
    """A run record's field with the help and options of its flag --NAME (or flag=...): one place for both."""
    return dataclasses.field(default=default, metadata=dict(help=help, **flag))


def add_settings(parser, record, default=None):
    """A flag for each `setting` of `record`; with default=argparse.SUPPRESS, one not given sets no attribute."""
    for f in dataclasses.fields(record):
        if "help" in f.metadata:                        # which may name a flag and an action of their own
            options = {**({"action": "store_true"} if f.type is bool else {}), **f.metadata}
            name = options.pop("flag", "--" + f.name.replace("_", "-"))
            parser.add_argument(name, dest=f.name, default=f.default if default is None else default, **options)


def checked(kind, ok, need):
    """An argparse type: kind(text), which must satisfy ok, or argparse's error 'must be NEED'."""
    def parse(text):
        with contextlib.suppress(ValueError, OverflowError):
            if ok(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
    return parse


as_count = checked(int, lambda v: 1 <= v <= 10 ** 9, "an integer from 1 to 10^9")
as_share = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
as_positive = checked(float, lambda v: 0 < v < math.inf, "a finite number above 0")
as_power = checked(float, lambda v: 0 <= v <= 2, "in [0, 2]")


@dataclasses.dataclass(frozen=True)
class Record:
    """The settings that both scripts' runs share, made by `setting`; each script's Run adds its own. Saved with
    every model, so that resuming, sampling and teaching follow what was trained; `teacher` is a two-phase run's
    teacher's record."""
    objective: str = setting("shortcut", "what the model trains on (default: shortcut)", choices=list(OBJECTIVES))
    pair: str = setting("independent", "noise-data pairs: independent (default) or minibatch optimal transport",
                        choices=["independent", "ot"])
    bootstrap_frac: float = setting(0.25, "share of each batch with self-consistency targets", type=as_share)
    seed: int = setting(0, "seed of the data, the noise and the weights (default: 0)",
                        type=checked(int, lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"))
    ema_teacher: bool = setting(False, "exercise 8: targets from an EMA copy (the official default)")
    loss_power: float = setting(None, "p of the robust loss (default: the objective's)", type=as_power)
    boot_power: float = setting(0.0, "q: bootstrap rows weighted by error^q (default: 0; shortcut)", type=as_power)
    t_scale: float = setting(None, "the scale of t in its embedding (default: the objective's)",
                             type=checked(float, lambda v: 0 < v <= 1e4, "in (0, 10^4]"))
    d_embed: str = setting(None, "how d is told: its level log2(1/d), the end time t + d (exercise 14) or d itself "
                           "(default: the objective's: level, meanflow's gap)", choices=D_EMBEDS)
    teacher: "Record | None" = None

    def __post_init__(self):
        refuse(self.pair == "ot" and self.objective == "reflow", "--pair ot: reflow takes its pairs from its teacher")
        refuse(self.ema_teacher and OBJECTIVES[self.objective].two_phase,
               f"--ema-teacher: {self.objective}'s targets come from its teacher")
        refuse(self.boot_power and self.objective != "shortcut", "--boot-power is for --objective shortcut")

    @classmethod
    def load(cls, saved):
        """The record of a saved dict, each setting checked as its flag checks it (ValueError, by shortcut.require)."""
        fields, saved = {f.name: f for f in dataclasses.fields(cls)}, {"boot_power": 0.0, **saved}   # older records
        require(set(saved) == set(fields), f"its record's fields differ: {sorted(set(saved) ^ set(fields))}")
        for name, value in saved.items():
            f, ok = fields[name], name == "teacher" or value is None is fields[name].default
            with contextlib.suppress(argparse.ArgumentTypeError, ValueError, TypeError):
                ok = ok or (isinstance(value, bool) if f.type is bool else value in f.metadata.get("choices", [value])
                            and f.metadata.get("type", str)(str(value)) is not None)
            require(ok, f"its record has {name} = {value!r}")
        return cls(**{**saved, "teacher": saved["teacher"] and cls.load(saved["teacher"])})


######################### Checkpoints, the lock, files #########################

def tensors(state, name=""):
    """(name, tensor) for every floating-point tensor nested in dicts and lists."""
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        yield name, state
    elif isinstance(state, (dict, list, tuple)):
        for k, v in state.items() if isinstance(state, dict) else enumerate(state):
            yield from tensors(v, f"{name}.{k}" if name else str(k))


def load_checkpoint(path, record, flag, script):
    """A checkpoint's state with its record as `record`; UserError unless it is a whole checkpoint
    of `script` whose record holds and whose weights and optimiser moments are finite."""
    refuse(not os.path.isfile(path), f"no checkpoint at {path!r}; check the {flag} path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["run"] = record.load(state["run"])
    except Exception as e:
        raise UserError(f"{path!r} is corrupt or not a checkpoint of {script} ({type(e).__name__}: "
                        f"{first_line(e)}); use another one or start afresh") from None
    bad = next((name for name, v in tensors(state) if not v.isfinite().all()), None)
    refuse(bad, f"{path!r} holds non-finite values ({bad}): a diverged run cannot be resumed, sampled or taught "
           "from; use an earlier checkpoint")
    return state


def check_outputs(folder, name, record):
    """A run's outputs are replaced only by a run of the same record: UserError if folder/name
    (the JSON of a run's measures) exists and holds another record, or none that can be read."""
    try:
        with open(os.path.join(folder, name)) as f:
            theirs = json.load(f)["run"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        theirs = None
    refuse(theirs != json.loads(json.dumps(record)), f"{folder!r} holds the outputs of another run ({name} says "
           "so): choose another --out, or remove them")


@contextlib.contextmanager
def claim(folder):
    """Holds `folder` for one run: folder/run.lock carries the pid of the run that holds it, under an flock
    that the kernel drops when that process dies, so that a dead run's lock is taken over, with its writes'
    temporary files, and a live run's refused (UserError). It stays: else a second run could lock a new one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.lock")
    refuse(os.path.islink(path), f"{path!r} is a symbolic link: a lock file is never followed; remove it")
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), "r+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{folder!r} is in use by another run (pid {f.read().strip() or '?'}); wait for "
                                "it to finish or choose another folder") from None
        for tmp in glob.glob(os.path.join(glob.escape(folder), "*.*.tmp")):
            pid = tmp.rsplit(".", 2)[-2]
            try:
                if pid.isdigit():
                    os.kill(int(pid), 0)            # signal 0: only asks whether its writer lives
            except OSError as e:
                if e.errno == errno.ESRCH:          # it does not (EPERM: another user's, alive)
                    os.remove(tmp)
        f.truncate(0)
        print(os.getpid(), file=f, flush=True)
        yield


def write_atomic(path, write):
    """write(f) fills a new temporary file f of this process's own beside `path` (np.savez, torch.save, ...),
    which then replaces `path` by a rename: a failed or interrupted write (a full disk, Ctrl-C, kill -9) leaves
    the old file whole, two writers never share a temporary file, and a link planted there is never followed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)                       # a dead writer's with this pid, or a planted link
        with open(tmp, "xb") as f:               # O_CREAT | O_EXCL: never through a link
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror, path) from None
        raise
