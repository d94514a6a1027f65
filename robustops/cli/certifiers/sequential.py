"""`certify --sequential`: randomized smoothing of the image with as few samples as each input needs
(Smooth.certify_stream: a confidence sequence decides at the looks of --schedule, up to --n), in the
8-column TSV (certify's and samples, decisions)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..common import CLIError, fraction, require_min
from .base import DECISION_LETTERS, HEADERS, Checkpoint, Inputs, Rows, radius_correct
from .smoothing import SmoothingCertifier, SmoothingSettings

__all__ = ["SequentialCertifier", "SequentialSettings", "SequentialOptions", "sequential_options", "parse_radii"]


@dataclass
class SequentialOptions:
    """The options of --sequential with their defaults (those of the Smooth methods) filled in: the radii
    to decide (radii: the parsed --radii; grid: [--radius] or radii, None in full-radius mode)."""
    radii: Optional[List[float]]
    grid: Optional[List[float]]
    precision: Optional[float]
    test: str
    n_min: int
    beta: float
    growth: float
    schedule: str


@dataclass
class SequentialSettings(SmoothingSettings):
    """SmoothingSettings plus the resolved options of --sequential."""
    options: Optional[SequentialOptions] = None


def parse_radii(text: str) -> List[float]:
    """--radii "0.25,0.5,3/4": a non-empty list of finite floats >= 0."""
    try:
        radii = [fraction("radii")(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        radii = []
    if not radii or not all(0.0 <= r < math.inf for r in radii):
        raise CLIError(f"--radii must be a comma-separated list of radii >= 0 like 0.25,0.5,0.75, got {text!r}")
    return radii


def sequential_options(args) -> SequentialOptions:
    """The options of --sequential, checked and resolved (the flags are left as parsed)."""
    if args.radius is not None and args.radii is not None:
        raise CLIError("--radius and --radii exclude each other: --radius R decides one radius, --radii R1,R2,... "
                       "a grid")
    if args.radius is not None and not 0.0 <= args.radius < math.inf:
        raise CLIError(f"--radius must be a finite number >= 0, got {args.radius}")
    radii = parse_radii(args.radii) if args.radii is not None else None
    from ...smoothing.sequential import (DEFAULT_GROWTH, DEFAULT_N_MIN, DEFAULT_PRECISION, DEFAULT_SCHEDULE,  # (--help
                                         DEFAULT_TEST)  # stays torch-free)

    grid = [args.radius] if args.radius is not None else radii
    if grid is not None and args.precision is not None:
        raise CLIError("--precision is for full-radius mode; --radius / --radii decide given radii")
    if args.radius is not None and getattr(args, "plot", None):
        raise CLIError("--plot draws certified accuracy against radius: use --radii (a grid) or full-radius mode, "
                       "not one --radius")
    precision = DEFAULT_PRECISION if grid is None and args.precision is None else args.precision
    if grid is None and not 0.0 < precision < math.inf:
        raise CLIError(f"--precision must be a finite number > 0, got {precision}")
    test = args.test or DEFAULT_TEST  # the defaults of Smooth.certify_radius / certify_radii / ...
    n_min = DEFAULT_N_MIN if args.n_min is None else args.n_min
    require_min(n_min=(n_min, 1), max_active=(args.max_active, 1))
    if n_min > args.n:
        raise CLIError(f"--n-min ({n_min}) must be <= --n ({args.n}, the most estimation samples per input)")
    beta = args.alpha if args.beta is None else args.beta
    if not 0.0 < beta < 1.0:
        raise CLIError(f"--beta must be in (0, 1), got {beta}")
    growth = DEFAULT_GROWTH if args.growth is None else args.growth
    if not 1.0 < growth < math.inf:
        raise CLIError(f"--growth must be a finite number > 1 (the factor between looks), got {growth}")
    return SequentialOptions(radii, grid, precision, test, n_min, beta, growth, args.schedule or DEFAULT_SCHEDULE)


class SequentialCertifier(SmoothingCertifier):
    """--sequential: each input draws estimation samples up to the looks of --schedule (up to --n) and
    stops as soon as a confidence sequence decides (fixed-radius, grid or full-radius mode)."""

    when = {"sequential": True}
    commands = ("certify",)
    settings_keys = SmoothingCertifier.settings_keys + ("sequential", "radius", "radii", "precision", "test",
                                                        "n_min", "beta", "growth", "schedule")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """certify's flags of this mode, in their own argument group."""
        g = p.add_argument_group("--sequential (randomized smoothing with as few samples as each input needs)")
        g.add_argument("--sequential", action="store_true",
                       help="sequential certification (Smooth.certify_radius / certify_radii / certify_sequential): each "
                            "input draws estimation samples up to the looks of --schedule and stops as soon "
                            "as a confidence sequence decides; --n is then the most estimation samples per input. TSV "
                            "columns " + HEADERS["sequential"].replace("\t", " "))
        g.add_argument("--radius", type=fraction("radius"), default=None,
                       help="fixed-radius mode: is each input certified at this L2 radius?")
        g.add_argument("--radii", default=None, metavar="R1,R2,...",
                       help="grid mode: decide each of these L2 radii (comma-separated, >= 0); the radius column holds "
                            "the largest certified one, the decisions column one letter per radius (c certified, n not "
                            "certified, a abstained)")
        g.add_argument("--precision", type=fraction("precision"), default=None,
                       help="full-radius mode (neither --radius nor --radii): the largest certified radius, to this "
                            "precision (None: 0.05)")
        g.add_argument("--test", default=None, choices=("betting", "cp"),
                       help="the confidence sequence: cp (Clopper-Pearson at each look, alpha split over the looks; "
                            "None: cp, as in the Smooth methods) or betting (anytime-valid, by betting)")
        g.add_argument("--n-min", type=int, default=None,
                       help="estimation samples at the first look (None: 50) of the geometric schedule")
        g.add_argument("--growth", type=float, default=None,
                       help="factor between successive looks, > 1 (None: 1.5)")
        g.add_argument("--schedule", default=None, choices=("threshold", "geometric"),
                       help="the looks: threshold (None: per input, the first look where the bound can clear the "
                            "radius's threshold at the rate of its selection samples, then --growth apart) or "
                            "geometric (--n-min, --growth x --n-min, ..., --n)")
        g.add_argument("--beta", type=fraction("beta"), default=None,
                       help="error of a 'not certified' stop (None: --alpha); it never makes a certificate wrong")
        g.add_argument("--max-active", type=int, default=None,
                       help="inputs in flight at once (None: enough to fill the forward passes)")

    @property
    def kind(self) -> str:
        return "sequential"

    def check_flags(self, args) -> None:
        method = getattr(args, "method", "smoothing")
        for flag, other in ((f"--method {method}", method != "smoothing"),
                            ("--threat learned", getattr(args, "threat", "norm") == "learned"),
                            ("--graph", args.graph), ("--inputs-per-call", args.inputs_per_call is not None)):
            if other:
                raise CLIError(f"--sequential is not supported with {flag} (it refills the eager forward passes of "
                               f"randomized smoothing of the image, input by input)")
        sequential_options(args)

    def resolve(self, args, ckpt: Checkpoint, s: SmoothingSettings, extra) -> SequentialSettings:
        return SequentialSettings(s.model, s.mean, s.std, s.sigma, options=sequential_options(args))

    def n0(self, args) -> int:
        """The selection samples per input: --n0, else the sequential modes' DEFAULT_N0 (50, as in the Smooth
        methods: fixed-n CERTIFY keeps 100)."""
        from ...smoothing.sequential import DEFAULT_N0

        return DEFAULT_N0 if args.n0 is None else args.n0

    def settings(self, args, s: SequentialSettings) -> dict:
        out = super().settings(args, s)
        o = s.options
        out.update(radii=o.radii, precision=o.precision, test=o.test, n_min=o.n_min, beta=o.beta, growth=o.growth,
                   schedule=o.schedule)
        return out

    def describe(self, args, s: SequentialSettings) -> str:
        o = s.options
        decide = f"precision {o.precision:g}" if o.grid is None else \
            ("radius " if args.radius is not None else "radii ") + ",".join(f"{r:g}" for r in o.grid)
        return (f"sigma {s.sigma:g}, sequential ({decide}, test {o.test}, {o.schedule} looks x{o.growth:g}), n0 "
                f"{self.n0(args)}, n {o.n_min}..{args.n}, "
                f"alpha {args.alpha:g}, beta {o.beta:g}, batch {args.batch_size}")

    def inputs_per_call(self, args, s: SequentialSettings) -> None:
        return None  # inputs enter one by one, as the stream takes them

    def step(self, args, s: SequentialSettings, info: dict, device):
        """The stream of SequentialRecords of an iterable of (idx, x) pairs (Smooth.certify_stream)."""
        smooth, o = self.smoother(args, s, info, device), s.options
        return lambda pairs: smooth.certify_stream(
            pairs, args.alpha, args.batch_size, radii=o.grid, precision=None if o.grid else o.precision,
            test=o.test, n0=self.n0(args), n_max=args.n, n_min=o.n_min, beta=o.beta, seed=args.seed,
            max_active=args.max_active, growth=o.growth, schedule=o.schedule)

    def run(self, args, s: SequentialSettings, step, inputs: Inputs, rows: Rows) -> None:
        """The inputs, read lazily as step (the stream, from self.step) takes them, a row per
        SequentialRecord as it comes (completion order), its time the wall time since the previous row.
        Grid radii are written exactly (certified accuracy at a grid radius must read back true),
        full-radius mode's to 6 digits."""
        labels: Dict[int, int] = {}

        def pairs():
            for idx, (x, y) in zip(inputs.indices, inputs.loader(None)):
                labels[idx] = int(y)
                yield idx, x

        grid = s.options.grid is not None
        try:
            for rec in step(pairs()):
                radius = repr(float(rec.radius)) if grid else f"{rec.radius:.6g}"
                decisions = "".join(DECISION_LETTERS[int(c)] for c in rec.decisions) if grid else "-"
                rows.row(rec.index, labels.pop(rec.index), rec.prediction, radius + "\t", None, rec.nan_votes,
                         rec.finite, f"\t{rec.samples}\t{decisions}")
                rows.tick(1)
        except ValueError as e:
            raise CLIError(str(e)) from None

    def samples(self, args) -> str:
        return f"sequential, n <= {args.n}"

    def summary(self, args, s: SequentialSettings, fields: List[List[str]], info: dict, threads: int) -> dict:
        """The samples spent against fixed-n CERTIFY's n0 + n; per radius of the grid, certified accuracy and
        the counts of each decision (full-radius mode: as fixed-n certify)."""
        o, summary = s.options, self.base_summary(args, s, fields, threads)
        mean = sum(int(f[6]) for f in fields) / len(fields) if fields else 0.0
        fixed = self.n0(args) + args.n  # fixed-n CERTIFY with the selection samples this run used
        what = "full-radius" if o.grid is None else "fixed-radius" if args.radius is not None else "grid"
        summary.update(sequential=True, mode=what, test=o.test, n0=self.n0(args), n_max=args.n, n_min=o.n_min,
                       beta=o.beta, growth=o.growth, schedule=o.schedule, mean_samples=mean, fixed_samples=fixed, sample_ratio=fixed / mean if mean else None)
        print(f"sequential {what} ({o.test}): {mean:.1f} samples per input on average, against n0 + n = {fixed}"
              + (f" ({fixed / mean:.2f}x)" if mean else ""))
        if o.grid is None:
            summary["precision"] = o.precision
            self.curve_summary(args, s, fields, info, summary)
            return summary
        radius, correct = radius_correct(fields)
        summary["radii"] = []
        for j, r in enumerate(o.grid):
            letters = [f[7][j] for f in fields]
            cert = float(sum(c == "c" and ok for c, ok in zip(letters, correct)) / len(fields)) if fields else 0.0
            counts = {name: letters.count(c) for c, name in (("c", "certified"), ("n", "not_certified"),
                                                             ("a", "abstained"))}
            summary["radii"].append({"radius": r, "certified_accuracy": cert, **counts})
            print(f"r={r:g}: certified accuracy {cert:.3f}  (" + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                           for k, v in counts.items()) + ")")
        self.plot(args, s, info, radius, correct, summary)
        return summary
