"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019): batched CERTIFY and PREDICT, average
certified radius, certified-accuracy curves and the `robustops certify` command.

The smoothed classifier g(x) = argmax_c P(f(x + sigma*eps) = c), eps ~ N(0, I), is evaluated by Monte
Carlo. What makes it fast here:

- Many inputs share each forward pass. The noisy samples of one call form a single stream (all
  inputs' selection samples, then all inputs' estimation samples) cut into forward batches of exactly
  `batch_size` rows, so a batch can hold the tail of one input and the head of the next and no forward
  pass is ever partly empty.
- Noise is written once, already normalized and in the classifier's dtype / layout, by
  `robustops.gaussian_noise`; votes go straight into an int64 count table on the device with
  `robustops.count_votes_` (no argmax tensor). The host reads the table once per call.
- Noise depends only on (seed, phase, global input index, sample number): input i of a call uses
  `indices[i]` (default i) and its j-th sample of a phase with m samples is Philox sample
  `indices[i]*m + j` under a key derived from (seed, phase). So an input's result does not depend on
  batch_size, on which other inputs share its forward passes, or on how a dataset is split across
  processes. Selection, estimation and PREDICT use different keys: their draws are independent.
  Because consecutive indices give consecutive Philox samples, a run of consecutive inputs whose
  samples all fall in one batch is drawn by a single `gaussian_noise` call.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import special, stats

from . import ops

__all__ = ["Smooth", "CertifyResult", "PredictResult", "clopper_pearson_lower", "acr", "certified_accuracy",
           "plot_certified_accuracy", "STANDARD_RADII", "cli_certify_args", "cli_certify"]

ABSTAIN = -1

#: Radii at which `robustops certify` reports certified accuracy (Cohen et al.'s CIFAR-10 and ImageNet tables).
STANDARD_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)

# Philox key per Monte-Carlo phase, so that the phases' draws are independent.
_SELECTION, _ESTIMATION, _PREDICTION = 0, 1, 2
_MASK64 = (1 << 64) - 1


