"""Randomized smoothing with a fixed number of samples (Cohen et al.'s CERTIFY and PREDICT): of the image
(L2 radii), and of the latent offsets of a learned perturbation set (--threat learned: latent L2 radii,
robustops.smoothing.LatentSmooth)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, List

from ..common import CLIError, check_model_accepts
from .base import Certifier, Checkpoint, Settings, certified_table, radius_correct

#: Fixed-n CERTIFY's selection samples per input when --n0 is not given (Cohen et al. 2019's n0)
FIXED_N0 = 100

__all__ = ["SmoothingCertifier", "LatentCertifier", "SmoothingSettings", "LatentSettings"]


@dataclass
class SmoothingSettings(Settings):
    """Settings plus the noise level."""
    sigma: float = 0.0


@dataclass
class LatentSettings(SmoothingSettings):
    """SmoothingSettings plus the perturbation model (on the CPU); sigma is the latent noise level, from
    sigma_source: "flag" (--sigma), "checkpoint" (a learned_noise checkpoint's latent_sigma) or "sized"
    (from the set's eps, smoothing.sigma_for_radius)."""
    perturbation: Any = None
    sigma_source: str = "flag"


def dissent_of(args) -> float:
    """--sigma-dissent, else smoothing.COVER_DISSENT."""
    from ...smoothing import COVER_DISSENT

    d = getattr(args, "sigma_dissent", None)
    return COVER_DISSENT if d is None else float(d)


class SmoothingCertifier(Certifier):
    """Randomized smoothing of the image with n estimation samples per input: CERTIFY (L2 radii) or
    PREDICT, whichever command runs it."""

    commands = ("certify", "predict")
    settings_keys = ("checkpoint", "model", "data", "split", "normalize", "sigma", "n0", "n", "alpha", "seed", "amp")
    norm = "L2"  # of the radii
    sigma_missing = "--sigma is required (the checkpoint does not say which noise level it was trained with)"

    def check_threat(self, args) -> None:
        """Before the noise level is resolved: this mode smooths over pixel noise."""
        if getattr(args, "perturbation_model", None) is not None:
            raise CLIError("--perturbation-model is for --threat learned")
        if getattr(args, "sigma_dissent", None) is not None:
            raise CLIError("--sigma-dissent is for --threat learned (sizing the latent sigma from the set's eps)")

    def check(self, args, ckpt: Checkpoint) -> SmoothingSettings:
        """The noise level (--sigma, else default_sigma), the normalization fused into the noise (auto:
        the checkpoint's mean/std, else the model's leading Normalize layer split off)."""
        import torch

        from ... import models as romodels

        extra = self.check_threat(args)
        sigma = args.sigma if args.sigma is not None else self.default_sigma(args, ckpt, extra)
        if sigma is None:
            raise CLIError(self.sigma_missing)
        if not 0.0 < sigma < math.inf:
            raise CLIError(f"--sigma must be a finite number > 0, got {sigma}")
        model, mean, std = ckpt.model, None, None
        if args.normalize == "auto":
            if ckpt.meta.get("mean") is not None and ckpt.meta.get("std") is not None:
                mean, std = list(ckpt.meta["mean"]), list(ckpt.meta["std"])
            else:
                model, mean, std = romodels.split_normalize(model)
        elif args.normalize == "data":
            mean, std = ckpt.info.get("mean"), ckpt.info.get("std")
        check_model_accepts(model, ckpt.info, torch.device("cpu"))
        return self.resolve(args, ckpt, SmoothingSettings(model, mean, std, float(sigma)), extra)

    def default_sigma(self, args, ckpt: Checkpoint, extra):
        """The noise level without --sigma: the one the checkpoint was trained with (None: unknown)."""
        return ckpt.meta.get("sigma")

    def resolve(self, args, ckpt: Checkpoint, s: SmoothingSettings, extra) -> SmoothingSettings:
        """The last step of check: s, completed with what check_threat returned (extra)."""
        return s

    def n0(self, args) -> int:
        """The selection samples per input: --n0, else fixed-n CERTIFY's FIXED_N0 (Cohen et al.'s 100)."""
        return FIXED_N0 if getattr(args, "n0", None) is None else args.n0

    def settings(self, args, s: SmoothingSettings) -> dict:
        out = super().settings(args, s)
        out["sigma"] = float(s.sigma)
        if self.command == "certify":
            out["n0"] = self.n0(args)  # resolved: a run of the default records the number it used
        return out

    def describe(self, args, s: SmoothingSettings) -> str:
        n0 = f"n0 {self.n0(args)}, " if self.command == "certify" else ""
        return f"sigma {s.sigma:g}, {n0}n {args.n}, alpha {args.alpha:g}, batch {args.batch_size}"

    def smoother(self, args, s: SmoothingSettings, info: dict, device):
        """The smoothed classifier (robustops.smoothing.Smooth)."""
        from ...smoothing import Smooth

        return Smooth(s.model, int(info["num_classes"]), s.sigma, mean=s.mean, std=s.std,
                      autocast=None if args.amp == "none" else args.amp, channels_last=args.channels_last,
                      input_shape=tuple(info["input_shape"]), device=device, graph=args.graph)

    def step(self, args, s: SmoothingSettings, info: dict, device):
        smooth = self.smoother(args, s, info, device)

        def step(x, ids):
            if self.command == "certify":
                res = smooth.certify(x, self.n0(args), args.n, args.alpha, args.batch_size, seed=args.seed, indices=ids)
                return res.prediction, res.radius, res.nan_votes + res.selection_nan_votes, res.finite_input
            res = smooth.predict(x, args.n, args.alpha, args.batch_size, seed=args.seed, indices=ids,
                                 return_details=True)
            return res.prediction, None, res.nan_votes, res.finite_input

        return step

    def inputs_per_call(self, args, s: Settings) -> int:
        """--inputs-per-call, else enough inputs for about 4 forward passes."""
        per_input = (self.n0(args) if self.command == "certify" else 0) + args.n
        return args.inputs_per_call or max(1, min(256, math.ceil(4 * args.batch_size / per_input)))

    def base_summary(self, args, s: SmoothingSettings, fields: List[List[str]], threads: int) -> dict:
        """The summary's entries of every smoothing run."""
        return {"command": self.command, "inputs": len(fields), "sigma": s.sigma, "n": args.n, "alpha": args.alpha,
                "tsv": os.path.abspath(args.out), "threads": threads}

    def summary(self, args, s: SmoothingSettings, fields: List[List[str]], info: dict, threads: int) -> dict:
        import numpy as np

        summary = self.base_summary(args, s, fields, threads)
        if self.command == "predict":
            correct = np.array([int(f[3]) for f in fields], dtype=bool)
            abstain = np.array([int(f[2]) == -1 for f in fields], dtype=bool)
            summary.update(accuracy=float(correct.mean()) if fields else 0.0,
                           abstain_rate=float(abstain.mean()) if fields else 0.0)
            print(f"accuracy {summary['accuracy']:.4f}  abstained {summary['abstain_rate']:.4f}")
            return summary
        self.curve_summary(args, s, fields, info, summary)
        return summary

    def curve_summary(self, args, s: SmoothingSettings, fields: List[List[str]], info: dict, summary: dict) -> None:
        """Certified radii: ACR, certified accuracy at the standard radii, the largest radius n samples can
        certify (and the plot), added to summary."""
        from ...smoothing import STANDARD_RADII, acr, largest_certifiable_radius

        radius, correct = radius_correct(fields)
        largest = largest_certifiable_radius(s.sigma, args.n, args.alpha)
        radii = [r for r in STANDARD_RADII if r <= largest]  # past it, nothing is certified: not listed
        table, line = certified_table(radius, correct, radii, "g")
        if len(radii) < len(STANDARD_RADII):
            line += f"  (no radius past {largest:.3g} can be certified with {self.samples(args)}, alpha={args.alpha:g})"
        summary.update(n0=self.n0(args), acr=acr(radius, correct), largest_certifiable_radius=largest,
                       certified_accuracy=table)
        summary.update(self.curve_extras(args, s, radius, correct))
        print(f"ACR {summary['acr']:.4f}")
        print(line)
        self.plot(args, s, info, radius, correct, summary)

    def curve_extras(self, args, s: SmoothingSettings, radius, correct) -> dict:
        """What the summary of certified radii says besides (none for pixel-space radii)."""
        return {}

    def samples(self, args) -> str:
        """The plot title's account of the samples."""
        return f"n={args.n}"

    def plot(self, args, s: SmoothingSettings, info: dict, radius, correct, summary: dict) -> None:
        """--plot: certified accuracy against radius, with the largest radius n samples can certify marked."""
        from ...smoothing import largest_certifiable_radius, plot_certified_accuracy

        if not args.plot:
            return
        label = f"sigma = {s.sigma:g}"
        plot_certified_accuracy(args.plot, {label: (radius, correct)},
                                certifiable={label: largest_certifiable_radius(s.sigma, args.n, args.alpha)},
                                title=f"{info['name']}: {self.samples(args)}, alpha={args.alpha:g}", norm=self.norm)
        summary["plot"] = os.path.abspath(args.plot)
        print(f"plot -> {args.plot} (and .pdf)")


class LatentCertifier(SmoothingCertifier):
    """--threat learned: smoothing over the latent offsets u of a learned perturbation set, h(u) =
    f(member(x, u)), certified at u = 0 (robustops.smoothing.LatentSmooth; latent L2 radii)."""

    when = {"threat": "learned"}
    settings_keys = SmoothingCertifier.settings_keys + ("threat", "perturbation_model")
    norm = "latent L2"

    def check_threat(self, args):
        """The perturbation model's checkpoint loads (once here, before any output), and the options latent
        smoothing takes. Returns the perturbation model, on the CPU."""
        from ...perturbation import load_perturbation_model

        if args.perturbation_model is None:
            raise CLIError("--threat learned needs --perturbation-model CKPT (the learned perturbation set's "
                           "checkpoint)")
        for flag, given in (("--graph", args.graph), ("--channels-last", args.channels_last)):
            if given:
                raise CLIError(f"{flag} is not supported with --threat learned (the noise is on latent codes)")
        try:
            return load_perturbation_model(args.perturbation_model, "cpu")
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--perturbation-model: {e}") from None

    def resolve(self, args, ckpt: Checkpoint, s: SmoothingSettings, extra) -> LatentSettings:
        """The perturbation model takes the data's images and decodes images of their shape."""
        import torch

        from ...perturbation import member, prior_scale

        x = ckpt.dataset[0][0].unsqueeze(0).float()
        try:
            with torch.no_grad():
                mu, scale = prior_scale(extra, x)
                member(extra, x, torch.zeros_like(mu), mu, scale)
        except (ValueError, RuntimeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CLIError(f"--perturbation-model does not fit the data's images {list(ckpt.info['input_shape'])}: "
                           f"{first}") from None
        source = self.sigma_source(args, ckpt)
        if source != "sized" and getattr(extra, "eps", None):
            self.warn_short(args, float(s.sigma), float(extra.eps))
        return LatentSettings(s.model, s.mean, s.std, s.sigma, perturbation=extra, sigma_source=source)

    @staticmethod
    def sigma_source(args, ckpt: Checkpoint) -> str:
        """Where the latent sigma comes from: "flag", "checkpoint" or "sized" (see LatentSettings)."""
        if args.sigma is not None:
            return "flag"
        return "checkpoint" if ckpt.meta.get("latent_sigma") is not None else "sized"

    def default_sigma(self, args, ckpt: Checkpoint, extra) -> float:
        """Without --sigma: the latent noise level a learned_noise checkpoint records (``latent_sigma``; the
        pixel ``sigma`` is another noise), else the smallest latent noise level at which n samples at alpha
        can certify the whole set, radius eps, with --sigma-dissent of the votes elsewhere
        (smoothing.sigma_for_radius)."""
        from ...smoothing import sigma_for_radius

        if self.sigma_source(args, ckpt) == "checkpoint":
            return float(ckpt.meta["latent_sigma"])
        eps = getattr(extra, "eps", None)
        dissent = dissent_of(args)
        if eps is None:
            raise CLIError("--threat learned needs --sigma (the latent noise level), or a --perturbation-model that "
                           "stores its radius eps to size sigma from (the classifier's checkpoint records pixel noise "
                           "only)")
        try:
            return sigma_for_radius(float(eps), args.n, args.alpha, dissent)
        except ValueError as e:
            raise CLIError(f"--n / --sigma-dissent: {e}") from None

    def warn_short(self, args, sigma: float, eps: float) -> None:
        """--sigma too small for n samples to reach the set's radius: say so, and the n that would."""
        from ...smoothing import largest_certifiable_radius, samples_for_radius

        largest = largest_certifiable_radius(sigma, args.n, args.alpha)
        if largest >= eps:
            return
        try:
            need = f"n >= {samples_for_radius(eps, sigma, args.alpha, 0.0):,} samples (all votes for one class)"
        except ValueError:
            need = "no practical n"
        print(f"note: at --sigma {sigma:g}, n={args.n} samples certify latent radii up to {largest:.3g} only, below "
              f"the set's eps {eps:.3g}: no input can be certified for the whole set; that needs {need}, or leave "
              f"--sigma out to size it from eps")

    def settings(self, args, s: LatentSettings) -> dict:
        out = super().settings(args, s)
        out["perturbation_model"] = os.path.abspath(args.perturbation_model)
        return out

    def describe(self, args, s: LatentSettings) -> str:
        sized = {"flag": "", "checkpoint": " (sigma: the checkpoint's latent_sigma)"}.get(
            s.sigma_source, f" (sigma sized from eps {float(s.perturbation.eps):.3g}, dissent {dissent_of(args):g})")
        return f"latent smoothing in {args.perturbation_model}{sized}, " + super().describe(args, s)

    def smoother(self, args, s: LatentSettings, info: dict, device):
        from ...smoothing import LatentSmooth

        return LatentSmooth(s.model, s.perturbation.to(device), int(info["num_classes"]), s.sigma, mean=s.mean,
                            std=s.std, autocast=None if args.amp == "none" else args.amp, device=device)

    def curve_extras(self, args, s: LatentSettings, radius, correct) -> dict:
        """Radii and sigma are in the latent space of the perturbation model; certified accuracy at r = eps
        (the whole set) when the model stores eps, and whether sigma was sized from it."""
        from ...smoothing import certified_accuracy, largest_certifiable_radius

        eps = getattr(s.perturbation, "eps", None)
        out = dict(threat="learned", radius="latent L2", perturbation_model=os.path.abspath(args.perturbation_model),
                   perturbation_eps=eps, sigma_sized=s.sigma_source == "sized",
                   sigma_source=s.sigma_source)
        if eps is not None:
            out["certified_accuracy_at_eps"] = certified_accuracy(radius, correct, float(eps))
            reach = largest_certifiable_radius(s.sigma, args.n, args.alpha) >= float(eps) * (1 - 1e-12)
            print(f"certified accuracy at r = eps = {float(eps):.3g} (the whole set): "
                  f"{out['certified_accuracy_at_eps']:.3f}" + ("" if reach else " (eps is beyond what n samples "
                                                                              "can certify at this sigma)"))
        return out
