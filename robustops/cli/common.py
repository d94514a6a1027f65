"""What every subcommand shares: the one way to fail with a clear message, device choice, the one
torchrun / process-group set-up, number parsing ("8/255"), the common flags, data-path checks."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Tuple

from .._threads import default_threads, physical_cores

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

__all__ = ["CLIError", "parse_rows", "Parser", "fraction", "fractions", "parse_fraction", "alias", "Renamed", "pick_device", "Dist",
           "distributed", "add_common", "setup_run", "physical_cores", "require_min", "check_data_spec",
           "split_holdout", "load_data", "model_dims", "model_classes", "warn_empty_classes", "check_model_accepts", "check_writable", "exclusive", "agree",
           "checkpoint_meta", "write_summary", "DIGITS_MODEL", "fmt_pct", "os_error_line"]


#: The small CNN of the embedded digits data (8x8 grey images, 10 classes): the demo's model.
DIGITS_MODEL = {"num_classes": 10, "in_channels": 1, "input_size": 8}


def fmt_pct(v) -> str:
    """A fraction as a percentage with one decimal ("-" for None or NaN): the demo tables' format."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


class CLIError(Exception):
    """A user error: ``robustops.cli.main`` prints ``robustops <command>: error: <message>`` and
    exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``robustops <command>: error: <message>`` and exit status 2
    (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        # required options that have an alias (see alias()): given under either spelling
        missing = ["/".join(a.option_strings) for a in self._actions
                   if getattr(a, "required_with_aliases", False) and getattr(ns, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return ns, rest


def fraction(what: str):
    """An argparse type for a float, also written as a fraction ("8/255"); its error says
    "invalid <what> '...': expected a number or a fraction like 8/255"."""

    def parse(s: str) -> float:
        try:
            return float(Fraction(s.strip())) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"invalid {what} {s!r}: expected a number or a fraction like 8/255") \
                from None

    parse.__name__ = what
    return parse


parse_fraction = fraction("number")


def fractions(what: str):
    """An argparse type for a comma-separated list of fractions ("0,1/255,2/255")."""
    one = fraction(what)

    def parse(s: str):
        vals = [one(v) for v in s.split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"invalid {what} {s!r}: expected a comma-separated list like 0,2/255")
        return vals

    return parse


def alias(p, *names: str, dest: str, **kw) -> None:
    """Another spelling of an option, accepted but not shown in --help (one spelling each there). A
    required option stays required, satisfied by either spelling (checked by Parser)."""
    for action in p._actions:
        if action.dest == dest and action.required:
            action.required, action.required_with_aliases = False, True
    p.add_argument(*names, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


class Renamed(argparse.Action):
    """An option that exists under another name in this command: a one-line error naming it."""

    def __init__(self, option_strings, dest, new: str = "", why: str = "", **kw):
        super().__init__(option_strings, dest, nargs=1, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.why}; use {self.new}")


def parse_rows(spec: str, allowed, flag: str) -> list:
    """The comma-separated names of ``spec`` (a demo section's rows or methods), each one of ``allowed``;
    a CLIError naming ``flag`` and the allowed names otherwise (or when there are none)."""
    names = [r.strip() for r in spec.split(",") if r.strip()]
    if not names or any(r not in allowed for r in names):
        raise CLIError(f"{flag} must be a comma-separated list of {', '.join(allowed)}; got {spec!r}")
    return names


def require_min(**flags_and_minimums) -> None:
    """require_min(batch=(args.batch, 1), ...): CLIError "--batch must be >= 1, got 0" for the first
    flag below its minimum (underscores in a name become dashes)."""
    for name, (value, minimum) in flags_and_minimums.items():
        if value is not None and value < minimum:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def pick_device(name: Optional[str]) -> torch.device:
    """The device a flag names, else cuda when available, else cpu."""
    import torch

    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise CLIError(f"--device {name!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is available to this process; use --device cpu (or leave "
                           f"--device out: cuda when available, else cpu)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int
    world: int
    device: torch.device
    created: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _init(device_arg: Optional[str], backend: Optional[str], timeout: Optional[datetime.timedelta]) -> Dist:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device_arg)
    if world <= 1:
        return Dist(0, 1, dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **kw)
    return Dist(dist.get_rank(), dist.get_world_size(), dev, created)


@contextlib.contextmanager
def distributed(device_arg: Optional[str], backend: Optional[str] = None,
                timeout: Optional[datetime.timedelta] = None):
    """The process group of a torchrun job (from WORLD_SIZE / RANK / LOCAL_RANK), for the duration of
    a subcommand: each rank on its own GPU (cuda:LOCAL_RANK unless --device names one), nccl on GPU
    and gloo on CPU unless ``backend`` says otherwise. Yields a :class:`Dist`; a group created here
    is torn down at the end (after a barrier when the command ends normally)."""
    d = _init(device_arg, backend, timeout)
    ok = False
    try:
        yield d
        ok = True
    finally:
        if d.created:
            import torch.distributed as dist

            if dist.is_initialized():
                if ok:
                    dist.barrier()
                dist.destroy_process_group()


def add_common(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """--device, --seed, --threads, --workers, --no-progress / --progress."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (None: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (None: the physical cores this process may use, divided among the "
                        "torchrun processes of this machine, at most 8; 1 for inputs under 1024 values such as "
                        "the 8x8 digits, which gain nothing from more)")
    if workers:
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars (None: only when stderr is a terminal; otherwise one line per epoch / part)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bars")