def _phase_seed(seed: int, phase: int) -> int:
    """A 63-bit Philox key for (seed, phase): splitmix64's finalizer, so nearby seeds and phases give
    unrelated keys."""
    z = (seed + (phase + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# ------------------------------------------------------------------------------- statistics

def clopper_pearson_lower(n_a, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion after
    n_a successes in n trials: the alpha quantile of Beta(n_a, n - n_a + 1), and 0 when n_a = 0.
    Vectorized over n_a (and n)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n_a.shape)
    out = np.zeros(n_a.shape, dtype=np.float64)
    pos = n_a > 0
    out[pos] = special.betaincinv(n_a[pos], n[pos] - n_a[pos] + 1.0, alpha)
    return out


def _binom_pvalue(n_a: int, n_b: int) -> float:
    return float(stats.binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue)


@dataclass
class CertifyResult:
    """Output of :meth:`Smooth.certify` for B inputs (CPU tensors).

    prediction: int64 [B], the certified class or -1 (abstain).
    radius: float64 [B], L2 radius sigma * Phi^-1(pA_lower) (0 where abstaining).
    counts: int64 [B, C], votes of the n estimation samples.
    selection_counts: int64 [B, C], votes of the n0 selection samples (they pick the class).
    pA_lower: float64 [B], the lower confidence bound on the chosen class's probability.
    """
    prediction: torch.Tensor
    radius: torch.Tensor
    counts: torch.Tensor
    selection_counts: torch.Tensor
    pA_lower: torch.Tensor


@dataclass
class PredictResult:
    """Output of :meth:`Smooth.predict` with ``return_details=True`` (CPU tensors).

    prediction: int64 [B], the top class or -1 (abstain); counts: int64 [B, C];
    pvalue: float64 [B], two-sided binomial-test p-value of the top two counts."""
    prediction: torch.Tensor
    counts: torch.Tensor
    pvalue: torch.Tensor


# ---------------------------------------------------------------------------------- checks

def _check_int(v, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_seed(seed) -> int:
    if seed is None:
        # From torch's default CPU generator: torch.manual_seed makes runs reproducible.
        return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return int(seed) & ((1 << 63) - 1)


def _channel_stat(v, name: str) -> Optional[torch.Tensor]:
    """mean / std as a float32 CPU tensor (a scalar or [C]), checked once here; each call moves it to
    the device once, so that no per-batch host-to-device copy stalls the stream."""
    if v is None:
        return None
    try:
        t = torch.as_tensor(v, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a float or a sequence / Tensor of per-channel floats, got {v!r}") from None
    if t.dim() > 1:
        raise ValueError(f"{name} must be a float or one value per channel, got shape {list(t.shape)}")
    if not bool(torch.isfinite(t).all()) or (name == "std" and not bool((t > 0).all())):
        raise ValueError(f"{name} must be finite{' and > 0' if name == 'std' else ''} for every channel, "
                         f"got {t.tolist()}")
    return t


_AUTOCAST = {None: None, "none": None, "fp32": None, "float32": None,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, torch.float16: torch.float16}


class Smooth:
    """The smoothed classifier g(x) = argmax_c P(base_classifier(x + sigma*eps) = c), eps ~ N(0, I).

    base_classifier: a module / callable mapping a batch [R, *input_shape] to logits [R, num_classes].
        Its train / eval mode is left as it is (call .eval() first).
    num_classes: int >= 2.  sigma: noise level > 0, in the units of x (pixels in [0, 1] for images).
    mean, std: optional per-channel normalization applied *after* the noise, fused into the noise
        kernel: for a classifier trained on (x - mean) / std of images x in [0, 1].
    autocast: None, "bf16" or "fp16" (or the torch dtype): run the classifier under torch.autocast
        and write the noisy batches in that dtype (the classifier's first layer would cast them anyway).
    channels_last: write the noisy batches in channels_last (4-D / 5-D inputs) and convert the
        classifier's parameters to channels_last, in place.
    input_shape: optional shape of one input (without the batch dimension), checked on every call.
    device: where the classifier runs; by default the device of its first parameter or buffer, else
        that of the inputs.
    """

    def __init__(self, base_classifier, num_classes: int, sigma: float, mean=None, std=None, *,
                 autocast=None, channels_last: bool = False, input_shape: Optional[Sequence[int]] = None,
                 device=None):
        if not callable(base_classifier):
            raise TypeError(f"base_classifier must be a module or callable, got {type(base_classifier).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)) or not 0.0 < sigma < math.inf:
            raise ValueError(f"sigma must be a float > 0, got {sigma!r}")
        if autocast not in _AUTOCAST:
            raise ValueError(f'autocast must be None, "bf16" or "fp16", got {autocast!r}')
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.mean = _channel_stat(mean, "mean")
        self.std = _channel_stat(std, "std")
        self.autocast = _AUTOCAST[autocast]
        self.channels_last = bool(channels_last)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if device is None and isinstance(base_classifier, torch.nn.Module):
            for t in list(base_classifier.parameters()) + list(base_classifier.buffers()):
                device = t.device
                break
        self.device = None if device is None else torch.device(device)
        if self.channels_last and isinstance(base_classifier, torch.nn.Module):
            base_classifier.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------ public

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                seed: Optional[int] = None, indices=None) -> CertifyResult:
        """Cohen et al.'s CERTIFY for a batch of inputs x [B, ...].

        For each input, n0 noisy samples choose the class cA (top count), n fresh samples count its
        votes nA, and pA_lower = Clopper-Pearson one-sided lower bound at level alpha. If
        pA_lower >= 1/2 the prediction is cA with L2 radius sigma * Phi^-1(pA_lower) (g is constant
        on that ball with probability >= 1 - alpha), otherwise it abstains (-1, radius 0).

        batch_size: noisy samples per forward pass (inputs share passes). seed: makes the run
        reproducible (None: drawn from torch's generator). indices: the global index of each input
        ([B] ints, default 0..B-1); an input's noise depends only on (seed, its index), so give each
        input of a dataset its own index. One host synchronization per call."""
        x, B = self._check_x(x)
        n0 = _check_int(n0, "n0")
        n = _check_int(n, "n")
        alpha = _check_alpha(alpha)
        batch_size = _check_int(batch_size, "batch_size")
        seed = _check_seed(seed)
        idx = self._check_indices(indices, B)
        counts = self._sample(x, idx, [(n0, _SELECTION), (n, _ESTIMATION)], batch_size, seed)
        selection, estimation = counts[:B], counts[B:]

        c_a = selection.argmax(axis=1)  # ties -> lowest class, as torch.argmax
        n_a = estimation[np.arange(B), c_a]
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * stats.norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
        return CertifyResult(
            prediction=torch.from_numpy(np.where(certified, c_a, ABSTAIN).astype(np.int64)),
            radius=torch.from_numpy(radius.astype(np.float64)),
            counts=torch.from_numpy(estimation.copy()),
            selection_counts=torch.from_numpy(selection.copy()),
            pA_lower=torch.from_numpy(p_lower))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                indices=None, return_details: bool = False):
        """Cohen et al.'s PREDICT for a batch of inputs x [B, ...]: n noisy samples per input; returns
        the top class when the two-sided binomial test of the top two counts (nA, nB) at p = 1/2 has
        p-value <= alpha, else -1. The probability of returning a class other than g(x) is at most
        alpha. Returns int64 [B], or a PredictResult with counts and p-values when return_details.
        seed, indices, batch_size: as in certify. One host synchronization per call."""
        x, B = self._check_x(x)
        n = _check_int(n, "n")
        alpha = _check_alpha(alpha)
        batch_size = _check_int(batch_size, "batch_size")
        seed = _check_seed(seed)
        idx = self._check_indices(indices, B)
        counts = self._sample(x, idx, [(n, _PREDICTION)], batch_size, seed)

        order = np.argsort(-counts, axis=1, kind="stable")  # stable: ties -> lowest class first
        rows = np.arange(B)
        top, n_a, n_b = order[:, 0], counts[rows, order[:, 0]], counts[rows, order[:, 1]]
        pvalue = np.array([_binom_pvalue(a, b) for a, b in zip(n_a, n_b)], dtype=np.float64)
        prediction = torch.from_numpy(np.where(pvalue <= alpha, top, ABSTAIN).astype(np.int64))
        if return_details:
            return PredictResult(prediction=prediction, counts=torch.from_numpy(counts),
                                 pvalue=torch.from_numpy(pvalue))
        return prediction

    # ---------------------------------------------------------------------------- internals

    def _check_x(self, x) -> Tuple[torch.Tensor, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, ...], got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must hold floating-point inputs, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            if tuple(x.shape) == self.input_shape:
                raise ValueError(f"x must be a batch [B, {', '.join(map(str, self.input_shape))}], got one input of "
                                 f"shape {list(x.shape)}: add the batch dimension (x.unsqueeze(0))")
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}] (input_shape), "
                             f"got {list(x.shape)}")
        if x.dim() < 2:
            raise ValueError(f"x must be a batch of inputs [B, ...] with at least 2 dimensions, got {x.dim()}-D "
                             f"shape {list(x.shape)}")
        if self.channels_last and x.dim() not in (4, 5):
            raise ValueError(f"channels_last needs 4-D or 5-D inputs x, got x of shape {list(x.shape)}")
        if x.dtype == torch.float64:
            x = x.float()
        if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            x = x.contiguous()  # the slices x[i:j] handed to gaussian_noise must be dense
        device = self.device or x.device
        return x.to(device), x.shape[0]

    @staticmethod
    def _check_indices(indices, B: int) -> List[int]:
        if indices is None:
            return list(range(B))
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        idx = [int(i) for i in indices]
        if len(idx) != B:
            raise ValueError(f"indices must hold one index per input (B = {B}), got {len(idx)}")
        if any(i < 0 for i in idx):
            raise ValueError(f"indices must be non-negative, got {min(idx)}")
        return idx

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            logits = self.base_classifier(batch)
        else:
            with torch.autocast(device_type=batch.device.type, dtype=self.autocast):
                logits = self.base_classifier(batch)
        if not isinstance(logits, torch.Tensor) or logits.shape != (batch.shape[0], self.num_classes):
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"base_classifier must return logits [R, num_classes] = [{batch.shape[0]}, "
                             f"{self.num_classes}] for a batch of R = {batch.shape[0]} inputs, got {got}; "
                             f"check num_classes")
        return logits

    def _sample(self, x: torch.Tensor, idx: List[int], phases: List[Tuple[int, int]], batch_size: int,
                seed: int) -> np.ndarray:
        """Votes of the base classifier on noisy copies of x: int64 [len(phases)*B, C], row p*B + i
        for input i in phase p (phase = (samples per input, Philox phase)).

        The samples of all phases and inputs form one stream in row order; each forward pass takes the
        next batch_size of them. Everything stays on the device until the final copy to the host."""
        B, C = x.shape[0], self.num_classes
        counts = torch.zeros(len(phases) * B, C, dtype=torch.int64, device=x.device)
        if B == 0:
            return counts.cpu().numpy()
        keys = [_phase_seed(seed, p) for _, p in phases]
        noise_dtype = self.autocast or x.dtype
        mean = None if self.mean is None else self.mean.to(x.device)
        std = None if self.std is None else self.std.to(x.device)
        # Walk the stream: (row, first sample, count) pieces of each batch of batch_size samples.
        pieces: List[Tuple[int, int, int]] = []
        filled = 0
        with torch.inference_mode():
            for row in range(len(phases) * B):
                m = phases[row // B][0]
                j = 0
                while j < m:
                    take = min(m - j, batch_size - filled)
                    pieces.append((row, j, take))
                    filled += take
                    j += take
                    if filled == batch_size:
                        self._run_batch(x, idx, phases, keys, pieces, counts, noise_dtype, mean, std)
                        pieces, filled = [], 0
            if pieces:
                self._run_batch(x, idx, phases, keys, pieces, counts, noise_dtype, mean, std)
        return counts.cpu().numpy()  # the one host synchronization

    def _run_batch(self, x, idx, phases, keys, pieces, counts, noise_dtype, mean, std) -> None:
        B = x.shape[0]
        # The pieces of a batch hold consecutive count rows (the stream's order).
        # Noise: one gaussian_noise call per run of whole inputs of one phase with consecutive global
        # indices (their Philox samples are consecutive), one per partial input.
        noise = []
        k = 0
        while k < len(pieces):
            row, j, take = pieces[k]
            p, i = divmod(row, B)
            m = phases[p][0]
            end = k + 1
            if take == m:
                while (end < len(pieces) and pieces[end][2] == m and pieces[end][0] // B == p
                       and idx[i + end - k] == idx[i] + end - k):
                    end += 1
            noise.append(ops.gaussian_noise(x[i:i + end - k], take, self.sigma, seed=keys[p], offset=idx[i] * m + j,
                                            mean=mean, std=std, out_dtype=noise_dtype,
                                            channels_last=self.channels_last))
            k = end
        batch = noise[0] if len(noise) == 1 else torch.cat(noise)
        logits = self._forward(batch)
        # Votes: pieces hold consecutive count rows; one count_votes_ per run of equal-sized pieces.
        k = start = 0
        while k < len(pieces):
            end = k + 1
            while end < len(pieces) and pieces[end][2] == pieces[k][2]:
                end += 1
            rows = (end - k) * pieces[k][2]
            ops.count_votes_(logits[start:start + rows], counts[pieces[k][0]:pieces[k][0] + end - k])
            start += rows
            k = end


# -------------------------------------------------------------------------- ACR, curves, plot

def _as_numpy(v, name: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per input), got shape {list(a.shape)}")
    return a


def _radius_correct(radius, correct) -> Tuple[np.ndarray, np.ndarray]:
    r = _as_numpy(radius, "radius").astype(np.float64)
    c = _as_numpy(correct, "correct").astype(bool)
    if r.shape != c.shape:
        raise ValueError(f"radius and correct must have the same length, got {r.shape[0]} and {c.shape[0]}")
    return r, c


def acr(radius, correct) -> float:
    """Average certified radius: mean over inputs of the radius where the (non-abstaining) prediction
    is correct and 0 elsewhere. radius, correct: 1-D tensors / arrays / lists of one value per input."""
    r, c = _radius_correct(radius, correct)
    return float(np.where(c, r, 0.0).mean()) if r.size else 0.0


def certified_accuracy(radius, correct, radii):
    """Certified accuracy at each radius in radii: the fraction of inputs predicted correctly with a
    certified radius >= r. A float for a scalar radii, else a float64 numpy array."""
    r, c = _radius_correct(radius, correct)
    rs = np.asarray(radii, dtype=np.float64)
    if r.size == 0:
        out = np.zeros(rs.shape)
    else:
        out = (c[None, :] & (r[None, :] >= rs.reshape(-1, 1))).mean(axis=1).reshape(rs.shape)
    return float(out) if out.ndim == 0 else out


def plot_certified_accuracy(path: str, curves, max_radius: Optional[float] = None, title: Optional[str] = None) -> str:
    """Certified accuracy against radius, written as a PNG to path (matplotlib's Agg canvas; pyplot's
    global state is not touched). curves: (radius, correct) for one curve, or {label: (radius, correct)}.
    Returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(curves, dict):
        curves = {None: curves}
    data = {label: _radius_correct(*rc) for label, rc in curves.items()}
    top = max_radius
    if top is None:
        top = max([float(r[c].max()) for r, c in data.values() if c.any()] + [0.0]) * 1.05 or 1.0
    grid = np.linspace(0.0, top, 400)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (r, c) in data.items():
        ax.plot(grid, certified_accuracy(r, c, grid), label=label)
    ax.set_xlabel("radius (L2)")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if any(label is not None for label in data):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------ the CLI

TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def _parse_row(line: str) -> Optional[int]:
    """The idx of a complete TSV row, or None if the line is not one."""
    f = line.split("\t")
    if len(f) != 6:
        return None
    try:
        int(f[1]), int(f[2]), float(f[3]), int(f[4]), float(f[5])
        return int(f[0])
    except ValueError:
        return None


def _read_tsv(path: str) -> Tuple[Dict[int, str], int]:
    """The complete rows of a certify TSV ({idx: line}) and the length in bytes of the valid prefix
    (header and complete rows; 0 when even the header is incomplete). A row cut short by a kill, and
    anything after it, is not valid."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb") as fh:
        data = fh.read()
    head = (TSV_HEADER + "\n").encode()
    if not data.startswith(head):
        if head.startswith(data):
            return {}, 0  # killed while writing the header
        raise ValueError(f"{path!r} exists but is not a robustops certify TSV (its first line is not "
                         f"{TSV_HEADER!r}); remove it or choose another --outfile")
    rows: Dict[int, str] = {}
    valid = len(head)
    lines = data[len(head):].split(b"\n")
    for raw in lines[:-1]:  # the last piece has no newline: empty or a partial row
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            break
        idx = _parse_row(line)
        if idx is None:
            break
        rows.setdefault(idx, line)
        valid += len(raw) + 1
    return rows, valid


