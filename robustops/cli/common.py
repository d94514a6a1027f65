"""What every subcommand shares: the one way to fail with a clear message, device choice, the one
torchrun / process-group set-up, number parsing ("8/255"), the common flags, data-path checks."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch

__all__ = ["CLIError", "Parser", "parse_fraction", "pick_device", "Dist", "distributed", "add_common", "require_min",
           "check_data_spec", "split_holdout", "load_data", "check_model_accepts", "check_writable", "exclusive",
           "agree"]


class CLIError(Exception):
    """A user error: ``robustops.cli.main`` prints ``robustops <command>: error: <message>`` and
    exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``robustops <command>: error: <message>`` and exit status 2
    (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_fraction(s: str) -> float:
    """An argparse type: a float, also written as a fraction ("8/255")."""
    try:
        return float(Fraction(s.strip())) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {s!r}") from None


def require_min(**flags_and_minimums) -> None:
    """require_min(batch=(args.batch, 1), ...): CLIError "--batch must be >= 1, got 0" for the first
    flag below its minimum (underscores in a name become dashes)."""
    for name, (value, minimum) in flags_and_minimums.items():
        if value is not None and value < minimum:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def pick_device(name: Optional[str]) -> torch.device:
    """The device a flag names, else cuda when available, else cpu."""
    if name:
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise CLIError(f"--device {name!r}: {e}") from None
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
    """--device, --seed, --workers, --no-progress."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if workers:
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")


def check_data_spec(spec: str) -> None:
    """CLIError when the data spec names a path that does not exist."""
    if spec == "digits":
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
        raise CLIError(f"--data: {path!r} does not exist (expected \"digits\", a .npz file, cifar10:DIR or "
                       f"imagefolder:DIR)")


def load_data(spec: str, split: str, flag: str = "--data"):
    """(dataset, info) of a data spec, validated (robustops.data.validate) before any work; every
    problem becomes one CLIError line that names the flag and the source."""
    from .. import data as rodata

    check_data_spec(spec)
    try:
        ds, info = rodata.get_dataset(spec, split)
        rodata.validate(ds, info, f"{flag} {spec} ({split})")
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as e:
        msg = str(e)
        raise CLIError(msg if msg.startswith(flag) else f"{flag} {spec!r}: {msg}") from None
    return ds, info


def check_model_accepts(model, info: dict, device, flag: str = "--checkpoint") -> None:
    """A forward pass on one zero input of the data's shape: a model that cannot take the data (a
    digits model given 3x32x32 images) or names fewer classes fails here, in one line, before work."""
    shape = tuple(info["input_shape"])
    try:
        with torch.no_grad():
            out = model(torch.zeros((1,) + shape, device=device))
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{flag}: the model does not accept {info['name']} inputs of shape {list(shape)} ({first})") \
            from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < int(info["num_classes"]):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CLIError(f"{flag}: the model must return logits [B, >= {info['num_classes']}] for {info['name']} "
                       f"({info['num_classes']} classes), got {got}")


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
    fails at once with a clear message instead of interleaving its writes with the first's."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(lock_path)) or ".", exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CLIError(f"{what} is in use by another robustops run (lock {lock_path}); wait for it to finish "
                           f"or choose another output") from None
        yield
    finally:
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


def split_holdout(ds, val_size: int, seed: int):
    """(train part, validation part): val_size samples of ds held out at random (seeded)."""
    from torch.utils.data import Subset

    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[val_size:]), Subset(ds, perm[:val_size])