def setup_run(args, sample_numel: Optional[int] = None) -> int:
    """Applies --threads (or the default, see add_common) and --progress's default, recorded on args;
    returns the thread count. Call once per command, before the work."""
    threads, progress = run_setup(args, sample_numel)
    args.threads = threads  # what ran, for the command's JSON summary
    if getattr(args, "progress", False) is None:
        args.progress = progress
    return threads


def run_setup(args, sample_numel: Optional[int] = None) -> Tuple[int, bool]:
    """setup_run without writing to args: applies --threads (or the default, see add_common) and returns
    (the thread count, whether to show progress bars: --progress, else whether stderr is a terminal)."""
    import sys

    import torch

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    if threads is None:  # the rule of robustops._threads, as train.fit(threads=None) applies it
        threads = default_threads(sample_numel, cores=physical_cores())
    torch.set_num_threads(threads)
    progress = getattr(args, "progress", False)
    return threads, sys.stderr.isatty() if progress is None else progress


def model_dims(info: Dict[str, Any]) -> Dict[str, int]:
    """The shape keywords of ``models.get_model`` for the data: in_channels and input_size (H) of
    images (C, H, W), and frames for videos (T, C, H, W)."""
    shape = tuple(int(v) for v in info["input_shape"])
    if len(shape) == 4:
        return {"frames": shape[0], "in_channels": shape[1], "input_size": shape[2]}
    return {"in_channels": shape[0], "input_size": shape[1]}


def check_data_spec(spec: str) -> None:
    """CLIError when the data spec names a path that does not exist."""
    if spec in ("digits", "moving_digits"):
        return
    kind, sep, rest = spec.partition(":")
    path = spec
    if sep and kind.lower() in ("cifar10", "cifar-10", "npz", "imagefolder", "folder"):
        path = rest
        if kind.lower() in ("imagefolder", "folder"):
            head, s2, tail = rest.rpartition(":")
            if s2 and tail.isdigit() and head:
                path = head
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise CLIError(f"--data: {path!r} does not exist (expected \"digits\", \"moving_digits\", a .npz file, cifar10:DIR or "
                       f"imagefolder:DIR)")


def load_data(spec: str, split: str, flag: str = "--data", validate: bool = True):
    """(dataset, info) of a data spec, validated (robustops.data.validate) before any work; every
    problem becomes one CLIError line that names the flag and the source. validate=False: for a
    command that evaluates a model, whose class count comes from the model (:func:`model_classes`
    validates then)."""
    from .. import data as rodata

    check_data_spec(spec)
    try:
        ds, info = rodata.get_dataset(spec, split)
        if validate:
            rodata.validate(ds, info, f"{flag} {spec} ({split})")
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as e:
        msg = str(e)
        raise CLIError(msg if msg.startswith(flag) else f"{flag} {spec!r}: {msg}") from None
    return ds, info


def warn_empty_classes(dataset, info: dict, command: str, flag: str = "--data") -> None:
    """A warning line on stderr when the training labels name classes without a sample (labels 0..9 and
    one 12 make a 13-class model with 2 empty classes): the class count is the largest label + 1."""
    import sys

    import torch

    tensors = getattr(dataset, "tensors", None)
    if not tensors or len(tensors) < 2:
        return
    k = int(info.get("num_classes") or 0)
    counts = torch.bincount(tensors[1].long().flatten(), minlength=k)
    empty = [str(c) for c in (counts[:k] == 0).nonzero().flatten().tolist()]
    if empty:
        print(f"robustops {command}: warning: {flag}: the labels run to {k - 1}, so the model gets {k} classes, but "
              f"class{'es' if len(empty) > 1 else ''} {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''} "
              f"{'have' if len(empty) > 1 else 'has'} no training sample (a wrong label?)", file=sys.stderr)


