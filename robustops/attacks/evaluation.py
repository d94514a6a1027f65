"""Clean and robust accuracy of a model over a data loader under an attack, or under an ensemble of
attacks run in order (AutoAttack's way: each attacks only what the earlier ones left robust)."""
from __future__ import annotations

import collections
import contextlib
import sys
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .base import Attack
from .engine import predictions

__all__ = ["robust_accuracy"]


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training if isinstance(model, nn.Module) else None
    try:
        if was:
            model.eval()
        yield
    finally:
        if was:
            model.train(True)


def _targets(attack: Attack, batch, x, y, device):
    if not attack.targeted:
        return None
    if len(batch) > 3:
        return torch.as_tensor(batch[3]).to(device).long()
    if attack.target_fn is not None:
        return torch.as_tensor(attack.target_fn(x, y)).to(device).long()
    raise ValueError("a targeted attack in robust_accuracy needs attack.target_fn (or a loader that "
                     "yields (images, labels, indices, targets))")


#: Per-sample result fields that some attacks add (Square's query counts, FAB's minimal distance) and
#: their dtypes: they become columns of the same name (an attack lists its own in ``result_fields``).
EXTRA_FIELDS = {"queries": torch.int64, "distance": torch.float32}


def _attack_batch(model, attack: Attack, batch, x, y, idx, n: int, device, keep_adv: bool = False) -> dict:
    """The per-sample columns (CPU tensors) of one attacked batch."""
    with torch.no_grad(), _eval_mode(model):
        clean_pred = predictions(model(attack.normalize(x)).float())
    clean_ok = clean_pred == y
    targets = _targets(attack, batch, x, y, device)
    res = attack.perturb(x, y, targets, offset=int(idx[0]) if len(batch) > 2 else n,
                         skip=~clean_ok if attack.early_stop else None, evaluate=True)
    if attack.train_mode or res.pred is None:
        with torch.no_grad(), _eval_mode(model):
            adv_pred = predictions(model(attack.normalize(res.x_adv)).float())
    else:
        adv_pred = res.pred
    if getattr(res, "distance", None) is not None:
        # a minimum-distance attack (FAB) returns the smallest adversarial example it found even beyond
        # eps: only its success (found within eps) breaks a point, as AutoAttack counts FAB
        robust_ok = clean_ok & ~res.success
    elif attack.targeted:
        robust_ok = clean_ok & (adv_pred == y)
    else:
        robust_ok = clean_ok & ~res.success & (adv_pred == y)
    delta = (res.x_adv.float() - x.float()).flatten(1)
    cols = {"index": idx, "label": y, "clean_pred": clean_pred, "adv_pred": adv_pred, "clean_correct": clean_ok,
            "robust_correct": robust_ok, "success": res.success, "success_step": res.success_step,
            "restart": res.restart,
            "linf": delta.abs().amax(1) if delta.shape[1] else torch.zeros(delta.shape[0], device=delta.device),
            "l2": delta.norm(dim=1)}
    u = getattr(res, "u", None)
    if u is not None:  # a latent attack (attacks.latent): the offset's norm in the latent space
        cols["latent_l2"] = u.float().flatten(1).norm(dim=1)
    for field in EXTRA_FIELDS:
        v = getattr(res, field, None)
        if v is not None:
            cols[field] = v
    if targets is not None:
        cols["target"] = targets
    if keep_adv:
        cols["x_adv"] = res.x_adv.detach()
    return {k: v.cpu() for k, v in cols.items()}


def _ensemble_batch(model, attacks, batch, x, y, idx, n: int, device, after: list, keep_adv: bool = False) -> dict:
    """_attack_batch under each attack in turn, each on the samples all earlier ones left robust; a
    row holds the result of the attack that broke the sample (else the last one's) and "attack" its
    position. after[k] += the samples still robust after attack k."""
    cols = _attack_batch(model, attacks[0], batch, x, y, idx, n, device, keep_adv)
    cols["attack"] = torch.zeros(x.shape[0], dtype=torch.int64)
    if any(a.targeted for a in attacks) and "target" not in cols:  # the same columns in every batch
        cols["target"] = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for field, dtype in EXTRA_FIELDS.items():  # even when no point survives to the attack that adds it
        if field not in cols and any(field in getattr(a, "result_fields", ()) for a in attacks):
            cols[field] = torch.full((x.shape[0],), -1, dtype=dtype)
    after[0] += int(cols["robust_correct"].sum())
    for k, atk in enumerate(attacks[1:], 1):
        keep = cols["robust_correct"].nonzero().squeeze(1)
        if keep.numel():
            kd = keep.to(device)
            sub = (x[kd], y[kd], idx[keep]) + ((torch.as_tensor(batch[3])[keep],) if len(batch) > 3 else ())
            sub_cols = _attack_batch(model, atk, sub, sub[0], sub[1], sub[2], n, device, keep_adv)
            sub_cols["attack"] = torch.full((keep.numel(),), k, dtype=torch.int64)
            for c, v in sub_cols.items():
                if c not in cols:  # a column only this attack has (target): -1 elsewhere
                    cols[c] = torch.full((x.shape[0],) + tuple(v.shape[1:]), -1, dtype=v.dtype)
                cols[c][keep] = v
        after[k] += int(cols["robust_correct"].sum())
    return cols


