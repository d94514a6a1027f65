"""Attack suites: AutoAttack (Croce & Hein, ICML 2020) in its standard, plus and rand versions, and the
single-attack suites that ``robustops evaluate`` offers, run AutoAttack's way (each attack only on
the points that every earlier one left robust, the worst case per point kept), with the per-stage log
and a check for masked gradients.

    suite = Suite(model, eps=8/255, norm="linf")               # AutoAttack, standard version
    res = suite.run(loader)                                     # robust_accuracy's dict + stages
    res["robust_acc"], res["stages"], res["warnings"]
    ro.evaluate(model, (x, y), eps=8/255)                       # the same, from tensors or a dataset

The versions, as AutoAttack (fra31/auto-attack, ``autoattack.py``) defines them for L-inf and L2, each
attack with 100 iterations and Square with 5000 queries:

- standard: APGD-CE (1 restart), APGD-T (9 target classes, 1 restart each), FAB-T (9 target classes,
  1 restart each), Square (p_init 0.8, 1 restart).
- plus: APGD-CE (5 restarts), APGD-DLR (5 restarts), FAB (untargeted, 5 restarts), Square, APGD-T,
  FAB-T (9 targets, 1 restart each), in that order.
- rand (randomized defenses): APGD-CE and APGD-DLR, 1 restart, each gradient the mean of 20 passes
  (expectation over transformation, ``APGD(eot_iter=20)``).

The other suites (``suite=``): "apgd" (APGD-CE then APGD-T, the fast pair), "pgd" (PGD with Madry et
al.'s step size), "fab" (FAB-T) and "square" (Square alone). A point is robust when the model classifies
it correctly and no attack of the suite breaks it within eps. Choices AutoAttack's code makes that
are kept: the targets of APGD-T and FAB-T are the classes with the highest clean logits other than the
label (at most C - 1); a point counts as broken when any iterate misclassifies it. Choices made here:
every attack is seeded from ``seed`` (sub-stream k for attack k), and a batch's random numbers are
keyed by the index of its first point, so a run is reproducible and its rows do not depend on how the
points are split over processes as long as the batches are the same (``robustops evaluate`` cuts
batches on a fixed grid of indices for that reason).

Masking check (the advice of Athalye et al. 2018 and AutoAttack, made automatic): a gradient-free
attack should find little that the gradient attacks missed. When Square (or any stage after it) breaks
more than ``masking_threshold`` (default 5%, and at least 3 points) of the points still robust before
it, the result's "warnings" says so: the gradients may be masked or obfuscated, and the robust
accuracy of the gradient attacks alone would have overstated robustness.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _checks, _rng
from .apgd import APGD, APGDT
from .base import Attack
from .evaluation import robust_accuracy
from .fab import FAB, FABT
from .pgd import PGD
from .square import Square
from .transfer import Transfer

__all__ = ["Suite", "VERSIONS", "SUITES", "LABELS", "GRADIENT_FREE", "suite_names", "masking_warnings", "stages",
           "refuse_videos",
           "evaluate"]

#: AutoAttack's versions: the attacks in the order they run.
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
            "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
            "rand": ("apgd-ce", "apgd-dlr")}
#: The suites of ``robustops evaluate`` other than autoattack.
SUITES = {"apgd": ("apgd-ce", "apgd-t"), "pgd": ("pgd",), "fab": ("fab-t",), "square": ("square",)}
#: Display names.
LABELS = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab": "FAB", "fab-t": "FAB-T",
          "square": "Square", "pgd": "PGD"}
#: Attacks that use no gradient: what they break beyond the gradient attacks points at masking.
GRADIENT_FREE = ("square",)
#: Restarts per version (AutoAttack's): (apgd-ce / apgd-dlr, fab) restarts; targeted attacks: 1 per target.
_RESTARTS = {"standard": 1, "plus": 5, "rand": 1}


def suite_names(suite: str = "autoattack", version: str = "standard") -> Tuple[str, ...]:
    """The attacks of a suite in the order they run (``version`` for suite="autoattack")."""
    if suite == "autoattack":
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
        return VERSIONS[version]
    if suite not in SUITES:
        raise ValueError(f"suite must be autoattack or one of {', '.join(SUITES)}, got {suite!r}")
    return SUITES[suite]


def masking_warnings(names: Sequence[str], clean_correct: int, robust_after: Sequence[int],
                     threshold: float = 0.05, min_points: int = 3) -> List[str]:
    """The masking check: one warning per stage k that is gradient-free (Square) or runs after one, and
    broke more than ``threshold`` of the points still robust before it (and at least min_points: a share
    of one or two points is noise). robust_after[k]: robust points after stage k; clean_correct before
    the first. Gradient attacks that follow each other (APGD-T after APGD-CE) are not compared: they
    differ in loss, and the ensemble exists because each finds points the others miss."""
    out = []
    before = [clean_correct] + list(robust_after[:-1])
    first_free = next((k for k, n in enumerate(names) if n in GRADIENT_FREE), None)
    for k in range(max(1, first_free if first_free is not None else len(names)), len(names)):
        left, broken = before[k], before[k] - robust_after[k]
        if left <= 0 or broken < min_points or broken / left <= threshold:
            continue
        label, earlier = LABELS.get(names[k], names[k]), " + ".join(LABELS.get(n, n) for n in names[:k])
        why = ("a gradient-free attack succeeding where the gradient attacks failed" if names[k] in GRADIENT_FREE
               else "gradient attacks succeeding only after a gradient-free one")
        out.append(f"{label} broke {broken} of the {left} points ({broken / left:.1%}) that {earlier} left robust: "
                   f"{why} suggests masked or obfuscated gradients; the robust accuracy of the gradient attacks "
                   f"alone overstates robustness (threshold {threshold:.0%})")
    return out


def stages(names: Sequence[str], n: int, clean_correct: int, robust_after: Sequence[int]) -> List[dict]:
    """AutoAttack's log as rows: per stage the attack, the points it broke and the robust accuracy
    after it (robust_after[k]: robust points after stage k)."""
    rows, before = [], clean_correct
    for name, after in zip(names, robust_after):
        rows.append({"attack": name, "label": LABELS.get(name, name), "broken": before - after, "robust": after,
                     "robust_acc": after / n if n else float("nan")})
        before = after
    return rows


class Suite:
    """An ordered list of attacks run AutoAttack's way (see the module docstring).

    model: logits for pixels in clip (give mean / std when it takes normalized inputs). eps: radius
    (float > 0); norm: "linf" or "l2". suite: "autoattack" (``version`` "standard", "plus" or "rand"),
    "apgd", "pgd", "fab" or "square". steps: iterations of APGD / FAB (AutoAttack: 100; PGD: 10 unless
    given); fab_steps: FAB's own (None: steps); n_queries: Square's budget (5000); n_target_classes:
    targets of APGD-T / FAB-T (9, capped at C - 1); restarts: None for the version's (1, or 5 for plus); eot_iter: gradient passes per step
    in the rand version (20); seed: attack k draws from sub-stream k; dtype: autocast of the forward;
    masking_threshold: see :func:`masking_warnings`; p_init / rescale_schedule: Square's (AutoAttack: 0.8,
    False; torchattacks' AutoAttack rescales the schedule to the budget)."""

    def __init__(self, model, eps: float, norm: str = "linf", suite: str = "autoattack", version: str = "standard", *,
                 steps: Optional[int] = None, fab_steps: Optional[int] = None, n_queries: int = 5000,
                 n_target_classes: int = 9,
                 restarts: Optional[int] = None, eot_iter: int = 20, seed: int = 0, clip=(0.0, 1.0), mean=None,
                 std=None, dtype=None, masking_threshold: float = 0.05, p_init: float = 0.8,
                 rescale_schedule: bool = False):
        self.names = suite_names(suite, version)
        self.suite, self.version = suite, version
        self.eps = _checks.check_number(eps, "eps", 0.0, strict=True)
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.masking_threshold = _checks.check_number(masking_threshold, "masking_threshold", 0.0, maximum=1.0)
        seed = _checks.check_int(seed, "seed", 0)
        restarts = _RESTARTS[version] if restarts is None else _checks.check_int(restarts, "restarts", 1)
        common = dict(clip=clip, mean=mean, std=std, dtype=dtype)
        opts = dict(steps=steps, fab_steps=fab_steps, n_queries=n_queries, n_target_classes=n_target_classes, restarts=restarts,
                    eot_iter=eot_iter if version == "rand" and suite == "autoattack" else 1, p_init=p_init,
                    rescale_schedule=bool(rescale_schedule))
        self.attacks: List[Attack] = [self._make(model, name, _rng.derive_seed(seed, k), common, **opts)
                                      for k, name in enumerate(self.names)]

    def _make(self, model, name: str, seed: int, common: dict, *, steps, fab_steps, n_queries, n_target_classes,
              restarts,
              eot_iter, p_init, rescale_schedule) -> Attack:
        eps, norm = self.eps, self.norm
        it = 100 if steps is None else _checks.check_int(steps, "steps", 1)
        fab_it = it if fab_steps is None else _checks.check_int(fab_steps, "fab_steps", 1)
        if name in ("apgd-ce", "apgd-dlr"):
            return APGD(model, eps, steps=it, norm=norm, loss=name[5:], restarts=restarts, seed=seed,
                        eot_iter=eot_iter, **common)
        if name == "apgd-t":
            return APGDT(model, eps, steps=it, norm=norm, n_target_classes=n_target_classes, seed=seed, **common)
        if name == "fab":
            return FAB(model, eps, norm=norm, steps=fab_it, restarts=restarts, seed=seed, **common)
        if name == "fab-t":
            return FABT(model, eps, norm=norm, steps=fab_it, n_target_classes=n_target_classes, seed=seed, **common)
        if name == "square":
            return Square(model, eps, norm=norm, n_queries=n_queries, p_init=p_init, seed=seed,
                          rescale_schedule=rescale_schedule, **common)
        return PGD(model, eps, steps=10 if steps is None else it, norm=norm, restarts=restarts, seed=seed,
                   early_stop=True, **common)

    def __repr__(self) -> str:
        what = f"autoattack/{self.version}" if self.suite == "autoattack" else self.suite
        return f"Suite({what}: {' -> '.join(LABELS[n] for n in self.names)}, eps={self.eps:g}, norm={self.norm!r})"

    def describe(self) -> str:
        """The attacks and their budgets, one line (for logs and tables)."""
        parts = []
        for name, atk in zip(self.names, self.attacks):
            if name == "square":
                parts.append(f"Square-{atk.n_queries}q")
            else:
                r = getattr(atk, "restarts", 1)
                parts.append(f"{LABELS[name]}-{atk.steps}" + (f"x{r}" if r > 1 else ""))
        return " + ".join(parts)

    def run(self, loader, device=None, progress: bool = True, max_samples: Optional[int] = None,
            keep_adv: bool = False, model=None) -> dict:
        """robust_accuracy of the suite over loader (see ``robust_accuracy``; per-sample column
        "attack" = the stage whose result the row holds), plus "attacks" (the names), "stages" (per
        stage: attack, broken, robust, robust_acc) and "warnings" (the masking check)."""
        self.check_inputs(loader)
        atks = self.attacks if len(self.attacks) > 1 else self.attacks[0]
        res = robust_accuracy(model, loader, atks, device=device, progress=progress, desc=self.suite,
                              max_samples=max_samples, keep_adv=keep_adv)
        return self.summarize(res)

    def transfer_to(self, model, mean=None, std=None, dtype=None) -> "Suite":
        """This suite (built on a source model) as a transfer suite on ``model``, the target: each attack
        wrapped in :class:`~robustops.attacks.transfer.Transfer` (its examples crafted on the source,
        judged by the target; mean / std / dtype: the target's). Returns self."""
        self.attacks = [Transfer(model, a, mean=mean, std=std, dtype=dtype) for a in self.attacks]
        return self

    def check_inputs(self, loader) -> None:
        """:func:`refuse_videos` for this suite's attacks and the loader's dataset."""
        refuse_videos(self.names, getattr(loader, "dataset", None), repr(self))

    def summarize(self, res: dict) -> dict:
        """res (robust_accuracy's dict of this suite) with "attacks", "stages" and "warnings" added."""
        n, clean = res["n"], res["clean_correct"]
        after = res.get("robust_correct_after", [res["robust_correct"]])
        return {**res, "attacks": list(self.names), "stages": stages(self.names, n, clean, after),
                "warnings": masking_warnings(self.names, clean, after, self.masking_threshold)}