def model_classes(model, dataset, info: dict, spec: str, split: str, flag: str = "--data") -> dict:
    """For a command that evaluates a model (attack, certify, predict): info with the model's class count
    (the width of its logits), never the count the data's labels imply (labels 0..8, or one sample, on
    a 10-class model are fine), and the data validated against it: a label past the model's last class
    is refused in one line, as is a model that cannot take the data."""
    import torch

    from .. import data as rodata

    width = check_model_accepts(model, dict(info, num_classes=0), torch.device("cpu"))
    info = dict(info, num_classes=width)
    try:
        rodata.validate(dataset, info, f"{flag} {spec} ({split}; the model has {width} classes)")
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return info


def check_model_accepts(model, info: dict, device, flag: str = "--checkpoint") -> int:
    """A forward pass on one zero input of the data's shape: a model that cannot take the data (a
    digits model given 3x32x32 images) or names fewer classes fails here, in one line, before work.
    Returns the model's class count (the width of its logits)."""
    import torch

    shape = tuple(info["input_shape"])
    try:
        with torch.no_grad():
            out = model(torch.zeros((1,) + shape, device=device))
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{flag}: the model does not accept {info['name']} inputs of shape {list(shape)} ({first})") \
            from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < max(int(info["num_classes"]), 1):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if not info["num_classes"]:
            raise CLIError(f"{flag}: the model must return logits [B, classes] for {info['name']}, got {got}")
        raise CLIError(f"{flag}: the model must return logits [B, >= {info['num_classes']}] for {info['name']} "
                       f"({info['num_classes']} classes), got {got}")
    return int(out.shape[1])


def check_writable(path: str, flag: str) -> None:
    """CLIError unless a file can be created at path (its directory is made if missing): checked
    before the work whose result it will hold."""
    import tempfile

    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".robustops-write-check-"):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {path!r}: cannot write there ({e.strerror or e})") from None
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a directory; give a file name")


@contextlib.contextmanager
def exclusive(lock_path: str, what: str):
    """An exclusive lock (fcntl.flock on lock_path) for the duration: a second run on the same output
    fails at once with a clear message instead of interleaving its writes with the first's. The lock
    file is removed when the holder is done (while it still holds the lock); a run that locked a file
    another run has removed meanwhile takes the lock again on the new one."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(lock_path)) or ".", exist_ok=True)
    for _ in range(100):
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise CLIError(f"{what} is in use by another robustops run (lock {lock_path}); wait for it to finish "
                           f"or choose another output") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino:
                break  # the lock is on the file at lock_path, not on one its last holder removed
        except FileNotFoundError:
            pass
        fh.close()
    else:
        raise CLIError(f"{what}: could not lock {lock_path} (removed again and again by other runs)")
    try:
        yield
    finally:
        try:
            os.remove(lock_path)
        except OSError:
            pass
        fh.close()  # closing releases the lock


def agree(d: "Dist", error: Optional[str]) -> None:
    """Every rank raises CLIError(rank 0's message) when rank 0 found an error (a check only rank 0
    can make, like taking the output's lock), so that no rank waits at a barrier for a rank that left."""
    if d.world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CLIError(error)


def checkpoint_meta(path: str, model) -> dict:
    """Entries of a robustops checkpoint besides the weights (eps, norm, sigma, mean, std, method,
    model, config), if it is one; {} for TorchScript / export / foreign files."""
    import torch

    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain checkpoint: no metadata
        return {}
    if not isinstance(obj, dict):
        return {}
    meta = {k: v for k, v in obj.items() if k in ("mean", "std", "sigma", "latent_sigma", "method", "model", "eps", "norm",
                                                "config")}
    config = obj.get("config")
    if isinstance(config, dict) and "params" not in config and meta.get("method") != "gaussian":
        meta.pop("sigma", None)  # training checkpoints before the method registry stored a sigma for every method
    return meta


def write_summary(path: str, summary: dict) -> str:
    """A machine-readable summary of a command (JSON), written atomically next to its table."""
    import json

    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
        fh.write("\n")
    os.replace(tmp, path)
    return path


def split_holdout(ds, val_size: int, seed: int):
    """(train part, validation part): val_size samples of ds held out at random (seeded)."""
    import torch
    from torch.utils.data import Subset

    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[val_size:]), Subset(ds, perm[:val_size])


def os_error_line(e: OSError) -> str:
    """The one line a subcommand's failed read or write prints: the path and what to do. A full disk
    (ENOSPC, EDQUOT) says that finished work is kept: rows and checkpoints are written so that a
    failed write leaves every complete one, and --resume continues from them."""
    where = f" {e.filename!r}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing{where}: free some space (or write elsewhere) and run "
                f"the same command with --resume; the rows and epochs finished so far are kept")
    return f"cannot access{where}: {e.strerror or e}"
