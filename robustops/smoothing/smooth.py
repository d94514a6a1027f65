"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019): batched CERTIFY and PREDICT.

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
  `indices[i]` (default i) and its j-th sample of a phase with m samples is noisy row
  `indices[i]*m + j` under the key `_rng.derive_seed(seed, phase + 1)`. So an input's result does not
  depend on batch_size, on which other inputs share its forward passes, or on how a dataset is split
  across processes. Selection, estimation and PREDICT use different keys: their draws are independent.
  A forward batch, however many inputs and phases it holds, is one noise launch and one vote count
  (robustops.smoothing.votes).

Coming from Cohen et al.'s code (locuslab/smoothing), where ``certify(x, n0, n, alpha, batch)`` takes
one input x [C, H, W] and returns ``(prediction, radius)``: here x is a batch [B, C, H, W], so write
``prediction, radius = smooth.certify(x[None], n0, n, alpha, batch)`` (a result for one input unpacks
to an int and a float) and ``int(smooth.predict(x[None], n, alpha, batch)[0])`` for their
``predict``. With ``Smooth(..., input_shape=(C, H, W))``, x [C, H, W] itself is taken as a batch of
one; without input_shape a lone input cannot be told from a batch, and when the classifier then fails
on it the error says to add the batch dimension (see :meth:`Smooth.certify`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from .. import _checks, _rng
from ..models import Normalize
from ..models.video import model_to_channels_last
from .graph import VoteGraphs, model_fingerprint
from .sequential import (DEFAULT_GROWTH, DEFAULT_N0, DEFAULT_N_MIN, DEFAULT_PRECISION, DEFAULT_SCHEDULE, DEFAULT_TEST,
                         clopper_pearson_lower)
from .stream import SequentialResult, certify_stream, check_radii
from .votes import ESTIMATION, PREDICTION, SELECTION, Piece, VoteSampler, phase_seed

__all__ = ["Smooth", "CertifyResult", "PredictResult", "clopper_pearson_lower", "ABSTAIN", "phase_seed",
           "SELECTION", "ESTIMATION", "PREDICTION"]

ABSTAIN = -1


# ------------------------------------------------------------------------------- statistics

def _binom_pvalue(n_a: int, n_b: int) -> float:
    return float(stats.binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue)


def _warn_nonfinite(indices: List[int]) -> None:
    """The one warning about inputs with NaN / Inf values (they abstain), at the caller of certify / predict."""
    if indices:
        warnings.warn(f"Smooth: inputs with NaN / Inf values abstain (indices {indices[:10]}"
                      f"{' ...' if len(indices) > 10 else ''})", stacklevel=4)


class _LogitsShapeError(ValueError):
    """The base classifier returned something other than logits [R, num_classes]."""


def _first_conv(model):
    """The first Conv1d / Conv2d / Conv3d among an nn.Module's submodules (registration order), or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return m
    return None


def _is_out_of_memory(e: BaseException) -> bool:
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                if isinstance(t, type))
    return (bool(oom) and isinstance(e, oom)) or "out of memory" in str(e).lower() \
        or "can't allocate memory" in str(e).lower()


@dataclass
class CertifyResult:
    """Output of :meth:`Smooth.certify` for B inputs (CPU tensors).

    prediction: int64 [B], the certified class or -1 (abstain).
    radius: float64 [B], L2 radius sigma * Phi^-1(pA_lower) (0 where abstaining).
    counts: int64 [B, C], votes of the n estimation samples.
    selection_counts: int64 [B, C], votes of the n0 selection samples (they pick the class).
    pA_lower: float64 [B], the lower confidence bound on the chosen class's probability.
    nan_votes: int64 [B], estimation samples whose logits held a NaN: a vote for no class (they count
      among the n samples but never for cA, so they can only lower pA_lower).
    selection_nan_votes: int64 [B], the same among the n0 selection samples.
    finite_input: bool [B], whether the input's values were all finite (a NaN / Inf input abstains).
    """
    prediction: torch.Tensor
    radius: torch.Tensor
    counts: torch.Tensor
    selection_counts: torch.Tensor
    pA_lower: torch.Tensor
    nan_votes: Optional[torch.Tensor] = None
    selection_nan_votes: Optional[torch.Tensor] = None
    finite_input: Optional[torch.Tensor] = None

    def __iter__(self):
        """``prediction, radius = result``, as Cohen et al.'s certify returns them: for one input
        (B = 1) a Python int (-1: abstain) and a float, otherwise the [B] tensors."""
        if self.prediction.numel() == 1 and self.radius.numel() == 1:
            return iter((int(self.prediction.reshape(-1)[0]), float(self.radius.reshape(-1)[0])))
        return iter((self.prediction, self.radius))


@dataclass
class PredictResult:
    """Output of :meth:`Smooth.predict` with ``return_details=True`` (CPU tensors).

    prediction: int64 [B], the top class or -1 (abstain); counts: int64 [B, C];
    pvalue: float64 [B], two-sided binomial-test p-value of the top two counts; nan_votes: int64 [B],
    samples whose logits held a NaN (votes for no class); finite_input: bool [B]."""
    prediction: torch.Tensor
    counts: torch.Tensor
    pvalue: torch.Tensor
    nan_votes: Optional[torch.Tensor] = None
    finite_input: Optional[torch.Tensor] = None


class Smooth:
    """The smoothed classifier g(x) = argmax_c P(base_classifier(x + sigma*eps) = c), eps ~ N(0, I).

    base_classifier: a module / callable mapping a batch [R, *input_shape] to logits [R, num_classes].
        Its train / eval mode is left as it is (call .eval() first).
    num_classes: int >= 2.  sigma: noise level > 0, in the units of x (pixels in [0, 1] for images).
    mean, std: optional per-channel normalization applied *after* the noise, fused into the noise
        kernel: for a classifier trained on (x - mean) / std of images x in [0, 1]. The channels are
        dim 1 ([B, C, ...]); for videos [B, T, C, H, W] with several channels put
        ``models.Normalize(mean, std, channel_dim=2)`` in front of the classifier instead.
    autocast: None, "bf16" or "fp16" (or the torch dtype): run the classifier under torch.autocast
        and write the noisy batches in that dtype (the classifier's first layer would cast them anyway).
    channels_last: write the noisy batches in channels_last (4-D / 5-D inputs: torch's channels_last /
        channels_last_3d, channels at dim 1) and convert the classifier's parameters to channels_last
        (Conv3d weights to channels_last_3d), in place. 5-D inputs are taken as volumes [B, C, D, H, W]:
        for a video [B, T, C, H, W] torch's channels_last_3d puts the *frames* innermost, not the video
        channels-last layout of ``models.video.to_channels_last`` (channels innermost) that training and
        the attacks keep; the noise kernels write only torch's layouts, so leave channels_last off for
        videos (the noise is the same either way: it is drawn by logical index).
    input_shape: optional shape of one input (without the batch dimension), checked on every call;
        with it, an x of exactly that shape (one input, as Cohen et al.'s certify takes it) is taken
        as a batch of one.
    device: where the classifier runs; by default the device of its first parameter or buffer, else
        that of the inputs.
    graph: on CUDA, run every full forward batch of a single input's noisy copies (noise, forward,
        vote count) as a replay of a CUDA graph captured once (robustops.smoothing.graph): the same
        noise and votes as the eager path without its launch overhead, which dominates on small
        models. The classifier must be capturable (no host synchronization in its forward); where
        capture fails, a warning and the eager path. Inputs whose samples do not fill a batch, and
        the remainders, run eagerly. Ignored (with a warning) on CPU. Not with ``context``.

    Per-input context: ``certify`` / ``predict`` take an optional ``context``, a tensor [B, ...] or a
    tuple / list of tensors [B, ...] (one row per input of x). The noisy rows of many inputs share each
    forward pass, so the base classifier is then called as ``base_classifier(noisy, context_rows)``:
    context_rows has the structure of ``context`` and holds, for each noisy row, the row of the input it
    belongs to (``context[i]`` repeated over input i's samples in that batch). Latent smoothing
    (``robustops.smoothing.latent``) smooths over latent codes this way, with the image as context.
    Without context the classifier is called as ``base_classifier(noisy)``, as always.
    """

    def __init__(self, base_classifier, num_classes: int, sigma: float, mean=None, std=None, *,
                 autocast=None, channels_last: bool = False, input_shape: Optional[Sequence[int]] = None,
                 device=None, graph: bool = False):
        if not callable(base_classifier):
            raise TypeError(f"base_classifier must be a module or callable, got {type(base_classifier).__name__}")
        self.base_classifier = base_classifier
        self.num_classes = _checks.check_int(num_classes, "num_classes", 2)
        self.sigma = _checks.check_number(sigma, "sigma", 0.0, strict=True)
        # Fused into the noise kernel rather than run as a layer: one pass over memory fewer.
        self.normalize = None if mean is None and std is None else Normalize(mean, std)
        self.autocast = _checks.autocast_dtype(autocast, "autocast")
        self.channels_last = bool(channels_last)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if device is None and isinstance(base_classifier, torch.nn.Module):
            for t in list(base_classifier.parameters()) + list(base_classifier.buffers()):
                device = t.device
                break
        self.device = None if device is None else torch.device(device)
        if self.channels_last and isinstance(base_classifier, torch.nn.Module):
            model_to_channels_last(base_classifier)  # Conv3d weights: channels_last_3d
        self.graph = bool(graph)
        self._graphs = VoteGraphs()
        self._warned_graph = False

    # ------------------------------------------------------------------------------ public

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                seed: Optional[int] = None, indices=None, context=None) -> CertifyResult:
        """Cohen et al.'s CERTIFY for a batch of inputs x [B, ...].

        One input: ``prediction, radius = smooth.certify(x[None], n0, n, alpha, batch_size)`` gives
        an int (-1: abstain) and a float, as Cohen et al.'s ``certify(x, ...)`` does (see
        CertifyResult.__iter__; for B > 1 the same unpacking gives the [B] tensors). The rule for a
        lone input x [C, H, W] without its batch dimension: with ``input_shape`` given to Smooth and
        x.shape == input_shape, x is a batch of one. Without input_shape, x is always read as a
        batch (x [C, H, W] = C inputs of shape [H, W]: never guessed, since a batch of C
        one-channel inputs looks the same); when the base classifier then fails on the noisy batch
        and x looks like one input (x is 2-D or 3-D, or x is the shape of one input of the
        classifier's first convolution), the error is a ValueError that says to add the batch
        dimension, with the classifier's own error attached.

        For each input, n0 noisy samples choose the class cA (top count), n fresh samples count its
        votes nA, and pA_lower = Clopper-Pearson one-sided lower bound at level alpha. If
        pA_lower >= 1/2 the prediction is cA with L2 radius sigma * Phi^-1(pA_lower) (g is constant
        on that ball with probability >= 1 - alpha), otherwise it abstains (-1, radius 0).

        batch_size: noisy samples per forward pass (inputs share passes). seed: makes the run
        reproducible (None: drawn from torch's generator). indices: the global index of each input
        ([B] ints, default 0..B-1); an input's noise depends only on (seed, its index), so give each
        input of a dataset its own index. One host synchronization per call. context: optional
        per-input context for the base classifier (see the class docstring).

        A noisy sample whose logits hold a NaN is a vote for no class (counted in ``nan_votes``), so
        NaN never wins: it only lowers pA_lower. An input with NaN / Inf values abstains, with a
        warning."""
        x, B = self._check_x(x)
        n0 = _checks.check_int(n0, "n0", 1)
        n = _checks.check_int(n, "n", 1)
        alpha = _checks.check_probability(alpha, "alpha")
        batch_size = _checks.check_int(batch_size, "batch_size", 1)
        seed = _rng.resolve_seed(seed)
        idx = self._check_indices(indices, B)
        context = self._check_context(context, B, x.device)
        counts, nan, finite = self._sample(x, idx, [(n0, SELECTION), (n, ESTIMATION)], batch_size, seed, context)
        selection, estimation = counts[:B], counts[B:]

        c_a = selection.argmax(axis=1)  # ties -> lowest class, as torch.argmax
        n_a = estimation[np.arange(B), c_a]
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        # no class from the selection samples (all NaN), or a non-finite input: abstain
        p_lower = np.where(finite & (selection.sum(axis=1) > 0), p_lower, 0.0)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * stats.norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
        return CertifyResult(
            prediction=torch.from_numpy(np.where(certified, c_a, ABSTAIN).astype(np.int64)),
            radius=torch.from_numpy(radius.astype(np.float64)),
            counts=torch.from_numpy(estimation.copy()),
            selection_counts=torch.from_numpy(selection.copy()),
            pA_lower=torch.from_numpy(p_lower),
            nan_votes=torch.from_numpy(nan[B:].copy()), selection_nan_votes=torch.from_numpy(nan[:B].copy()),
            finite_input=torch.from_numpy(finite.copy()))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                indices=None, return_details: bool = False, context=None):
        """Cohen et al.'s PREDICT for a batch of inputs x [B, ...]: n noisy samples per input; returns
        the top class when the two-sided binomial test of the top two counts (nA, nB) at p = 1/2 has
        p-value <= alpha, else -1. The probability of returning a class other than g(x) is at most
        alpha. Returns int64 [B], or a PredictResult with counts and p-values when return_details.
        seed, indices, batch_size, context: as in certify. One host synchronization per call. NaN logits are
        votes for no class; an input with NaN / Inf values abstains, with a warning.

        One input, as Cohen et al.'s ``predict(x, ...)`` returning an int:
        ``int(smooth.predict(x[None], n, alpha, batch_size)[0])``. A lone x [C, H, W] is handled
        as in certify (a batch of one when x.shape == input_shape)."""
        x, B = self._check_x(x)
        n = _checks.check_int(n, "n", 1)
        alpha = _checks.check_probability(alpha, "alpha")
        batch_size = _checks.check_int(batch_size, "batch_size", 1)
        seed = _rng.resolve_seed(seed)
        idx = self._check_indices(indices, B)
        context = self._check_context(context, B, x.device)
        counts, nan, finite = self._sample(x, idx, [(n, PREDICTION)], batch_size, seed, context)

        order = np.argsort(-counts, axis=1, kind="stable")  # stable: ties -> lowest class first
        rows = np.arange(B)
        top, n_a, n_b = order[:, 0], counts[rows, order[:, 0]], counts[rows, order[:, 1]]
        pvalue = np.array([_binom_pvalue(a, b) if a + b > 0 else 1.0 for a, b in zip(n_a, n_b)], dtype=np.float64)
        pvalue = np.where(finite, pvalue, 1.0)
        prediction = torch.from_numpy(np.where(pvalue <= alpha, top, ABSTAIN).astype(np.int64))
        if return_details:
            return PredictResult(prediction=prediction, counts=torch.from_numpy(counts),
                                 pvalue=torch.from_numpy(pvalue), nan_votes=torch.from_numpy(nan),
                                 finite_input=torch.from_numpy(finite))
        return prediction

    # ------------------------------------------------------------------- sequential certification

    def certify_radius(self, x: torch.Tensor, radius: float, alpha: float = 0.001, batch_size: int = 1000, *,
                       test: str = DEFAULT_TEST, n0: int = DEFAULT_N0, n_max: int = 100_000,
                       n_min: int = DEFAULT_N_MIN, beta: Optional[float] = None, seed: Optional[int] = None, indices=None,
                       max_active: Optional[int] = None, growth: float = DEFAULT_GROWTH,
                       schedule: str = DEFAULT_SCHEDULE) -> SequentialResult:
        """Is g certified at L2 radius ``radius``? For each input of x [B, ...]: certified (with the
        class), not certified, or abstained, with as few noisy samples as the input needs and the
        guarantee of CERTIFY (a certificate is wrong with probability <= alpha).

        As in :meth:`certify`, n0 separate selection samples choose the class cA; then estimation
        samples are drawn in chunks up to the looks (``schedule`` "threshold", the default: per input, a
        look where the bound can first clear Phi(radius / sigma) at the selection samples' rate and the
        looks ``growth`` times apart around it; "geometric": n_min, growth n_min, growth^2 n_min, ...,
        n_max), and after each look a confidence sequence on pA decides (``test``: "cp", Clopper-Pearson
        with alpha split over the input's looks, the default; or "betting", an anytime-valid betting
        confidence sequence; see robustops.smoothing.sequential):
        certified once its lower bound reaches Phi(radius / sigma), not certified once its upper bound
        (error beta, default alpha) falls below it, abstained when n_max samples did not decide. An input
        leaves the forward passes as soon as it is decided and the next input takes its place (batch
        refill, robustops.smoothing.stream), so the passes stay full.

        Returns a SequentialResult: prediction (cA if certified, else -1), radius (``radius`` if certified,
        else 0), decisions [B, 1], samples [B] (n0 + estimation samples spent), pA_lower / pA_upper,
        counts, selection_counts. Noise: the selection samples and the first estimation samples of an
        input are those of ``certify(x, n0, n_max, alpha, ..., seed=seed, indices=indices)``; an input's
        result depends only on (seed, its index). batch_size: noisy samples per forward pass.
        max_active: inputs in flight at once (None: enough to keep the passes full). Not with context
        or graph (the eager path is used)."""
        return self._sequential(x, indices, radii=check_radii(radius, "radius"), precision=None, alpha=alpha,
                                batch_size=batch_size, test=test, n0=n0, n_max=n_max, n_min=n_min, beta=beta,
                                seed=seed, max_active=max_active, growth=growth, schedule=schedule)

    def certify_radii(self, x: torch.Tensor, radii, alpha: float = 0.001, batch_size: int = 1000, *,
                      test: str = DEFAULT_TEST, n0: int = DEFAULT_N0, n_max: int = 100_000,
                      n_min: int = DEFAULT_N_MIN, beta: Optional[float] = None, seed: Optional[int] = None, indices=None,
                      max_active: Optional[int] = None, growth: float = DEFAULT_GROWTH,
                      schedule: str = DEFAULT_SCHEDULE) -> SequentialResult:
        """:meth:`certify_radius` for a grid of radii in one run: each input stops when every radius is
        decided. decisions [B, R] (CERTIFIED 1 / NOT_CERTIFIED 0 / ABSTAINED -1, in the order of radii);
        radius = the largest certified radius of the grid (0 if none), so certified_accuracy(radius,
        correct, radii) is the certified accuracy at each radius. Every decision is read off one
        confidence sequence at level alpha, so the probability that *any* radius of an input is wrongly
        certified is <= alpha: the budget needs no split across radii (a split, alpha / R per radius, would
        only be needed for separate per-radius tests; see robustops.smoothing.sequential)."""
        return self._sequential(x, indices, radii=check_radii(radii), precision=None, alpha=alpha,
                                batch_size=batch_size, test=test, n0=n0, n_max=n_max, n_min=n_min, beta=beta,
                                seed=seed, max_active=max_active, growth=growth, schedule=schedule)

    def certify_sequential(self, x: torch.Tensor, alpha: float = 0.001, batch_size: int = 1000, *,
                           precision: float = DEFAULT_PRECISION, test: str = DEFAULT_TEST, n0: int = DEFAULT_N0,
                           n_max: int = 100_000, n_min: int = DEFAULT_N_MIN, beta: Optional[float] = None,
                           seed: Optional[int] = None, indices=None, max_active: Optional[int] = None,
                           growth: float = DEFAULT_GROWTH, schedule: str = DEFAULT_SCHEDULE) -> SequentialResult:
        """Full-radius mode: the largest certified radius sigma * Phi^-1(pA_lower), stopping an input once
        that radius is within ``precision`` (in the units of sigma's radii) of what fixed-n_max CERTIFY would
        certify if pA were as large as the confidence sequence's upper bound, or once the upper bound falls
        below 1/2 (abstain), or at n_max. The radius is valid at level alpha like CERTIFY's. It saves most
        on inputs with pA well inside (1/2, 1); with pA near 1 the fixed-n radius needs nearly all of
        n_max (the benchmark reports the saving honestly). Other arguments as in :meth:`certify_radius`; decisions is
        [B, 0]."""
        return self._sequential(x, indices, radii=None, precision=precision, alpha=alpha, batch_size=batch_size,
                                test=test, n0=n0, n_max=n_max, n_min=n_min, beta=beta, seed=seed,
                                max_active=max_active, growth=growth, schedule=schedule)

    def certify_stream(self, inputs, alpha: float = 0.001, batch_size: int = 1000, *, radii=None,
                       precision: Optional[float] = None, test: str = DEFAULT_TEST, n0: int = DEFAULT_N0,
                       n_max: int = 100_000, n_min: int = DEFAULT_N_MIN, beta: Optional[float] = None,
                       seed: Optional[int] = None, max_active: Optional[int] = None, growth: float = DEFAULT_GROWTH,
                       schedule: str = DEFAULT_SCHEDULE):
        """The generator behind the sequential modes, for data sets larger than a batch: ``inputs`` is an
        iterable of (index, x_i) pairs (x_i one input, without the batch dimension), read lazily as
        inputs finish; yields a ``SequentialRecord`` per input as soon as it is decided (completion
        order). Give radii (grid / fixed-radius mode) or precision (full-radius mode)."""
        return certify_stream(self, inputs, alpha=alpha, radii=radii, precision=precision, test=test, beta=beta,
                              n0=n0, n_min=n_min, n_max=n_max, batch_size=batch_size, seed=seed,
                              max_active=max_active, growth=growth, schedule=schedule)

    def _sequential(self, x, indices, *, radii, **kw) -> SequentialResult:
        if self.graph and not self._warned_graph:
            self._warned_graph = True
            warnings.warn("Smooth(graph=True): the sequential modes run eagerly", stacklevel=3)
        x, B = self._check_x(x)
        idx = self._check_indices(indices, B)
        records = list(certify_stream(self, zip(idx, x), radii=radii, **kw))
        _warn_nonfinite([r.index for r in records if not r.finite])
        return SequentialResult.collect(records, radii or [], self.num_classes, kw["test"])

    # ---------------------------------------------------------------------------- internals

    def _check_x(self, x) -> Tuple[torch.Tensor, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, ...], got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must hold floating-point inputs, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            if tuple(x.shape) == self.input_shape:
                x = x.unsqueeze(0)  # one input (Cohen et al.'s certify(x) habit): a batch of one
            else:
                raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}] (input_shape) "
                                 f"or be one input of shape input_shape, got {list(x.shape)}")
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

    def _unbatched_hint(self, x: torch.Tensor, batch: torch.Tensor, e: BaseException) -> Optional[str]:
        """The message of the ValueError that replaces the error e of the base classifier on a noisy
        batch of x when x looks like one input given without its batch dimension; None to let e
        through. Never with input_shape (x was checked against it), never for out-of-memory errors.

        x looks like one input when the classifier's first convolution (an nn.Module's first Conv1d /
        2d / 3d) takes inputs of x's rank (x = [C, H, W] for a Conv2d) or takes another number of
        channels than x.shape[1]; or, for an error raised by the classifier itself (not a wrong
        logits shape), when x is 2-D or 3-D (one input [H, W] or [C, H, W]) unless x is a batch of
        exactly what that first convolution takes."""
        if self.input_shape is not None or _is_out_of_memory(e):
            return None
        shape = list(x.shape)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        cause = f"(base_classifier on a noisy batch of shape {list(batch.shape)}: {type(e).__name__}: {first})"
        add = ("add the batch dimension (x.unsqueeze(0) or x[None]; Smooth's certify / predict take a batch "
               "[B, ...]), or give Smooth input_shape= to accept single inputs")
        conv = _first_conv(self.base_classifier)
        if conv is not None:
            k, c = len(conv.kernel_size), conv.in_channels
            if x.dim() == k + 1 and shape[0] == c:
                return f"x of shape {shape} looks like one input (the classifier takes {c} channels): {add} {cause}"
            if x.dim() == k + 1:
                return (f"x of shape {shape} has one dimension fewer than the classifier's first convolution takes "
                        f"([B, {c}, ...]): if x is one input, {add}; if it is a batch without its channel "
                        f"dimension, add that (x.unsqueeze(1)) {cause}")
            if x.dim() == k + 2 and shape[1] != c:
                return (f"x of shape {shape} is read as a batch of {shape[0]} inputs with {shape[1]} channels, but the "
                        f"classifier's first convolution takes {c}: if x is one input, {add} {cause}")
            if x.dim() == k + 2:
                return None  # a batch of what the first convolution takes: the error is about something else
        if x.dim() in (2, 3) and not isinstance(e, _LogitsShapeError):
            return (f"base_classifier failed on x of shape {shape}, read as a batch of {shape[0]} inputs of shape "
                    f"{shape[1:]}: if x is one input, {add} {cause}")
        return None

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

    def _check_context(self, context, B: int, device):
        """None, or the context on the classifier's device: a tensor [B, ...] or a tuple of them."""
        if context is None:
            return None
        if self.graph:
            raise ValueError("context is not supported with graph=True (a captured graph has no per-row context "
                             "input): create Smooth with graph=False")
        single = isinstance(context, torch.Tensor)
        parts = (context,) if single else context
        if not isinstance(parts, (tuple, list)) or not parts or \
                not all(isinstance(t, torch.Tensor) for t in parts):
            raise TypeError(f"context must be a tensor [B, ...] or a non-empty tuple / list of tensors [B, ...], got "
                            f"{type(context).__name__}")
        for k, t in enumerate(parts):
            if t.dim() < 1 or t.shape[0] != B:
                what = "context" if single else f"context[{k}]"
                raise ValueError(f"{what} must have one row per input of x (shape [{B}, ...]), got {list(t.shape)}")
        parts = tuple(t.to(device) for t in parts)
        return parts[0] if single else parts

    @staticmethod
    def _context_rows(context, rows: torch.Tensor):
        """The context of each noisy row of a batch: rows [R] holds the input of each noisy row."""
        if isinstance(context, torch.Tensor):
            return context.index_select(0, rows)
        return tuple(t.index_select(0, rows) for t in context)

    def _forward(self, batch: torch.Tensor, cache: bool = True, context=None) -> torch.Tensor:
        args = (batch,) if context is None else (batch, context)
        if self.autocast is None:
            logits = self.base_classifier(*args)
        else:  # no autocast weight cache while a CUDA graph is captured
            with torch.autocast(device_type=batch.device.type, dtype=self.autocast, cache_enabled=cache):
                logits = self.base_classifier(*args)
        if not isinstance(logits, torch.Tensor) or logits.shape != (batch.shape[0], self.num_classes):
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise _LogitsShapeError(f"base_classifier must return logits [R, num_classes] = [{batch.shape[0]}, "
                                    f"{self.num_classes}] for a batch of R = {batch.shape[0]} inputs, got {got}; "
                                    f"check num_classes")
        return logits

    def vote_sampler(self, device, *, cache: bool = True, context=None,
                     hint_x: Optional[torch.Tensor] = None) -> VoteSampler:
        """The one smoothing pass (robustops.smoothing.votes) with this Smooth's noise and classifier, for
        data on ``device``: mean / std moved there once. cache=False while a CUDA graph is captured (no
        autocast weight cache). context: per-input context on the device (rows picked per noisy row).
        hint_x: the inputs of a certify / predict call, for the error that says to add a batch dimension."""
        mean = std = None
        if self.normalize is not None:
            mean, std = (t.flatten().to(device) for t in (self.normalize.mean, self.normalize.std))

        def forward(batch, sources):
            ctx = None if context is None else self._context_rows(context, sources())
            try:
                return self._forward(batch, cache=cache, context=ctx)
            except (RuntimeError, ValueError) as e:
                hint = None if hint_x is None else self._unbatched_hint(hint_x, batch, e)
                if hint is None:
                    raise
                raise ValueError(hint) from e
        return VoteSampler(sigma=self.sigma, forward=forward, noise_dtype=self.autocast,
                           channels_last=self.channels_last, mean=mean, std=std)

    def _sample(self, x: torch.Tensor, idx: List[int], phases: List[Tuple[int, int]], batch_size: int,
                seed: int, context=None):
        """Votes of the base classifier on noisy copies of x: (counts int64 [len(phases)*B, C], row
        p*B + i for input i in phase p (phase = (samples per input, Philox phase)); NaN votes int64
        [len(phases)*B]; finite bool [B], whether input i's values are all finite).

        The samples of all phases and inputs form one stream in row order; each forward pass takes the
        next batch_size of them (a VoteSampler pass over its pieces). Everything stays on the device
        until the final copy to the host. Column C of the device table counts the samples whose logits
        held a NaN (votes for no class)."""
        B, C = x.shape[0], self.num_classes
        rows = len(phases) * B
        counts = torch.zeros(rows, C + 1, dtype=torch.int64, device=x.device)
        finite_dev = torch.isfinite(x).flatten(1).all(1) if B else torch.zeros(0, dtype=torch.bool, device=x.device)
        if B == 0:
            host = counts.cpu().numpy()
            return host[:rows, :C], host[:rows, C], np.zeros(0, dtype=bool)
        keys = [phase_seed(seed, p) for _, p in phases]
        sampler = self.vote_sampler(x.device, context=context, hint_x=x)
        xs = x.contiguous()  # the noise ops read the inputs in logical order: one copy per call, not per pass
        pieces: List[Piece] = []
        filled = 0
        with torch.inference_mode():
            start = self._graph_rows(x, idx, phases, keys, batch_size, counts)
            for row in range(rows):
                (m, _), i = phases[row // B], row % B
                j = start[row]
                while j < m:
                    take = min(m - j, batch_size - filled)
                    pieces.append(Piece(i, keys[row // B], idx[i] * m + j, take, row))
                    filled += take
                    j += take
                    if filled == batch_size:
                        sampler.run(xs, pieces, counts)
                        pieces, filled = [], 0
            if pieces:
                sampler.run(xs, pieces, counts)
            # the one host synchronization: the votes and the inputs' finiteness in one copy
            host = torch.cat([counts.flatten(), finite_dev.long()]).cpu().numpy()
        table = host[:rows * (C + 1)].reshape(rows, C + 1)
        finite = host[rows * (C + 1):].astype(bool)
        _warn_nonfinite([idx[i] for i in np.flatnonzero(~finite)])
        return table[:, :C], table[:, C], finite

    def _graph_rows(self, x, idx, phases, keys, batch_size, counts) -> List[int]:
        """With graph=True on CUDA: every full batch of one input's samples as a graph replay.
        Returns, per count row, the first sample left to the eager stream (0 without graphs)."""
        rows = len(phases) * x.shape[0]
        start = [0] * rows
        if not self.graph:
            return start
        if x.device.type != "cuda":
            if not self._warned_graph:
                self._warned_graph = True
                warnings.warn(f"Smooth(graph=True) needs CUDA inputs, got {x.device}: running the eager path",
                              stacklevel=4)
            return start
        B = x.shape[0]
        model = model_fingerprint(self.base_classifier)  # once per call: the graph cache keys on it
        for row in range(rows):
            (m, _), i = phases[row // B], row % B
            full = m // batch_size
            if full and self._graphs.run(self, x[i:i + 1], keys[row // B], batch_size, idx[i] * m, full,
                                         counts[row:row + 1], model):
                start[row] = full * batch_size
        return start
