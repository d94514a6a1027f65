"""Accuracy and calibration of a model under common corruptions, and the corruption error relative to a
baseline (Hendrycks & Dietterich, ICLR 2019), one row per (corruption, severity) so that an interrupted
run resumes without redoing the rows it finished.

    res = corruption_accuracy(model, (x, y), corruptions="benchmark", severities=(1, 2, 3, 4, 5))
    res["clean_acc"], res["mean_corruption_acc"], res["per_family"], res["clean_ece"], res["corruption_ece"]
    mce(res, baseline_res)["mce"]                      # relative to another model's result
    plot_heatmap(res, "cc.png")                        # corruption x severity accuracy

Definitions:

- Accuracy A_{c,s}: top-1 accuracy on the data corrupted with c at severity s. Every batch is corrupted
  with the samples' dataset indices (``robustops.corruptions.corrupt(x, c, s, seed, indices)``), so a
  sample's corrupted image, and each row, depends only on (seed, c, s, index), never on the batching,
  the device or a resume. ``corrupted`` replaces the generated images by given ones (the released
  CIFAR-10-C arrays, ``robustops.corruptions.cifar10c.CifarC``).
- Mean corruption accuracy: the mean of A_{c,s} over severities and over the 15 benchmark corruptions
  when all of them were run, else over the corruptions that were run ("mean_over" says which set); the
  per-family accuracies average the same set's members of each family, the per-corruption ones the
  severities that were run.
- ECE (expected calibration error; Naeini et al. 2015, Guo et al. 2017, eq. 3): the predictions'
  confidences (top softmax probability) in M = 15 equal-width bins B_m = ((m - 1)/M, m/M],
  ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|. Kireev, Andriushchenko & Flammarion (UAI 2022, arXiv
  2103.02325) report the ECE on the clean test set and under the corruptions; their paper's text
  defining it could not be retrieved here and their released evaluation code computes no ECE, so the
  common 15-bin form above (torchmetrics' and Guo et al.'s code default) is used. The choice left open
  is how the corrupted sets are pooled: "corruption_ece" is the mean of the per-(c, s) ECEs over the
  set the mean accuracy averages (each (c, s) is a test set of its own, as each is a column of their
  tables), not the ECE of all corrupted predictions pooled.
- mCE (Hendrycks & Dietterich 2019, section 4): E_{c,s} = 1 - A_{c,s}; CE_c = sum_s E_{c,s}(f) /
  sum_s E_{c,s}(baseline), mCE = mean_c CE_c; relative CE_c = sum_s (E_{c,s}(f) - E_clean(f)) /
  sum_s (E_{c,s}(baseline) - E_clean(baseline)), relative mCE = its mean. The paper's baseline is
  AlexNet; here it is whatever result is given. A corruption whose baseline denominator is 0 has no CE:
  it is left out of mCE and listed under "undefined_ce"; one whose relative denominator is <= 0 has no
  relative CE: it is left out of the relative mCE and listed under "undefined_relative" (the two lists
  differ when a corruption has a CE but no relative CE: it then counts in mCE only).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .. import _checks
from . import ALL, BENCHMARK, FAMILIES, available, check_names, check_severity, corrupt

__all__ = ["N_BINS", "ROW_FIELDS", "row_key", "calibration_bins", "ece_from_bins", "expected_calibration_error",
           "evaluate_row", "summarize", "corruption_accuracy", "mce", "plot_heatmap"]

#: bins of the ECE (equal width on [0, 1])
N_BINS = 15
#: the fields of a row, in the order of the command line's TSV
ROW_FIELDS = ("key", "corruption", "severity", "n", "correct", "accuracy", "ece")


def row_key(corruption: str, severity: int) -> int:
    """The stable integer key of a row: 0 for the clean data, 1 + 5 * ALL.index(c) + (s - 1) for (c, s)."""
    if corruption == "clean":
        return 0
    return 1 + 5 * ALL.index(corruption) + check_severity(severity) - 1


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """Tensor[3, n_bins] (float64, CPU): per bin ((m-1)/M, m/M] the count, the sum of confidences and the
    number correct; bins of several batches add up."""
    conf = confidence.detach().double().flatten().cpu()
    ok = correct.detach().double().flatten().cpu()
    # right-closed bins: confidence m/M falls in bin m - 1 (Guo et al.'s intervals); 0 goes to the first
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    out = torch.zeros(3, n_bins, dtype=torch.float64)
    out[0].index_add_(0, idx, torch.ones_like(conf))
    out[1].index_add_(0, idx, conf)
    out[2].index_add_(0, idx, ok)
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    """The ECE of calibration_bins' sums: sum_m |correct_m - confidence sum_m| / n (NaN when n = 0)."""
    n = float(bins[0].sum())
    return float((bins[2] - bins[1]).abs().sum()) / n if n > 0 else float("nan")


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> float:
    """ECE with n_bins equal-width bins (see the module docstring) of confidences Tensor[N] in [0, 1]
    and correct Tensor[N] (bool or 0/1)."""
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence and correct must have the same shape, got {tuple(confidence.shape)} and "
                         f"{tuple(correct.shape)}")
    return ece_from_bins(calibration_bins(confidence, correct, _checks.check_int(n_bins, "n_bins", 1)))


