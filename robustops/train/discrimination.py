"""Robust real-vs-generated discrimination: ranks proxy distributions (``robustops.proxy``) by how well
an adversarially trained binary classifier tells real images from generated ones (Sehwag et al.,
"Robust learning meets generative models: can proxy distributions improve adversarial robustness?",
ICLR 2022). It trains with :func:`robustops.train.fit`, so it lives here, above the proxy data.

Real images get label 0, generated ones label 1, on a balanced set split into training and held-out
parts. For each eps in eps_list a binary classifier is adversarially trained at that eps (PGD-AT,
Madry et al.; natural training at eps = 0) and its robust accuracy ``a(eps)`` is measured on the
held-out part with a stronger PGD at the same eps. The score is the area under a(eps), by the
trapezoidal rule over eps_list: ``arc = sum_i (eps_{i+1} - eps_i) (a_i + a_{i+1}) / 2``, and the
same divided by the eps range (``arc_norm``, the mean robust accuracy over the range: 0.5 is
chance, 1 is a proxy told apart at every budget). Lower = the proxy is harder to tell from real
data = closer. Also ``eps50``: the smallest eps at which a(eps) falls to ``chance_margin`` above
0.5, linearly interpolated between the listed eps (None when it never does in the range).

Why robust: a non-robust classifier separates almost any generator from real data by tiny
artefacts (here: real digits take only the 17 values k/16 while generated pixels are continuous),
so its accuracy is near 1 for good and bad proxies alike; an eps-robust classifier must rely on
differences larger than eps, which is what the Wasserstein bound of Sehwag et al. is about.

Our reading of the paper's measure, stated as such: the full text was not available to us, and
the choices below are ours: a classifier per eps (not one evaluated at several eps), the eps grid,
the architecture (``models.SmallCNN`` with 2 outputs), the training schedule, the attack (PGD,
L-inf, 10 steps, one random start), the balanced subsampling and the held-out fraction.
``train_eps`` gives the cheaper variant: one classifier trained at train_eps, evaluated at every eps.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from .. import _checks, attacks
from .._rng import derive_seed
from ..models import SmallCNN
from ..proxy import as_tensors, check_images
from .fit import fit

__all__ = ["robust_discrimination"]


def _area(eps: Sequence[float], acc: Sequence[float]) -> float:
    return float(sum((eps[i + 1] - eps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(eps) - 1)))


def _eps_at(eps: Sequence[float], acc: Sequence[float], level: float) -> Optional[float]:
    """The smallest eps where the piecewise-linear a(eps) reaches level (from above); None if never."""
    if acc[0] <= level:
        return float(eps[0])
    for i in range(len(eps) - 1):
        if acc[i + 1] <= level < acc[i]:
            t = (acc[i] - level) / (acc[i] - acc[i + 1])
            return float(eps[i] + t * (eps[i + 1] - eps[i]))
    return None


def _split(real_x, gen_x, holdout: float, max_samples: Optional[int], seed: int) -> Tuple[torch.Tensor, ...]:
    """(train x, train y, held-out x, held-out y): each source subsampled (seeded) to the smaller size
    (and to max_samples), its first ``holdout`` part held out; real images label 0, generated ones 1."""
    rx, _ = as_tensors((real_x, torch.zeros(len(real_x), dtype=torch.int64)), "real_x")
    gx, _ = as_tensors((gen_x, torch.zeros(len(gen_x), dtype=torch.int64)), "gen_x")
    if rx.shape[1:] != gx.shape[1:]:
        raise ValueError(f"gen_x: images have shape {list(gx.shape[1:])}, real_x {list(rx.shape[1:])}")
    if rx.dim() != 4:
        raise ValueError(f"real_x: expected images [N, C, H, W], got shape {list(rx.shape)}")
    check_images(rx, "real_x", 0.0, 1.0)
    check_images(gx, "gen_x", 0.0, 1.0)
    m = min(rx.shape[0], gx.shape[0], max_samples or rx.shape[0])
    n_test = max(1, int(round(m * holdout)))
    if m - n_test < 2:
        raise ValueError(f"robust_discrimination: {m} samples per source leave too few for training; give more")
    g = torch.Generator().manual_seed(derive_seed(seed, 3))
    rx = rx[torch.randperm(rx.shape[0], generator=g)[:m]].float()
    gx = gx[torch.randperm(gx.shape[0], generator=g)[:m]].float()
    lab = lambda k, v: torch.full((k,), v, dtype=torch.int64)  # noqa: E731
    return (torch.cat([rx[n_test:], gx[n_test:]]), torch.cat([lab(m - n_test, 0), lab(m - n_test, 1)]),
            torch.cat([rx[:n_test], gx[:n_test]]), torch.cat([lab(n_test, 0), lab(n_test, 1)]))


def _train_at(train_set: TensorDataset, e: float, k: int, seed: int, model_fn, hyper: Dict[str, Any], dev):
    """Classifier k, PGD-trained at eps e (naturally at 0), in eval mode."""
    torch.manual_seed(derive_seed(seed, 10 + k))
    if model_fn is not None:
        model = model_fn()
    else:
        C, H = train_set.tensors[0].shape[1:3]
        model = SmallCNN(in_channels=int(C), num_classes=2, input_size=int(H))
    loader = DataLoader(train_set, batch_size=hyper["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(derive_seed(seed, 100 + k)))
    kw = dict(epochs=hyper["epochs"], optimizer="adam", lr=hyper["lr"], schedule="constant", weight_decay=0.0,
              seed=derive_seed(seed, 1000 + k), progress=False, verbose=False, device=dev, threads=hyper["threads"])
    if e > 0:
        fit(model, loader, "pgd", eps=e, steps=hyper["steps"], **kw)
    else:
        fit(model, loader, "natural", **kw)
    return model.eval()


def _accuracy(model, test_set: TensorDataset, e: float, k: int, seed: int, eval_steps: int, dev) -> Tuple[float, float]:
    """(clean, robust) held-out accuracy at eps e (PGD, one random start; both clean at 0)."""
    loader = DataLoader(test_set, batch_size=512)
    if e == 0:
        correct = 0
        with torch.no_grad():
            for xb, yb in loader:
                correct += int((model(xb.to(dev)).argmax(1).cpu() == yb).sum())
        acc = correct / len(test_set)
        return acc, acc
    atk = attacks.PGD(model, eps=e, steps=eval_steps, random_start=True, seed=derive_seed(seed, 5000 + k))
    res = attacks.robust_accuracy(model, loader, atk, device=dev, progress=False)
    return float(res["clean_acc"]), float(res["robust_acc"])


def robust_discrimination(real_x, gen_x, eps_list: Sequence[float] = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4), *,
                          train_eps: Optional[float] = None, epochs: int = 10, batch_size: int = 128,
                          steps: int = 5, eval_steps: int = 10, lr: float = 1e-3, holdout: float = 0.25,
                          max_samples: Optional[int] = None, chance_margin: float = 0.05, seed: int = 0,
                          device=None, model_fn=None, threads=None) -> Dict[str, Any]:
    """How well an adversarially trained binary classifier tells real images (label 0) from generated
    ones (label 1), as the L-inf budget grows: lower = the proxy is closer to the real data. The
    measure and its open choices are in the module's docstring.

    real_x, gen_x: image tensors (float in [0, 1], or uint8) of one shape; each source is subsampled
    (seeded) to the smaller size (and to max_samples), then split into training and held-out parts
    (holdout: the held-out fraction). eps_list: increasing budgets >= 0. train_eps: None trains one
    classifier per eps (the paper's way); a float trains one classifier at train_eps and evaluates
    it at every eps. epochs / batch_size / steps (PGD steps in training) / lr: the training (Adam,
    constant lr, ``robustops.train.fit`` with method "pgd", "natural" at eps 0); eval_steps: PGD steps
    of the held-out evaluation (alpha 2.5 eps / steps, one random start). model_fn: () -> a model with
    2 outputs (default ``models.SmallCNN`` sized to the images). device: None = cuda when available.
    threads: torch's CPU threads while each classifier trains (``fit``'s threads: None the rule).

    Returns {"eps", "robust_acc" (held-out, per eps), "clean_acc" (per classifier), "arc" (area under
    robust_acc over eps), "arc_norm" (arc / eps range), "eps50" (eps where robust_acc falls to 0.5 +
    chance_margin; None if it stays above), "n_train", "n_test", "settings"}."""
    eps_list = [float(_checks.check_number(e, "eps_list", minimum=0.0)) for e in eps_list]
    if len(eps_list) < 2 or any(b <= a for a, b in zip(eps_list, eps_list[1:])):
        raise ValueError(f"eps_list must hold at least two increasing budgets, got {eps_list}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    epochs = _checks.check_int(epochs, "epochs", 1)
    if isinstance(seed, bool) or not _checks.is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    tr_x, tr_y, te_x, te_y = _split(real_x, gen_x, holdout, max_samples, int(seed))
    train_set, test_set = TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hyper = {"epochs": epochs, "batch_size": batch_size, "steps": steps, "lr": lr, "threads": threads}
    robust: List[float] = []
    clean: List[float] = []
    if train_eps is None:
        for k, e in enumerate(eps_list):
            ca, ra = _accuracy(_train_at(train_set, e, k, int(seed), model_fn, hyper, dev), test_set, e, k,
                               int(seed), eval_steps, dev)
            clean.append(ca)
            robust.append(ra)
    else:
        te = float(_checks.check_number(train_eps, "train_eps", minimum=0.0))
        model = _train_at(train_set, te, 0, int(seed), model_fn, hyper, dev)
        for k, e in enumerate(eps_list):
            ca, ra = _accuracy(model, test_set, e, k, int(seed), eval_steps, dev)
            clean.append(ca)
            robust.append(ra)
    arc = _area(eps_list, robust)
    span = eps_list[-1] - eps_list[0]
    return {"eps": eps_list, "robust_acc": robust, "clean_acc": clean, "arc": arc, "arc_norm": arc / span,
            "eps50": _eps_at(eps_list, robust, 0.5 + chance_margin), "n_train": int(tr_x.shape[0]),
            "n_test": int(te_x.shape[0]),
            "settings": {"train_eps": train_eps, "epochs": epochs, "batch_size": batch_size, "steps": steps,
                         "eval_steps": eval_steps, "lr": lr, "holdout": holdout, "seed": int(seed),
                         "chance_margin": chance_margin, "model": "custom" if model_fn else "SmallCNN"}}