def refuse_videos(names, dataset, what: str) -> None:
    """Refuses videos ([B, T, C, H, W]: a 4-D first sample of dataset) before any attack runs when the
    attacks ``names`` include Square (its windows are drawn per image), so the stages before it are not
    spent for nothing. what: the attacks' description, for the message."""
    if "square" not in names or dataset is None or len(dataset) == 0:
        return
    first = dataset[0][0]
    if isinstance(first, torch.Tensor) and first.dim() == 4:
        raise ValueError(f"{what} includes Square, which attacks images [B, C, H, W]; the data are videos (samples "
                         f"{list(first.shape)} = [T, C, H, W]): use suite 'apgd' (APGD-CE + APGD-T), 'pgd' or "
                         f"'fab', which take any [B, ...]")


def _loader(data, batch_size: int):
    """A loader over data: a DataLoader (as it is), a Dataset, or a pair (images, labels) of tensors."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, DataLoader):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorDataset(data[0], data[1])
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a DataLoader, a Dataset or a pair (images, labels) of tensors, got "
                        f"{type(data).__name__}")
    return DataLoader(data, batch_size=_checks.check_int(batch_size, "batch_size", 1), shuffle=False)


def evaluate(model, data, suite: str = "autoattack", eps: Optional[float] = None, norm: str = "linf", *,
             version: str = "standard", n: Optional[int] = None, batch_size: int = 256, device=None,
             progress: bool = True, keep_adv: bool = True, transfer_from=None, **options) -> dict:
    """Robust accuracy of model on data under an attack suite (``robustops.evaluate``): per point and
    in summary. data: a DataLoader, a Dataset or (images, labels) tensors, pixels in [0, 1]; eps the
    radius (required); n: the first n points only; options: :class:`Suite`'s (steps, n_queries,
    n_target_classes, restarts, eot_iter, seed, mean, std, dtype, masking_threshold).

    Returns robust_accuracy's dict ("clean_acc", "robust_acc", "n", "samples" with per-point columns,
    x_adv included unless keep_adv=False) plus "attacks", "stages" (AutoAttack's per-stage log) and
    "warnings" (the masking check), and "suite" (a description of the attacks run).

    suite="corruptions": common corruptions instead of attacks (no eps, norm or version): options are
    :func:`robustops.corruptions.evaluation.corruption_accuracy`'s (corruptions, severities, seed, mean,
    std, dtype, ...), and so is the result (accuracy per corruption and severity, ECE, ...).

    transfer_from: a source model: the suite's attacks are crafted on it and evaluated on model (a transfer
    attack, :mod:`robustops.attacks.transfer`; mean / std / dtype apply to both), "transfer" True in the result."""
    if suite == "corruptions":
        return _corruptions(model, data, eps, norm, version, n=n, batch_size=batch_size, device=device,
                            progress=progress, **options)
    if eps is None:
        raise ValueError("eps: give the radius of the threat model (e.g. eps=8/255 for linf, 0.5 for l2)")
    if transfer_from is None:
        s = Suite(model, eps, norm, suite, version, **options)
    else:
        s = Suite(transfer_from, eps, norm, suite, version, **options)
        s.transfer_to(model, options.get("mean"), options.get("std"), options.get("dtype"))
    if n is not None:
        n = _checks.check_int(n, "n", 1)
    res = s.run(_loader(data, batch_size), device=device, progress=progress, max_samples=n, keep_adv=keep_adv,
                model=model)
    return {**res, "suite": s.describe(), "eps": s.eps, "norm": s.norm, "transfer": transfer_from is not None}


def _corruptions(model, data, eps, norm, version, **options) -> dict:
    """evaluate(suite="corruptions"): refuses the attacks' threat model, runs corruption_accuracy."""
    from ..corruptions.evaluation import corruption_accuracy

    given = [f"{k}={v!r}" for k, v, default in (("eps", eps, None), ("norm", norm, "linf"),
                                                 ("version", version, "standard")) if v != default]
    if given:
        raise ValueError(f"suite='corruptions' applies common corruptions, not an attack: drop {', '.join(given)}")
    return {**corruption_accuracy(model, data, **options), "suite": "corruptions"}
