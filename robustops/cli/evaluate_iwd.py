"""`robustops evaluate --threat iwd`: robust accuracy under the internal-Wasserstein (IWD) attack
(:class:`robustops.attacks.IWDAttack`, Wang et al. 2021) instead of an L_p suite, through evaluate's row
loop (cli/attack_rows.py: the same resumable per-input TSV, with the IWD of each adversarial example in
its ``distance`` column)."""
from __future__ import annotations

import argparse

from .common import CLIError

#: The IWD budget when --eps is not given: the ``iwd`` training method's default (a digits setting).
DEFAULT_EPS = 0.2
THREATS = ("lp", "iwd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--threat and the IWD attack's flags."""
    from ..attacks.wasserstein import METHODS

    p.add_argument("--threat", default="lp", choices=THREATS,
                   help="lp: the --suite's attacks in the --norm ball (default); iwd: the internal-Wasserstein attack "
                        "within --eps of the image's patch distribution (IWD_2, per-value scale)")
    p.add_argument("--iwd-patch", type=int, default=3, help="--threat iwd: patch size in pixels")
    p.add_argument("--iwd-stride", type=int, default=1, help="--threat iwd: patch stride in pixels")
    p.add_argument("--iwd-method", default="auto", choices=METHODS,
                   help="--threat iwd: the optimal-transport solver (auto: exact for small patch sets, then Sinkhorn, "
                        "then sliced)")


def check(args) -> None:
    """Refuses the flags --threat iwd does not take, and IWD flags without it."""
    if args.threat != "iwd":
        for flag, bad in [("--iwd-patch", args.iwd_patch != 3), ("--iwd-stride", args.iwd_stride != 1),
                          ("--iwd-method", args.iwd_method != "auto")]:
            if bad:
                raise CLIError(f"{flag} sets the IWD attack: add --threat iwd, or drop {flag}")
        return
    for flag, bad in [("--suite", args.suite not in ("autoattack", "pgd")), ("--version", args.version != "standard"),
                      ("--norm", args.norm is not None), ("--transfer-from", args.transfer_from is not None),
                      ("--restarts", args.restarts is not None)]:
        if bad:
            raise CLIError(f"{flag}: --threat iwd runs the IWD attack alone (in its own ball, no restarts); drop {flag}")
    for flag, v in [("--iwd-patch", args.iwd_patch), ("--iwd-stride", args.iwd_stride)]:
        if v < 1:
            raise CLIError(f"{flag} must be an int >= 1, got {v}")


class IWDSuite:
    """The one-attack "suite" of --threat iwd: what evaluate's row loop and report need (names, attacks,
    describe)."""

    names = ("iwd",)

    def __init__(self, model, eps: float, args, mean=None, std=None, dtype=None):
        from ..attacks import IWDAttack

        try:
            self.attack = IWDAttack(model, eps, steps=10 if args.steps is None else args.steps, patch=args.iwd_patch,
                                    stride=args.iwd_stride, method=args.iwd_method, seed=args.seed, mean=mean,
                                    std=std, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise CLIError(f"--threat iwd: {e}") from None
        self.attacks = [self.attack]

    def describe(self) -> str:
        """One line: the attack, its steps and patches."""
        a, d = self.attack, self.attack.distance
        return f"IWD-{a.steps} ({d.patch}x{d.patch} patches, stride {d.stride}, {d.method} OT)"


def threat(args):
    """(norm label, eps, where eps came from) of --threat iwd."""
    if args.eps is not None:
        return "iwd", args.eps, "--eps"
    return "iwd", DEFAULT_EPS, "the IWD default"


def settings(args) -> dict:
    """The settings that change --threat iwd's rows (stored with them; only for --threat iwd)."""
    return {"threat": "iwd", "iwd_patch": args.iwd_patch, "iwd_stride": args.iwd_stride, "iwd_method": args.iwd_method}