def _part_path(outfile: str, rank: int) -> str:
    return f"{outfile}.rank{rank}.part"


def _part_files(outfile: str) -> List[str]:
    return sorted(glob.glob(glob.escape(outfile) + ".rank*.part"))


def _open_rows_file(path: str, resume: bool):
    """A TSV opened for appending rows: with resume, what is there is kept up to its last complete
    row; otherwise it starts empty. Returns the file handle."""
    valid = _read_tsv(path)[1] if resume else 0
    if valid:
        with open(path, "r+b") as fh:
            fh.truncate(valid)
        return open(path, "a", buffering=1)
    fh = open(path, "w", buffering=1)
    fh.write(TSV_HEADER + "\n")
    fh.flush()
    return fh


def _merge(outfile: str) -> List[str]:
    """Rows of outfile and of every rank's part file, one per idx, sorted by idx, written atomically to
    outfile; part files are removed. Returns the rows."""
    rows = _read_tsv(outfile)[0]
    parts = _part_files(outfile)
    for p in parts:
        for idx, line in _read_tsv(p)[0].items():
            rows.setdefault(idx, line)
    lines = [rows[i] for i in sorted(rows)]
    tmp = f"{outfile}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(TSV_HEADER + "\n")
        for line in lines:
            fh.write(line + "\n")
    os.replace(tmp, outfile)
    for p in parts:
        os.remove(p)
    return lines


