"""Test helpers shared across test modules (not a conftest: import it as `from helpers import ...`
with tests/ on sys.path, which pytest's rootdir-relative import mode provides)."""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from robustops.data import load_digits
from robustops.cli.demo_autoattack import round_input as RoundInput  # noqa: F401 (the masked-gradient model)
from robustops.models import SmallCNN

_CACHE = {}


def has_module(name: str) -> bool:
    """Whether the top-level package ``name`` can be imported (one hidden as sys.modules[name] = None
    counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def needs(*names: str):
    """A skipif marker for one test (or one parameter): it needs these optional packages (a reference
    library, or kornia for the ops computed with it)."""
    missing = [n for n in names if not has_module(n)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


from robustops.corruptions import NEEDS_KORNIA  # noqa: E402

#: The corruptions computed with kornia: robustops.corruptions raises ImportError for them without it.
KORNIA_CORRUPTIONS = frozenset(NEEDS_KORNIA)


def corruption_params(names):
    """names as pytest parameters, those in KORNIA_CORRUPTIONS marked needs("kornia")."""
    return [pytest.param(n, marks=needs("kornia")) if n in KORNIA_CORRUPTIONS else n for n in names]


def without_kornia(names):
    """names less KORNIA_CORRUPTIONS where kornia is absent (a test looping over corruptions)."""
    return [n for n in names if has_module("kornia") or n not in KORNIA_CORRUPTIONS]


def train_digits_model(epochs: int = 5, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                       cache: bool = True) -> torch.nn.Module:
    """A SmallCNN trained naturally on the embedded digits (train split) with Adam; reaches > 90 %
    test accuracy in a few seconds on a CPU. Deterministic for a given seed. Returned in eval mode.
    With cache=True the same (epochs, seed, ...) returns a fresh copy of one trained model."""
    key = (epochs, seed, batch_size, lr)
    if cache and key in _CACHE:
        model = SmallCNN()
        model.load_state_dict(_CACHE[key])
        return model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN()
    x, y = load_digits("train").tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    if cache:
        _CACHE[key] = {k: v.clone() for k, v in model.state_dict().items()}
    return model


def train_pgd_digits_model(epochs: int = 6, eps: float = 0.2, seed: int = 0, steps: int = 5) -> torch.nn.Module:
    """A SmallCNN PGD-trained on the embedded digits: train_digits_model(3 epochs), then epochs of Adam on
    L-inf PGD-steps examples at eps (Madry et al.'s step size, random start). Cached like
    train_digits_model; returned in eval mode."""
    from robustops.attacks import PGD

    key = ("pgd", epochs, eps, seed, steps)
    if key in _CACHE:
        model = SmallCNN()
        model.load_state_dict(_CACHE[key])
        return model.eval()
    model = train_digits_model(epochs=3, seed=seed)
    x, y = load_digits("train").tensors
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    atk = PGD(model, eps=eps, steps=steps, seed=seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i:i + 64]
            xa = atk(x[b], y[b])
            model.train()
            loss = F.cross_entropy(model(xa), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.eval()
    _CACHE[key] = {k: v.clone() for k, v in model.state_dict().items()}
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_in_ball(xa: torch.Tensor, x: torch.Tensor, eps, norm: str) -> None:
    """xa lies in [0, 1] and within eps (a float or Tensor[B]) of x in the norm; eps = 0 samples are
    unchanged."""
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    d = (xa - x).flatten(1)
    if norm == "linf":
        assert bool((d.abs().amax(1) <= eps + 1e-6).all())
    else:
        assert bool((d.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all())
    zero = torch.as_tensor(eps).expand(x.shape[0]) == 0
    assert torch.equal(xa[zero], x[zero])


#: standard errors of margin in assert_not_weaker
T_MARGIN = 3.0


def assert_not_weaker(ours, theirs, n_images: int, what: str) -> None:
    """Paired per-seed robust accuracies: ours may exceed theirs (be weaker) by at most
    max(3 SE of the paired differences, one image)."""
    d = [a - b for a, b in zip(ours, theirs, strict=True)]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    margin = max(T_MARGIN * se, 1.0 / n_images)
    assert mean <= margin, (
        f"{what}: robustops robust accuracy {statistics.fmean(ours):.4f} vs torchattacks "
        f"{statistics.fmean(theirs):.4f} over {len(d)} seeds: robustops weaker by {mean:+.4f} "
        f"> margin {margin:.4f} ({T_MARGIN:g} x SE {se:.4f})")


def assert_one_line_error(p, *words) -> str:
    """A finished subprocess failed with exactly one line on stderr that holds every word; returns it."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def tiny_cnn(seed: int = 0, bn: bool = False, width: int = 16) -> torch.nn.Module:
    """A small digits CNN (1x8x8 -> 10 logits): conv(width) [BatchNorm] ReLU, conv(2 width, stride 2), ReLU,
    linear(4 width), ReLU, linear(10); its weights seeded."""
    nn = torch.nn
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if bn else [])
    layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(2 * width * 4 * 4, 4 * width), nn.ReLU(), nn.Linear(4 * width, 10)]
    return nn.Sequential(*layers)


