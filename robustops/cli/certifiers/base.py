"""What every certification mode of `robustops certify` / `robustops predict` shares: the TSV formats
(Cohen et al.'s columns), the :class:`Certifier` interface the command drives, the loaded checkpoint
it checks, and the row loop of the modes that certify a batch of inputs per call."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..common import CLIError
from ..rows import ResultsFile, RowWriter

__all__ = ["Certifier", "Checkpoint", "Settings", "Inputs", "Rows", "HEADERS", "COLUMNS", "DECISION_LETTERS",
           "SEQUENTIAL_ONLY", "results_file", "decisions_field", "radius_correct", "certified_table"]

# The decisions column of --sequential: one letter per radius (sequential.CERTIFIED / NOT_CERTIFIED / ABSTAINED),
# "-" in full-radius mode.
DECISION_LETTERS = {1: "c", 0: "n", -1: "a"}


def decisions_field(field: str) -> str:
    """A --sequential TSV's decisions field ("-", or letters of DECISION_LETTERS); ValueError otherwise."""
    if field != "-" and not (field and set(field) <= set(DECISION_LETTERS.values())):
        raise ValueError(f"not a decisions field: {field!r}")
    return field


#: Each TSV kind's columns and how their fields parse: certify's and predict's are Cohen et al.'s.
COLUMNS: Dict[str, Tuple[Tuple[str, Callable[[str], Any]], ...]] = {
    "certify": (("idx", int), ("label", int), ("predict", int), ("radius", float), ("correct", int), ("time", float)),
    "predict": (("idx", int), ("label", int), ("predict", int), ("correct", int), ("time", float))}
COLUMNS["sequential"] = COLUMNS["certify"] + (("samples", int), ("decisions", decisions_field))
HEADERS = {kind: "\t".join(name for name, _ in cols) for kind, cols in COLUMNS.items()}

# The options of --sequential: refused by every other mode.
SEQUENTIAL_ONLY = ("radius", "radii", "precision", "test", "n_min", "beta", "max_active", "growth", "schedule")


def results_file(path: str, kind: str) -> ResultsFile:
    """The results file at path of a TSV kind (a key of COLUMNS)."""
    cols = COLUMNS[kind]
    return ResultsFile(path, HEADERS[kind], [parse for _, parse in cols[1:]])


@dataclass
class Checkpoint:
    """What the command loaded before a mode checks it: the classifier (in eval mode, on the CPU), the
    checkpoint's metadata (robustops.cli.common.checkpoint_meta), the data set and its info."""
    model: Any
    meta: dict
    dataset: Any
    info: dict


@dataclass
class Settings:
    """A run's resolved settings (what check made of the flags and the checkpoint): the model to
    certify and the input normalization fused into the noise (None: none)."""
    model: Any
    mean: Optional[list] = None
    std: Optional[list] = None


