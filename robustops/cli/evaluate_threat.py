"""`robustops evaluate --threat iwd|jstm`: robust accuracy under a threat model beyond the L_p ball instead of
an L_p suite, through evaluate's row loop (cli/attack_rows.py: the same resumable per-input TSV):

- ``iwd``: the internal-Wasserstein attack (:class:`robustops.attacks.IWDAttack`, Wang et al. 2021) within
  --eps of the image's patch distribution (the IWD of each adversarial example in the ``distance`` column);
- ``jstm``: the joint-space attack of IJSAT (:class:`robustops.attacks.JSTMAttack`, Lau et al. 2023): a
  latent offset within --eps-z through the normalising flow of --flow plus a pixel offset within --eps
  (L-inf both)."""
from __future__ import annotations

import argparse

from .common import CLIError

#: The JSTM pixel budget when --eps is not given: the digits demo's L-inf eps.
DEFAULT_JSTM_EPS = 0.2
THREATS = ("lp", "iwd", "jstm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--threat and the IWD and JSTM attacks' flags."""
    from ..attacks.wasserstein import METHODS

    p.add_argument("--threat", default="lp", choices=THREATS,
                   help="lp: the --suite's attacks in the --norm ball (default); iwd: the internal-Wasserstein attack "
                        "within --eps of the image's patch distribution (IWD_2, per-value scale); jstm: the joint-space "
                        "attack (latent --eps-z through the flow of --flow, pixel --eps, L-inf both)")
    p.add_argument("--iwd-patch", type=int, default=3, help="--threat iwd: patch size in pixels")
    p.add_argument("--iwd-stride", type=int, default=1, help="--threat iwd: patch stride in pixels")
    p.add_argument("--iwd-method", default="auto", choices=METHODS,
                   help="--threat iwd: the optimal-transport solver (auto: exact for small patch sets, then Sinkhorn, "
                        "then sliced)")
    p.add_argument("--flow", default=None, metavar="CKPT",
                   help="--threat jstm: the normalising flow (a `perturbation train --kind flow` checkpoint)")
    from ..train.methods.ijsat import DEFAULT_EPS_Z

    p.add_argument("--eps-z", type=float, default=None,
                   help=f"--threat jstm: the latent L-inf budget (None: ijsat's default {DEFAULT_EPS_Z:g})")


def check(args) -> None:
    """Refuses the flags the chosen --threat does not take, and the IWD / JSTM flags without their threat."""
    own = {"iwd": [("--iwd-patch", args.iwd_patch != 3), ("--iwd-stride", args.iwd_stride != 1),
                   ("--iwd-method", args.iwd_method != "auto")],
           "jstm": [("--flow", args.flow is not None), ("--eps-z", args.eps_z is not None)]}
    for threat, flags in own.items():
        if args.threat != threat:
            for flag, bad in flags:
                if bad:
                    raise CLIError(f"{flag} sets the {threat.upper()} attack: add --threat {threat}, or drop {flag}")
    if args.threat == "lp":
        return
    for flag, bad in [("--suite", args.suite not in ("autoattack", "pgd")), ("--version", args.version != "standard"),
                      ("--norm", args.norm is not None), ("--transfer-from", args.transfer_from is not None)]:
        if bad:
            raise CLIError(f"{flag}: --threat {args.threat} runs its own attack alone (in its own threat model); "
                           f"drop {flag}")
    if args.threat == "iwd":
        if args.restarts is not None:
            raise CLIError("--restarts: the IWD attack has no restarts; drop --restarts")
        for flag, v in [("--iwd-patch", args.iwd_patch), ("--iwd-stride", args.iwd_stride)]:
            if v < 1:
                raise CLIError(f"{flag} must be an int >= 1, got {v}")
    if args.threat == "jstm" and args.flow is None:
        raise CLIError("--flow is required with --threat jstm: the normalising flow's checkpoint (robustops "
                       "perturbation train --kind flow)")


class ThreatSuite:
    """The one-attack "suite" of --threat iwd / jstm: what evaluate's row loop and report need (names, attacks,
    describe)."""

    def __init__(self, model, eps: float, args, mean=None, std=None, dtype=None, device="cpu"):
        self.threat = args.threat
        self.names = (args.threat,)
        steps = 10 if args.steps is None else args.steps
        if self.threat == "jstm":
            from .attack_rows import jstm_attacks

            self.eps_z = eps_z(args)
            self.attack = jstm_attacks(model, args.flow, eps, self.eps_z, steps=steps,
                                       restarts=args.restarts or 1, seed=args.seed, mean=mean, std=std, dtype=dtype,
                                       device=device)[0]
        else:
            from ..attacks import IWDAttack

            try:
                self.attack = IWDAttack(model, eps, steps=steps, patch=args.iwd_patch, stride=args.iwd_stride,
                                        method=args.iwd_method, seed=args.seed, mean=mean, std=std, dtype=dtype)
            except (ValueError, TypeError) as e:
                raise CLIError(f"--threat iwd: {e}") from None
        self.attacks = [self.attack]

    def describe(self) -> str:
        """One line: the attack, its steps and its threat model's settings."""
        a = self.attack
        if self.threat == "jstm":
            return f"JSTM-{a.steps} (latent L-inf eps_z {self.eps_z:g} through the flow, pixel L-inf)"
        d = a.distance
        return f"IWD-{a.steps} ({d.patch}x{d.patch} patches, stride {d.stride}, {d.method} OT)"


def eps_z(args) -> float:
    """--threat jstm's latent budget: --eps-z, or ijsat's default."""
    from ..train.methods.ijsat import DEFAULT_EPS_Z

    return DEFAULT_EPS_Z if args.eps_z is None else args.eps_z


def threat(args):
    """(norm label, eps, where eps came from) of --threat iwd / jstm."""
    if args.eps is not None:
        return args.threat, args.eps, "--eps"
    if args.threat == "jstm":
        return "jstm", DEFAULT_JSTM_EPS, "the digits demo's eps"
    from ..attacks.iwd import DEFAULT_EPS  # the IWD budget by default (method iwd's)

    return "iwd", DEFAULT_EPS, "the IWD default"


def settings(args) -> dict:
    """The settings that change --threat iwd / jstm's rows (stored with them; only for those threats)."""
    if args.threat == "jstm":
        import os

        return {"threat": "jstm", "flow": os.path.abspath(args.flow), "eps_z": eps_z(args)}
    return {"threat": "iwd", "iwd_patch": args.iwd_patch, "iwd_stride": args.iwd_stride, "iwd_method": args.iwd_method}