class Linear2(torch.nn.Module):
    """A linear two-class classifier: logits [0, w.x + b]."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32))
        self.b = float(b)

    def forward(self, x):
        z = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for a test module (import it into the module to apply it): the small models of
    these tests only lose time to threading, and their timings stay comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A free TCP port on localhost (for a gloo process group in a test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupt(Exception):
    """Raised by :class:`CrashingLoader`: a killed job."""


class CrashingLoader:
    """A loader that dies (like a killed job) after `after` batches in total."""

    def __init__(self, inner, after):
        self.inner, self.after, self.count = inner, after, 0
        self.sampler = inner.sampler

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for b in self.inner:
            if self.count == self.after:
                raise Interrupt()
            self.count += 1
            yield b


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_certify(args) -> int:
    """`robustops certify ARGS` in this process."""
    from robustops.cli import main

    return main(["certify"] + [str(a) for a in args])


def ok(p):
    """p (a CompletedProcess) after asserting it succeeded (its output in the message otherwise)."""
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def subprocess_env() -> dict:
    """The environment of a robustops subprocess (torchrun, a killed run): the source tree first, one thread."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_concurrently(argvs, timeout: float = 400, **popen_kwargs) -> list:
    """Each argv of argvs in its own subprocess, all at once, output captured as text; waits for all and
    returns their CompletedProcess objects in order (independent commands: their order does not matter)."""
    import subprocess

    procs = [(argv, subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, **popen_kwargs)) for argv in argvs]
    done = []
    for argv, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for _, other in procs:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@contextlib.contextmanager
def in_background(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread while the with-block runs (a subprocess beside others: torchrun
    next to a single-process run); yields a concurrent.futures.Future, waited for on leaving the block."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(fn, *args, **kwargs)


def digits_checkpoint(directory) -> tuple:
    """(path, model): a small_cnn trained 4 epochs on digits, saved as a robustops checkpoint in directory."""
    from robustops.models import save_checkpoint

    model = train_digits_model(epochs=4, seed=0)
    return save_checkpoint(os.path.join(str(directory), "digits.pt"), model, "small_cnn", {}), model


def torchrun_certify(args, nproc: int = 2):
    """`torchrun --standalone --nproc_per_node nproc -m robustops certify ARGS` (skips the test without
    torchrun); returns the CompletedProcess, output captured."""
    return torchrun_command("certify", args, nproc)


def torchrun_command(command: str, args, nproc: int = 2):
    """`torchrun --standalone --nproc_per_node nproc -m robustops COMMAND ARGS` (skips the test without
    torchrun); returns the CompletedProcess, output captured."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "robustops", command]
                          + [str(a) for a in args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def resume_matches_uninterrupted(method, train_set, val, tmp_path, hp: dict, *, crash_after, width: int = 16,
                                 weights_only: bool = True):
    """The kill-and-resume check of a training method: fit(method) uninterrupted (ref), then the same run
    killed after crash_after(len(loader)) batches (CrashingLoader) and resumed from its last.pt by a fresh
    process-like start (other global seed, other initial weights) must end with bit-identical weights.
    Returns (ref, res, crash): the two FitResults and the checkpoint the killed run left (loaded with
    weights_only)."""
    from torch.utils.data import DataLoader

    from robustops import train as rt

    torch.manual_seed(0)
    full = tiny_cnn(seed=5, bn=True, width=width)
    ref = rt.fit(full, DataLoader(train_set, batch_size=32, shuffle=True), method, val_loader=val,
                 out_dir=str(tmp_path / "full"), **hp)
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    ld = DataLoader(train_set, batch_size=32, shuffle=True)
    with pytest.raises(Interrupt):
        rt.fit(tiny_cnn(seed=5, bn=True, width=width), CrashingLoader(ld, after=crash_after(len(ld))), method,
               val_loader=val, out_dir=run, **hp)
    crash = torch.load(os.path.join(run, "last.pt"), weights_only=weights_only)
    torch.manual_seed(999)
    model = tiny_cnn(seed=77, bn=True, width=width)
    res = rt.fit(model, DataLoader(train_set, batch_size=32, shuffle=True), method, val_loader=val, out_dir=run,
                 resume=True, **hp)
    for k, v in full.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    return ref, res, crash


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """The process group of a DDP test worker (one torch thread, gloo on localhost). On success the ranks
    meet at a barrier before tearing down, so a failing rank cannot hang its peer there: a rank that leaves
    while its peer still talks to it can abort gloo's background thread ("terminate called without an
    active exception"), which the CLI's teardown avoids the same way. Torn down in any case.

    On success the worker then ends at once (os._exit(0)), skipping interpreter finalization: even after the
    barrier and destroy_process_group, gloo's worker threads can still hold work objects whose destruction
    at finalization aborts the process (pytorch/pytorch#179291), which failed CI once after every result
    was written. So nothing may follow the ``with`` block in a worker."""
    import sys

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_loader(dataset, rank: int, world: int, batch_size: int = 32):
    """This rank's share of each batch of batch_size (a DistributedSampler, no shuffling): world ranks on
    batch_size // world each see what one process sees on whole batches."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size // world, sampler=sampler)


def wait_for(path, proc, deadline=120) -> None:
    """Waits until path exists while the subprocess proc runs (AssertionError with its stderr if it ends
    first, or after deadline seconds)."""
    import time

    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared: " + (proc.stderr.read() if proc.poll() is not None else ""))