def _split_normalize(model):
    """(model, mean, std): a leading robustops.models.Normalize is taken out of the model so that the
    noise kernel applies it while writing the noisy batch (one pass over memory fewer)."""
    from .models import Normalize

    if isinstance(model, torch.nn.Sequential) and len(model) >= 2 and isinstance(model[0], Normalize):
        rest = list(model)[1:]
        body = rest[0] if len(rest) == 1 else torch.nn.Sequential(*rest)
        return body, model[0].mean.flatten().tolist(), model[0].std.flatten().tolist()
    return model, None, None


def _checkpoint_meta(path: str, model) -> dict:
    """Entries of a robustops checkpoint besides the weights (mean, std, sigma, ...), if it is one."""
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain checkpoint: no metadata
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if k in ("mean", "std", "sigma", "method", "model")}


def cli_certify_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", "--ckpt", required=True,
                   help="model file: a robustops checkpoint (robustops train / save_checkpoint), a state dict "
                        "(give --model), a TorchScript or a torch.export file")
    g.add_argument("--model", default=None, help="model name for a raw state dict (small_cnn, preact_resnet18, "
                                                 "resnet20, resnet110, ...)")
    g.add_argument("--data", "--dataset", default="digits",
                   help='"digits" (embedded), a .npz file, "cifar10:DIR" or "imagefolder:DIR"; read from local '
                        "disk, never downloaded (default digits)")
    g.add_argument("--split", default="test", help="train or test (default test)")
    g.add_argument("--normalize", default="auto", choices=("auto", "data", "none"),
                   help="input normalization fused into the noise: auto = the checkpoint's mean/std or the "
                        "model's leading Normalize layer (else none); data = the dataset's statistics")
    g = p.add_argument_group("CERTIFY (Cohen et al. 2019)")
    g.add_argument("--sigma", type=float, default=None,
                   help="noise level (default: the sigma the checkpoint was trained with)")
    g.add_argument("--N0", type=int, default=100, help="selection samples per input (default 100)")
    g.add_argument("--N", type=int, default=100_000, help="estimation samples per input (default 100000)")
    g.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    g.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass (default 1000)")
    g.add_argument("--skip", type=int, default=1, help="certify every skip-th input (default 1)")
    g.add_argument("--max", type=int, default=-1, help="stop before input index max (default: all)")
    g.add_argument("--inputs-per-call", type=int, default=None,
                   help="inputs certified together between host syncs and row writes (default: enough for "
                        "about 4 forward passes)")
    g = p.add_argument_group("output")
    g.add_argument("--outfile", "-o", required=True, help="TSV with columns idx label predict radius correct time")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the complete rows of --outfile, certify the rest")
    g.add_argument("--plot", default=None, help="also write certified accuracy against radius to this PNG")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--amp", "--autocast", dest="amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast dtype of the base classifier (default none)")
    g.add_argument("--channels-last", action="store_true", help="channels_last noisy batches and model")
    g.add_argument("--seed", type=int, default=0, help="noise seed; each input's noise depends only on "
                                                        "(seed, idx) (default 0)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(msg: str) -> int:
    print(f"robustops certify: error: {msg}", file=sys.stderr)
    return 2


def _init_distributed(device_arg: Optional[str]):
    """(rank, world, device, created): torchrun's environment, a gloo group for the few barriers (with a
    long timeout: ranks wait for each other only at the end of a long run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device_arg) if device_arg else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return 0, 1, dev, False
    import torch.distributed as dist

    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), dev, created


def cli_certify(args) -> int:
    from . import data as rodata
    from . import models as romodels

    for name, v, lo in (("--N0", args.N0, 1), ("--N", args.N, 1), ("--batch", args.batch, 1), ("--skip", args.skip, 1),
                        ("--workers", args.workers, 0)):
        if v < lo:
            return _fail(f"{name} must be >= {lo}, got {v}")
    if not 0.0 < args.alpha < 1.0:
        return _fail(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.inputs_per_call is not None and args.inputs_per_call < 1:
        return _fail(f"--inputs-per-call must be >= 1, got {args.inputs_per_call}")
    try:
        dataset, info = rodata.get_dataset(args.data, args.split)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        return _fail(f"--data {args.data!r}: {e}")
    C, H, W = info["input_shape"]
    kwargs = {"num_classes": int(info["num_classes"]), "in_channels": C, "input_size": H} if args.model else {}
    try:
        model = romodels.load_model(args.checkpoint, name=args.model, **kwargs)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        return _fail(f"--checkpoint {args.checkpoint!r}: {e}")
    meta = _checkpoint_meta(args.checkpoint, model)
    sigma = args.sigma if args.sigma is not None else meta.get("sigma") if meta.get("method") == "gaussian" else None
    if sigma is None:
        return _fail("--sigma is required (the checkpoint does not say which noise level it was trained with)")
    if not sigma > 0:
        return _fail(f"--sigma must be > 0, got {sigma}")
    mean = std = None
    if args.normalize == "auto":
        if meta.get("mean") is not None and meta.get("std") is not None:
            mean, std = list(meta["mean"]), list(meta["std"])
        else:
            model, mean, std = _split_normalize(model)
    elif args.normalize == "data":
        mean, std = info.get("mean"), info.get("std")

    rank, world, device, created = _init_distributed(args.device)
    try:
        return _certify_run(args, dataset, info, model, float(sigma), mean, std, rank, world, device)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _certify_run(args, dataset, info, model, sigma, mean, std, rank, world, device) -> int:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from . import data as rodata

    def barrier():
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    outfile = args.outfile
    os.makedirs(os.path.dirname(os.path.abspath(outfile)), exist_ok=True)
    stop = len(dataset) if args.max is None or args.max < 0 else min(args.max, len(dataset))
    selected = list(range(0, stop, args.skip))
    if not args.resume and rank == 0:
        for p in _part_files(outfile) + ([outfile] if os.path.exists(outfile) else []):
            os.remove(p)
    barrier()
    # Rows already certified: in the merged file and in any rank's part file (from a run with any
    # number of processes). This rank then certifies its share of the rest.
    try:
        done = set(_read_tsv(outfile)[0]) if args.resume else set()
        if args.resume:
            for p in _part_files(outfile):
                done.update(_read_tsv(p)[0])
    except ValueError as e:
        return _fail(str(e))
    mine = [i for i in (rodata.shard(selected, rank, world) if world > 1 else selected) if i not in done]
    barrier()  # everyone has read the part files before any is truncated

    model.to(device)  # load_model returns it in eval mode (exported programs refuse .eval())
    smooth = Smooth(model, int(info["num_classes"]), sigma, mean=mean, std=std,
                    autocast=None if args.amp == "none" else args.amp, channels_last=args.channels_last,
                    input_shape=tuple(info["input_shape"]), device=device)
    k = args.inputs_per_call or max(1, min(256, math.ceil(4 * args.batch / (args.N0 + args.N))))
    if rank == 0:
        print(f"robustops certify: {info['name']} {args.split} ({len(selected)} inputs, {len(selected) - len(done)} "
              f"to go), sigma {sigma:g}, N0 {args.N0}, N {args.N}, alpha {args.alpha:g}, batch {args.batch}, "
              f"{world} process(es) on {device}", flush=True)
    out = _open_rows_file(outfile if world == 1 else _part_path(outfile, rank), args.resume)
    bar = tqdm(total=len(mine), desc="certify", unit="input", disable=args.no_progress or rank != 0,
               dynamic_ncols=True)
    try:
        loader = DataLoader(Subset(dataset, mine), batch_size=k, shuffle=False, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        n_done = n_correct = 0
        pos = 0
        for x, y in loader:
            ids = mine[pos:pos + x.shape[0]]
            pos += x.shape[0]
            t0 = time.perf_counter()
            try:
                res = smooth.certify(x.to(device, non_blocking=True), args.N0, args.N, args.alpha, args.batch,
                                     seed=args.seed, indices=ids)
            except ValueError as e:
                return _fail(str(e))
            per_input = (time.perf_counter() - t0) / len(ids)
            for j, idx in enumerate(ids):
                label, pred = int(y[j]), int(res.prediction[j])
                out.write(f"{idx}\t{label}\t{pred}\t{float(res.radius[j]):.6g}\t{int(pred == label)}\t"
                          f"{per_input:.4f}\n")
                out.flush()
                n_correct += int(pred == label)
            n_done += len(ids)
            bar.update(len(ids))
            bar.set_postfix(acc=f"{n_correct / n_done:.3f}")
    finally:
        bar.close()
        out.close()
    barrier()
    if rank == 0:
        lines = _merge(outfile)
        radius = np.array([float(line.split("\t")[3]) for line in lines])
        correct = np.array([int(line.split("\t")[4]) for line in lines], dtype=bool)
        acc = certified_accuracy(radius, correct, STANDARD_RADII)
        print(f"{len(lines)} inputs certified -> {outfile}")
        print(f"ACR {acr(radius, correct):.4f}")
        print("certified accuracy: " + "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(STANDARD_RADII, acc)))
        if args.plot:
            plot_certified_accuracy(args.plot, {f"sigma = {sigma:g}": (radius, correct)},
                                    title=f"{info['name']}: N={args.N}, alpha={args.alpha:g}")
            print(f"plot -> {args.plot}")
    barrier()
    return 0