def _dataset(data, n: Optional[int]):
    from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

    if isinstance(data, DataLoader):
        data = data.dataset  # batches are cut on the indices of the dataset, never the loader's order
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorDataset(data[0], data[1])
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a DataLoader, a Dataset or a pair (images, labels) of tensors, got "
                        f"{type(data).__name__}")
    if n is not None and _checks.check_int(n, "n", 1) < len(data):
        data = Subset(data, range(n))
    return data


def _batches(dataset, batch_size: int):
    """(x, y, indices) of consecutive dataset indices."""
    from torch.utils.data import default_collate

    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        x, y = default_collate([dataset[i][:2] for i in idx])
        yield x, torch.as_tensor(y), idx


def evaluate_row(model, data, corruption: str, severity: int = 0, *, seed: int = 0, batch_size: int = 256,
                 device=None, mean=None, std=None, dtype=None, corrupted: Optional[Callable] = None,
                 n: Optional[int] = None) -> dict:
    """One row: the accuracy and ECE of model on data corrupted with (corruption, severity), or on the
    clean data (corruption "clean", severity 0). Arguments as :func:`corruption_accuracy`'s. Returns
    {"key", "corruption", "severity", "n", "correct", "accuracy", "ece"}."""
    from ..models import Normalize

    ds = _dataset(data, n)
    if corruption != "clean" and corrupted is not None:
        images = corrupted(corruption, severity)
        if len(images) < len(ds):
            raise ValueError(f"corrupted({corruption!r}, {severity}) holds {len(images)} samples, fewer than the "
                             f"{len(ds)} of data")
        ds = _dataset(images, len(ds))
    dev = torch.device(device) if device is not None else next(iter(model.parameters()), torch.empty(0)).device
    norm = Normalize(mean, std).to(dev) if mean is not None else None
    bins, correct, total = torch.zeros(3, N_BINS, dtype=torch.float64), 0, 0
    for x, y, idx in _batches(ds, batch_size):
        x, y = x.to(dev), y.to(dev)
        if corruption != "clean" and corrupted is None:
            x = corrupt(x, corruption, severity, seed=seed, indices=idx)
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(norm(x) if norm is not None else x)
        conf, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
        ok = pred == y
        bins += calibration_bins(conf, ok)
        correct += int(ok.sum())
        total += len(idx)
    return {"key": row_key(corruption, severity), "corruption": corruption, "severity": int(severity), "n": total,
            "correct": correct, "accuracy": correct / total if total else float("nan"), "ece": ece_from_bins(bins)}


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(rows: Iterable[dict], corruptions: Sequence[str], severities: Sequence[int]) -> dict:
    """The result of :func:`corruption_accuracy` from its rows (the clean row and one per (c, s) of
    corruptions x severities, each with "accuracy" and "ece"); a missing row is a ValueError."""
    by = {(r["corruption"], int(r["severity"])): r for r in rows}
    need = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    missing = [k for k in need if k not in by]
    if missing:
        raise ValueError(f"rows: missing {', '.join(f'{c}/{s}' for c, s in missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    acc = {c: {s: float(by[c, s]["accuracy"]) for s in severities} for c in corruptions}
    ece = {c: {s: float(by[c, s]["ece"]) for s in severities} for c in corruptions}
    full = all(c in corruptions for c in BENCHMARK)
    over = [c for c in BENCHMARK] if full else list(corruptions)
    per_c = {c: _mean(acc[c].values()) for c in corruptions}
    fams = {f: [c for c in over if c in names] for f, names in FAMILIES.items()}
    return {"clean_acc": float(by["clean", 0]["accuracy"]), "clean_ece": float(by["clean", 0]["ece"]),
            "n": int(by["clean", 0]["n"]), "corruptions": list(corruptions), "severities": list(severities),
            "accuracy": acc, "ece": ece, "per_corruption": per_c,
            "per_severity": {s: _mean(acc[c][s] for c in over) for s in severities},
            "per_family": {f: _mean(per_c[c] for c in cs) for f, cs in fams.items() if cs},
            "mean_corruption_acc": _mean(acc[c][s] for c in over for s in severities),
            "corruption_ece": _mean(ece[c][s] for c in over for s in severities),
            "mean_over": "benchmark" if full else "run", "mean_corruptions": over,
            "rows": [dict(by[k]) for k in need]}


def corruption_accuracy(model, data, corruptions=None, severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0,
                        batch_size: int = 256, device=None, mean=None, std=None, progress: bool = False,
                        on_row: Optional[Callable[[dict], None]] = None, done: Optional[Iterable[dict]] = None,
                        *, dtype=None, corrupted: Optional[Callable] = None, n: Optional[int] = None) -> dict:
    """Accuracy and ECE of model on the clean data and under each (corruption, severity).

    model: logits for [0, 1] pixels (give mean / std when it takes normalized inputs: they are applied
    after the corruption). data: a Dataset, (images, labels) tensors or a DataLoader (its dataset is
    used, in index order), pixels in [0, 1]; n: its first n samples only. corruptions: names, families,
    "benchmark", "extra" or "all" (None: the 15 benchmark ones; ``robustops.corruptions.check_names``);
    each must be implemented (``available()``) unless ``corrupted`` gives its images: a function
    (corruption, severity) -> Dataset aligned with data's indices (e.g. CIFAR-10-C's arrays).
    severities: a subset of 1..5; seed: the corruptions' random draws; dtype: autocast of the forward.
    done: rows of an earlier run (kept as they are, not recomputed); on_row(row): called with each new
    row as soon as it is done (to write it). Returns :func:`summarize`'s dict ("clean_acc",
    "clean_ece", "accuracy"[c][s], "ece"[c][s], "per_corruption", "per_severity", "per_family",
    "mean_corruption_acc", "corruption_ece", "mean_over", "rows", ...) with "seed" and "seconds"."""
    names = check_names(corruptions)
    sev = tuple(check_severity(s) for s in severities)
    if not sev or len(set(sev)) != len(sev):
        raise ValueError(f"severities must be distinct ints in 1..5, got {tuple(severities)!r}")
    if corrupted is None and any(c not in available() for c in names):
        raise ValueError(f"corruptions: not implemented: {[c for c in names if c not in available()]}; "
                         f"available: {available()}")
    batch_size = _checks.check_int(batch_size, "batch_size", 1)
    rows = {(r["corruption"], int(r["severity"])): dict(r) for r in (done or ())}
    todo = [k for k in [("clean", 0)] + [(c, s) for c in names for s in sev] if k not in rows]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        for c, s in tqdm(todo, desc="corruptions", unit="row", disable=not progress):
            row = evaluate_row(model, data, c, s, seed=seed, batch_size=batch_size, device=device, mean=mean,
                               std=std, dtype=dtype, corrupted=corrupted, n=n)
            rows[c, s] = row
            if on_row is not None:
                on_row(row)
    finally:
        model.train(was_training)
    return {**summarize(rows.values(), names, sev), "seed": seed, "seconds": time.perf_counter() - t0}


def _errors(result: dict, c: str) -> List[float]:
    return [1.0 - float(v) for v in result["accuracy"][c].values()]


def mce(result: dict, baseline: dict) -> dict:
    """The corruption errors of result relative to baseline (two of :func:`corruption_accuracy`'s results,
    or their JSON): per corruption CE and relative CE, their means "mce" and "relative_mce" over the
    corruptions result's mean averages (the benchmark 15 when all were run), "undefined_ce" and
    "undefined_relative" (the corruptions left out of each mean: their baseline denominator is not
    positive). Every (c, s) of that set must be in baseline."""
    over = result.get("mean_corruptions") or list(result["accuracy"])
    sev = [str(s) for s in result["accuracy"][over[0]]]

    def table(res):
        return {c: {str(s): v for s, v in res["accuracy"].get(c, {}).items()} for c in over}

    mine, base = table(result), table(baseline)
    missing = [f"{c}/{s}" for c in over for s in sev if s not in base[c]]
    if missing:
        raise ValueError(f"baseline: no accuracy for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
                         f"evaluate the baseline on the same corruptions and severities")
    e_clean, b_clean = 1.0 - float(result["clean_acc"]), 1.0 - float(baseline["clean_acc"])
    ce, rel = {}, {}
    for c in over:
        e = [1.0 - float(mine[c][s]) for s in sev]
        b = [1.0 - float(base[c][s]) for s in sev]
        ce[c] = sum(e) / sum(b) if sum(b) > 0 else None
        denom = sum(v - b_clean for v in b)
        rel[c] = sum(v - e_clean for v in e) / denom if denom > 0 else None
    return {"ce": ce, "relative_ce": rel, "mce": _mean(v for v in ce.values() if v is not None),
            "relative_mce": _mean(v for v in rel.values() if v is not None),
            "undefined_ce": [c for c in over if ce[c] is None],
            "undefined_relative": [c for c in over if rel[c] is None], "over": list(over)}


def plot_heatmap(result: dict, path: str, title: Optional[str] = None) -> List[str]:
    """The accuracy per corruption (rows) and severity (columns), with each row's mean, as a heat map
    (PNG at path and a PDF beside it, robustops.plotting.plot_heatmap). Returns the paths written."""
    from .. import plotting

    sev = list(result["severities"])
    names = list(result["corruptions"])
    values = [[float(result["accuracy"][c][s]) for s in sev] + [float(result["per_corruption"][c])] for c in names]
    return plotting.plot_heatmap(path, values, names, [str(s) for s in sev] + ["mean"], xlabel="severity",
                                 title=title or f"accuracy under corruption (clean {result['clean_acc']:.1%})",
                                 colorbar="accuracy")