def _concat(cols: dict, sizes: list) -> dict:
    """The per-batch columns [(batch number, values)] joined; a batch without a column (an ensemble's
    later attack that had no survivor to attack there) gets -1 rows."""
    out = {}
    for k, parts in cols.items():
        have = dict(parts)
        like = parts[0][1]
        out[k] = torch.cat([have[b] if b in have else torch.full((size,) + tuple(like.shape[1:]), -1, dtype=like.dtype)
                            for b, size in enumerate(sizes)]) if sizes else like
    return out


def robust_accuracy(model, loader, attack: Union[Attack, Sequence[Attack]], device=None, progress: bool = True,
                    desc: str = "attack", max_samples: Optional[int] = None, keep_adv: bool = False) -> dict:
    """Clean and robust accuracy of model over loader under attack.

    attack may be a sequence of attacks (an ensemble, e.g. ``[APGD(...), APGDT(...)]`` for the
    AutoAttack-style evaluation): per batch they run in order, each on the samples that every earlier
    one left robust, and a sample is robust when it survives all. The result then also has
    "robust_acc_after" (robust accuracy after each attack, in order), "robust_correct_after" (the
    counts) and the per-sample column
    "attack" (the position of the attack whose result the row holds: the first that broke the sample,
    else the last).

    loader yields (images, labels) or (images, labels, indices) batches (indices: the samples' dataset
    indices, e.g. from ``robustops.data.IndexedDataset``). A sample is robust when it is classified
    correctly clean and the attack does not succeed (with early_stop / record_steps: at no step).
    With attack.early_stop, misclassified clean samples are not attacked.

    Returns {"clean_acc", "robust_acc", "n", "clean_correct", "robust_correct", "time_s",
    "samples_per_s", "samples"} where samples is a dict of per-sample CPU tensors (index, label,
    clean_pred, adv_pred, clean_correct, robust_correct, success, success_step, restart, linf, l2,
    target for targeted attacks, latent_l2, the latent offset's norm ||u||_2, for latent attacks such
    as ``LatentPGD``, queries for ``Square``, distance for ``FAB``, -1 in the rows of an ensemble that
    another attack holds, and with keep_adv the adversarial inputs x_adv [n, ...]), one entry per
    attacked sample."""
    from tqdm.auto import tqdm

    ensemble = list(attack) if isinstance(attack, (list, tuple)) else None
    if ensemble is not None and not ensemble:
        raise ValueError("attack: an empty sequence of attacks")
    first = ensemble[0] if ensemble else attack
    if device is None:
        device = _model_device(first.model if model is None else model)
    device = torch.device(device)
    model = first.model if model is None else model
    after = [0] * len(ensemble or ())
    cols, sizes = collections.defaultdict(list), []
    n = clean_ok_total = robust_ok_total = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("the loader must yield (images, labels) or (images, labels, indices) batches")
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else torch.arange(n, n + x.shape[0])
        if max_samples is not None and n + x.shape[0] > max_samples:
            keep = max_samples - n
            x, y, idx = x[:keep], y[:keep], idx[:keep]
        if x.shape[0] == 0:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        idx = torch.as_tensor(idx).long()
        if ensemble:
            batch_cols = _ensemble_batch(model, ensemble, batch, x, y, idx, n, device, after, keep_adv)
        else:
            batch_cols = _attack_batch(model, attack, batch, x, y, idx, n, device, keep_adv)
        sizes.append(x.shape[0])
        for k, v in batch_cols.items():
            cols[k].append((len(sizes) - 1, v))
        clean_ok, robust_ok = batch_cols["clean_correct"], batch_cols["robust_correct"]
        n += x.shape[0]
        clean_ok_total += int(clean_ok.sum())
        robust_ok_total += int(robust_ok.sum())
        bar.set_postfix(clean=f"{clean_ok_total / n:.4f}", robust=f"{robust_ok_total / n:.4f}")
        if max_samples is not None and n >= max_samples:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    samples = _concat(cols, sizes)
    extra = {"robust_acc_after": [a / n if n else float("nan") for a in after],
             "robust_correct_after": after} if ensemble else {}
    return {**extra, "clean_acc": clean_ok_total / n if n else float("nan"),
            "robust_acc": robust_ok_total / n if n else float("nan"),
            "n": n, "clean_correct": clean_ok_total, "robust_correct": robust_ok_total,
            "time_s": elapsed, "samples_per_s": n / elapsed if elapsed > 0 else float("nan"),
            "samples": samples}
