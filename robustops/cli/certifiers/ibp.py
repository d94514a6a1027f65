"""`certify --method ibp|crown|crown-ibp|best`: the deterministic L-inf radius of the classifier itself, proven
by interval bound propagation, CROWN, CROWN-IBP or the best of IBP and CROWN (robustops.bounds.certified_radius
with ``bound=``; robustops.crown), in certify's TSV."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import List

from ..common import CLIError, check_model_accepts, fraction
from .base import Certifier, Checkpoint, Settings, certified_table, radius_correct

__all__ = ["IbpCertifier", "IbpSettings", "CrownCertifier", "CrownIbpCertifier", "BestCertifier", "BOUND_METHODS"]

#: The --method values certified by a bound (L-inf, deterministic), and their names in summaries and plots.
BOUND_METHODS = {"ibp": "IBP", "crown": "CROWN", "crown-ibp": "CROWN-IBP", "best": "best of IBP and CROWN"}


@dataclass
class IbpSettings(Settings):
    """Settings plus the largest radius searched and the radius resolution (the model has its
    normalization in front: IBP propagates through it)."""
    eps_max: float = 0.0
    tol: float = 0.0


class IbpCertifier(Certifier):
    """--method ibp: per input, the largest L-inf radius (to tol, up to eps-max) at which IBP proves the
    prediction; an input with NaN / Inf values abstains (prediction -1, radius 0). The subclasses below
    are the same mode with another bound (their method name, ``when["method"]``)."""

    when = {"method": "ibp"}

    @property
    def bound(self) -> str:
        """The bound's name: certified_radius's ``bound`` and the TSV's / summary's method."""
        return self.when["method"]
    settings_keys = ("method", "checkpoint", "model", "data", "split", "normalize", "eps_max", "tol")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """certify's flags of this mode, in their own argument group."""
        g = p.add_argument_group("--method ibp|crown|crown-ibp|best (deterministic, L-inf)")
        g.add_argument("--eps-max", type=fraction("eps-max"), default=None,
                       help="largest radius searched (None: the eps the checkpoint was trained with)")
        g.add_argument("--tol", type=fraction("tol"), default=1e-3,
                       help="radius resolution: a grid step 2^floor(log2(tol)) <= tol")

    def check(self, args, ckpt: Checkpoint) -> IbpSettings:
        """eps-max (else the checkpoint's training eps), tol, and a check that IBP supports every layer."""
        import torch

        from ... import bounds, crown
        from ... import models as romodels

        if getattr(args, "threat", "norm") != "norm" or getattr(args, "perturbation_model", None) is not None:
            raise CLIError(f"--method {self.bound} certifies L-inf boxes of the image: --threat learned / --perturbation-model "
                           "are for randomized smoothing")
        given = (("--sigma", args.sigma is not None), ("--graph", args.graph), ("--amp", args.amp != "none"))
        for flag, refused in given:
            if refused:
                raise CLIError(f"{flag} is a randomized-smoothing setting; --method {self.bound} certifies the model itself (in "
                               f"float32)")
        eps_max = args.eps_max
        if eps_max is None:
            eps = ckpt.meta.get("eps")
            if not isinstance(eps, (int, float)) or ckpt.meta.get("norm", "linf") != "linf" or not eps > 0:
                raise CLIError("--eps-max is required (the checkpoint does not say which L-inf eps it was trained "
                               "with)")
            eps_max = float(eps)
        if not 0.0 < eps_max < math.inf:
            raise CLIError(f"--eps-max must be a finite number > 0, got {eps_max}")
        if not 0.0 < args.tol <= eps_max:
            raise CLIError(f"--tol must be > 0 and <= --eps-max ({eps_max:g}), got {args.tol}")
        mean = std = None
        if args.normalize == "auto" and ckpt.meta.get("mean") is not None and ckpt.meta.get("std") is not None:
            mean, std = list(ckpt.meta["mean"]), list(ckpt.meta["std"])
        elif args.normalize == "data":
            mean, std = ckpt.info.get("mean"), ckpt.info.get("std")
        model = ckpt.model
        if mean is not None:
            model = torch.nn.Sequential(romodels.Normalize(mean, std), model).eval()
        check_model_accepts(model, ckpt.info, torch.device("cpu"))
        try:
            bounds.interval_bounds(model, ckpt.dataset[0][0].unsqueeze(0).float(), 0.0)
            if self.bound != "ibp":
                crown.layer_tree(model.eval())
        except bounds.UnsupportedLayerError as e:
            raise CLIError(f"--method {self.bound}: {e}") from None
        return IbpSettings(model, eps_max=eps_max, tol=args.tol)

    def settings(self, args, s: IbpSettings) -> dict:
        out = super().settings(args, s)
        out["eps_max"] = float(s.eps_max)
        return out

    def describe(self, args, s: IbpSettings) -> str:
        return f"{BOUND_METHODS[self.bound]}, eps-max {s.eps_max:g}, tol {s.tol:g}, {self.inputs_per_call(args, s)} inputs per pass"

    def step(self, args, s: IbpSettings, info: dict, device):
        import torch

        from ... import bounds, crown  # noqa: F401  (crown registers its bounds with certified_radius)

        def step(x, ids):
            finite = torch.isfinite(x.flatten(1)).all(1)
            res = bounds.certified_radius(s.model, torch.nan_to_num(x.float()), eps_max=s.eps_max, tol=s.tol,
                                          bound=self.bound)
            pred = torch.where(finite, res.prediction, torch.full_like(res.prediction, -1))
            radius = torch.where(finite, res.radius, torch.zeros_like(res.radius))
            return pred, radius, torch.zeros_like(pred), finite.cpu()

        return step

    def summary(self, args, s: IbpSettings, fields: List[List[str]], info: dict, threads: int) -> dict:
        """ACR (L-inf), clean accuracy and certified accuracy at eps-max and its halves (and the plot)."""
        from ...smoothing import acr, plot_certified_accuracy

        radius, correct = radius_correct(fields)
        radii = sorted({0.0, s.eps_max / 8, s.eps_max / 4, s.eps_max / 2, s.eps_max})
        table, line = certified_table(radius, correct, radii, ".4g")
        summary = {"command": f"certify --method {self.bound}", "inputs": len(fields), "eps_max": s.eps_max, "tol": s.tol,
                   "norm": "linf", "tsv": os.path.abspath(args.out), "threads": threads,
                   "acr": acr(radius, correct), "clean_accuracy": float(correct.mean()) if fields else 0.0,
                   "certified_accuracy": table}
        print(f"ACR (L-inf) {summary['acr']:.4f}  clean accuracy {summary['clean_accuracy']:.4f}")
        print(line)
        if args.plot:
            plot_certified_accuracy(args.plot, {BOUND_METHODS[self.bound]: (radius, correct)}, max_radius=s.eps_max * 1.02,
                                    title=f"{info['name']}: {BOUND_METHODS[self.bound]}", norm="L-inf")
            summary["plot"] = os.path.abspath(args.plot)
            print(f"plot -> {args.plot} (and .pdf)")
        return summary


class CrownCertifier(IbpCertifier):
    """--method crown: the radius proven by full CROWN (robustops.crown), same flags and TSV as --method ibp."""

    when = {"method": "crown"}

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """None of its own: --eps-max and --tol are --method ibp's."""


class CrownIbpCertifier(CrownCertifier):
    """--method crown-ibp: IBP intermediate bounds, CROWN's backward pass for the margins."""

    when = {"method": "crown-ibp"}


class BestCertifier(CrownCertifier):
    """--method best: the elementwise maximum of IBP's and CROWN's margin bounds (sound: both are)."""

    when = {"method": "best"}