@dataclass
class Inputs:
    """This rank's inputs still to do: indices into dataset, read by DataLoader workers onto device."""
    dataset: Any
    indices: List[int]
    workers: int
    device: Any

    def loader(self, batch: Optional[int]):
        """The inputs in order, batch at a time (None: one by one, unbatched)."""
        from torch.utils.data import DataLoader, Subset

        return DataLoader(Subset(self.dataset, self.indices), batch_size=batch, shuffle=False,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda")


class Rows:
    """Rows in Cohen et al.'s format (idx label predict [radius] correct time [...]) to a RowWriter, and
    what went wrong on the way (issues: inputs with NaN votes, their total, non-finite inputs)."""

    def __init__(self, writer: RowWriter):
        self.writer, self.done, self.correct = writer, 0, 0
        self.issues = {"nan_inputs": 0, "nan_votes": 0, "nonfinite_inputs": 0}
        self.last = time.perf_counter()

    def row(self, idx: int, label: int, pred: int, radius: str, seconds: Optional[float], nan: int, finite: bool,
            extra: str = "") -> None:
        """The row idx label predict [radius] correct time [extra]: radius is "" or the field and its tab,
        extra "" or tabs and fields; seconds None: the wall time since the previous row."""
        now = time.perf_counter()
        seconds, self.last = now - self.last if seconds is None else seconds, now
        self.writer.write(f"{idx}\t{label}\t{pred}\t{radius}{int(pred == label)}\t{seconds:.4f}{extra}")
        self.done += 1
        self.correct += int(pred == label)
        self.issues["nan_inputs"] += int(nan > 0)
        self.issues["nan_votes"] += int(nan)
        self.issues["nonfinite_inputs"] += int(not finite)

    def tick(self, n: int) -> None:
        self.writer.tick(n, acc=f"{self.correct / max(self.done, 1):.3f}")


def radius_correct(fields: List[List[str]]):
    """The radius and correct columns of certify's TSVs (every kind with a radius)."""
    import numpy as np

    return np.array([float(f[3]) for f in fields]), np.array([int(f[4]) for f in fields], dtype=bool)


def certified_table(radius, correct, radii, fmt: str) -> Tuple[dict, str]:
    """Certified accuracy at each of radii: the summary's {"r": accuracy} and the line to print (each
    radius formatted with fmt)."""
    from ...smoothing import certified_accuracy

    acc = certified_accuracy(radius, correct, radii)
    line = "certified accuracy: " + "  ".join(f"r={r:{fmt}}: {a:.3f}" for r, a in zip(radii, acc))
    return {f"{r:g}": float(a) for r, a in zip(radii, acc)}, line


class Certifier:
    """One way of certifying (or predicting) every input of a run, chosen once from the flags (see
    robustops.cli.certifiers.choose): the flag values that choose it (``when``, over AXES), the commands
    it serves, its TSV kind, the settings a resumed run must share (``settings_keys``), and the steps of
    a run: ``check_flags`` (before any file is read), ``check`` (the loaded checkpoint -> a Settings),
    ``settings``, ``describe`` (the banner), ``run`` (a row per input) and ``summary``. A mode refuses
    the flags it cannot honour with a CLIError, and never writes to the argparse namespace."""

    when: Dict[str, Any] = {}
    commands: Tuple[str, ...] = ("certify",)
    settings_keys: Tuple[str, ...] = ()

    def __init__(self, command: str):
        self.command = command

    @classmethod
    def add_arguments(cls, p) -> None:
        """The flags only this mode reads, added to certify's parser (an argparse.ArgumentParser) in an
        argument group of their own; none by default."""

    @property
    def kind(self) -> str:
        """The TSV kind this mode writes (a key of COLUMNS)."""
        return self.command

    def results(self, path: str) -> ResultsFile:
        return results_file(path, self.kind)

    def check_flags(self, args) -> None:
        """Checks of the flags alone, made before any file is read. Here: the options of --sequential are
        refused."""
        given = [f"--{k.replace('_', '-')}" for k in SEQUENTIAL_ONLY if getattr(args, k, None) is not None]
        if given:
            raise CLIError(f"{' / '.join(given)}: only with --sequential (sequential certification)")

    def check(self, args, ckpt: Checkpoint) -> Settings:
        """The run's settings, resolved from the flags and the loaded checkpoint; CLIError for what this
        mode cannot do with them."""
        raise NotImplementedError

    def settings(self, args, s: Settings) -> dict:
        """The settings that change the rows, stored beside the TSV (a resumed run must have the same)."""
        out = {k: getattr(args, k, None) for k in self.settings_keys}
        out["checkpoint"] = os.path.abspath(args.checkpoint)
        return out

    def describe(self, args, s: Settings) -> str:
        """What the run does, for the banner."""
        raise NotImplementedError

    def step(self, args, s: Settings, info: dict, device) -> Callable:
        """step(x, indices) -> (prediction, radius or None, NaN votes per input, finite-input flags) of a
        batch of inputs on device."""
        raise NotImplementedError

    def inputs_per_call(self, args, s: Settings) -> Optional[int]:
        """Inputs handled together between host syncs and row writes."""
        return args.inputs_per_call or args.batch_size

    def run(self, args, s: Settings, step: Callable, inputs: Inputs, rows: Rows) -> None:
        """A row per input, k per call of step (from self.step); a row's time is its share of its call's.
        IBP's radii (float64) are written exactly (certified accuracy at a grid point must read back true),
        smoothing's to 6 digits."""
        import torch

        k, pos, mine = self.inputs_per_call(args, s), 0, inputs.indices
        for x, y in inputs.loader(k):
            ids = mine[pos:pos + x.shape[0]]
            pos += x.shape[0]
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # non-finite inputs: reported once, at the end
                    warnings.simplefilter("ignore", UserWarning)
                    prediction, radii, nan, finite = step(x.to(inputs.device, non_blocking=True), ids)
                    prediction = prediction.cpu()
                    radii = None if radii is None else radii.cpu()
            except ValueError as e:
                raise CLIError(str(e)) from None
            per_input = (time.perf_counter() - t0) / len(ids)
            nan, finite = nan.tolist(), finite.tolist()
            for j, idx in enumerate(ids):
                radius = "" if radii is None else (f"{float(radii[j])!r}\t" if radii.dtype == torch.float64
                                                   else f"{float(radii[j]):.6g}\t")
                rows.row(idx, int(y[j]), int(prediction[j]), radius, per_input, nan[j], finite[j])
            rows.tick(len(ids))

    def summary(self, args, s: Settings, fields: List[List[str]], info: dict, threads: int) -> dict:
        """The run's summary from its merged rows (split into fields), its table printed (and plot)."""
        raise NotImplementedError

