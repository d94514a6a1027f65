"""Proxy distributions: adversarial training on real data mixed with generated samples, and a small
class-conditional generator for the demo.

Background (Sehwag et al., "Robust learning meets generative models: can proxy distributions improve
adversarial robustness?", ICLR 2022; Gowal et al., "Improving robustness using generated data",
NeurIPS 2021): samples from a generative model fitted to the training set (a *proxy distribution*)
are added to adversarial training. Sehwag et al. bound the gap between a classifier's robustness on
the proxy distribution and on the real one by the conditional Wasserstein distance between the two,
so a proxy helps the more the closer it is to the real data; to *rank* proxies they measure how well a
robust binary classifier tells real from generated images as the perturbation budget grows.

Three parts (the third in ``robustops.train``):

:class:`ProxyBatchSampler` / :class:`MixedLoader` (training)
    Every batch of B samples holds exactly ``g = floor(ratio * B + 1/2)`` generated and ``r = B - g``
    real samples (ratio = fraction of *generated* samples; half-way cases round up, so ratio 0.7 with
    B = 15 gives g = 11 (10.5 -> 11), r = 4). The ratio is the same in every batch, not just on
    average. Both sources are drawn without replacement:

    - *real*: an epoch is one pass over the real data. Epoch e permutes the real indices with a
      generator keyed by (seed, e) and cuts the permutation into ``len(self) * world`` consecutive
      blocks of r; the ``n_real mod (world * r)`` left over at the end of the permutation are skipped
      that epoch (other ones the next epoch, the permutation being new). So every batch has the exact
      ratio and every rank the same number of batches.
    - *generated*: G = the generated samples one epoch uses on all ranks. When G <= n_generated,
      pass p (a permutation of the generated set keyed by (seed, p)) serves the P = n_generated // G
      epochs pP .. pP + P - 1, epoch e taking the block ``e mod P`` of G: no generated sample repeats
      within an epoch, nor across the epochs of a pass, so a large generated set shows fresh samples
      every epoch (the n_generated mod G left over per pass are skipped in that pass). When G >
      n_generated (a small generated set), epoch e strings together permutations keyed by (seed, e, j),
      j = 0, 1, ..., cut at G: each generated sample is used floor(G / n) or ceil(G / n) times.

    Determinism: the batches of epoch e depend only on (seed, e, rank, world, sizes), never on
    history or on torch's global RNG, so a run resumed at epoch e reproduces its batches.
    :meth:`set_epoch` selects e, like ``torch.utils.data.DistributedSampler``; without it, every pass
    repeats epoch 0. ``robustops.train.fit`` calls ``set_epoch(epoch)`` (epochs count from 1) on its
    loader's ``batch_sampler``, which :class:`MixedLoader` exposes, so it needs no other call.

    DDP sharding: ``rank`` of ``world_size`` takes the blocks ``t * world + rank`` (t = its batch
    number) of both streams, so ranks get disjoint batches and the same number of them (the default
    rank / world size come from ``torch.distributed`` when it is initialised). ``batch_size`` is per
    rank, as with a DataLoader under DistributedSampler.

:func:`fit_generator` / :class:`PCAGMMGenerator` (the demo's proxy)
    A class-conditional Gaussian mixture in a PCA space: flatten the images, fit one PCA (d
    components) on all training images, then per class c a K-component Gaussian mixture (full
    covariances, scikit-learn's EM) on that class's PCA codes. Sampling: label c with the class
    frequency of the training set (exact counts by largest remainders, then shuffled), component k
    with the mixture weight, ``z = mu_ck + L_ck eps`` (``L_ck L_ck^T = Sigma_ck``, eps ~ N(0, I)),
    image = ``clip(z W + m, 0, 1)`` (W the PCA components, m the mean). Sampling is ours (numpy,
    seeded), so ``generate(n, seed)`` is reproducible whatever sklearn's version.

:func:`robustops.train.robust_discrimination` (ranking proxies)
    How well a robust classifier tells real from generated images as the perturbation budget grows;
    it trains with ``robustops.train.fit``, so it lives in ``robustops/train/discrimination.py``, above
    this file, and uses its :func:`as_tensors` and :func:`check_images`.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from . import _checks
from ._rng import derive_seed

__all__ = ["ProxyBatchSampler", "MixedLoader", "load_generated", "save_generated", "PCAGMMGenerator",
           "fit_generator", "split_counts", "as_tensors", "check_images"]

_REAL_STREAM, _GEN_STREAM = 1, 2


def split_counts(batch_size: int, ratio: float) -> Tuple[int, int]:
    """(real, generated) samples per batch: generated = floor(ratio * batch_size + 1/2), real the rest."""
    batch_size = _checks.check_int(batch_size, "batch_size", 1)
    ratio = _checks.check_number(ratio, "ratio")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the fraction of generated samples per batch) must lie in [0, 1), got {ratio}; "
                         f"an epoch is one pass over the real data, so every batch needs a real sample")
    g = int(math.floor(ratio * batch_size + 0.5))
    r = batch_size - g
    if r < 1:
        raise ValueError(f"ratio {ratio} of batch_size {batch_size} rounds to {g} generated samples and no real "
                         f"one; use a larger batch_size or a smaller ratio")
    if ratio > 0 and g < 1:
        raise ValueError(f"ratio {ratio} of batch_size {batch_size} rounds to no generated sample; use a larger "
                         f"batch_size or a larger ratio (or ratio 0 for real data only)")
    return r, g


def _permutation(n: int, key: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(key)
    return torch.randperm(n, generator=gen)


def _dist_defaults(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if on else 1
        if rank is None:
            rank = dist.get_rank() if on else 0
    world_size = _checks.check_int(world_size, "world_size", 1)
    rank = _checks.check_int(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class ProxyBatchSampler:
    """Batches of indices mixing real and generated samples at a fixed ratio (see the module's
    docstring for the rules). Indices address ``ConcatDataset([real, generated])``: ``i < num_real``
    is real sample i, ``i >= num_real`` generated sample ``i - num_real``; each batch lists its real
    indices first. Use with ``DataLoader(ConcatDataset([real, gen]), batch_sampler=...)`` (any
    Dataset, worker processes) or through :class:`MixedLoader` (tensors, no per-sample overhead).

    num_real, num_generated: sizes of the two sources; batch_size: samples per batch and rank;
    ratio: fraction of generated samples per batch, in [0, 1); seed: an int (the batches of each
    epoch follow from (seed, epoch)); rank / world_size: this process's shard (None: from
    torch.distributed when initialised, else 0 of 1)."""

    def __init__(self, num_real: int, num_generated: int, batch_size: int, ratio: float, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.num_real = _checks.check_int(num_real, "num_real", 1)
        self.num_generated = _checks.check_int(num_generated, "num_generated", 0)
        self.batch_size = _checks.check_int(batch_size, "batch_size", 1)
        self.real_per_batch, self.gen_per_batch = split_counts(batch_size, ratio)
        self.ratio = float(ratio)
        if self.gen_per_batch > 0 and self.num_generated < 1:
            raise ValueError(f"ratio {ratio} asks for {self.gen_per_batch} generated samples per batch but the "
                             f"generated data is empty")
        if isinstance(seed, bool) or not _checks.is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.rank, self.world_size = _dist_defaults(rank, world_size)
        self.num_batches = self.num_real // (self.world_size * self.real_per_batch)
        if self.num_batches < 1:
            raise ValueError(f"{self.num_real} real samples do not fill one batch of {self.real_per_batch} real "
                             f"samples on each of {self.world_size} rank(s) (batch_size {batch_size}, ratio "
                             f"{ratio}); use a smaller batch_size")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (as DistributedSampler.set_epoch)."""
        self.epoch = _checks.check_int(epoch, "epoch", 0)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def generated_per_epoch(self) -> int:
        """Generated samples one epoch uses on all ranks together."""
        return self.num_batches * self.world_size * self.gen_per_batch

    def _generated_epoch(self, e: int) -> torch.Tensor:
        """The generated indices (all ranks) of epoch e, [G] (rules in the module's docstring)."""
        n, G = self.num_generated, self.generated_per_epoch
        base = derive_seed(self.seed, _GEN_STREAM)
        if G <= n:
            per_pass = n // G
            p, b = divmod(e, per_pass)
            return _permutation(n, derive_seed(base, 2 * p + 1))[b * G:(b + 1) * G]
        key = derive_seed(base, 2 * e + 2)
        parts = [_permutation(n, derive_seed(key, j + 1)) for j in range(-(-G // n))]
        return torch.cat(parts)[:G]

    def epoch_indices(self, epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(real, generated) index tensors [num_batches, per-batch count] of this rank for an epoch
        (default: the selected one); generated indices are into the generated set (no offset)."""
        e = self.epoch if epoch is None else _checks.check_int(epoch, "epoch", 0)
        T, W, r, g = self.num_batches, self.world_size, self.real_per_batch, self.gen_per_batch
        real = _permutation(self.num_real, derive_seed(derive_seed(self.seed, _REAL_STREAM), e + 1))
        real = real[: T * W * r].view(T, W, r)[:, self.rank]
        if g == 0:
            return real, torch.empty((T, 0), dtype=torch.int64)
        gen = self._generated_epoch(e).view(T, W, g)[:, self.rank]
        return real, gen

    def __iter__(self) -> Iterator[List[int]]:
        real, gen = self.epoch_indices()
        gen = gen + self.num_real
        for t in range(self.num_batches):
            yield real[t].tolist() + gen[t].tolist()


def as_tensors(data, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x float [N, ...], y int64 [N]) from a pair of tensors / arrays, a TensorDataset or a Dataset."""
    if isinstance(data, TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v for v in data)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{what}: expected (images, labels) as tensors or numpy arrays, got "
                            f"({type(x).__name__}, {type(y).__name__})")
    elif isinstance(data, Dataset):
        n = len(data)
        if n == 0:
            raise ValueError(f"{what}: no samples")
        items = [data[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    else:
        raise TypeError(f"{what}: expected a Dataset, a TensorDataset or a pair (images, labels), got "
                        f"{type(data).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{what}: images must have a batch dimension and an image shape, got shape {list(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: expected one label per image ({x.shape[0]}), got labels of shape {list(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise ValueError(f"{what}: labels must be integer class indices, got {y.dtype}")
    if not x.dtype.is_floating_point:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            raise ValueError(f"{what}: images must be float in [0, 1] or uint8, got {x.dtype}")
    return x, y.long()


def check_images(x: torch.Tensor, what: str, lo: float, hi: float) -> None:
    """A ValueError naming ``what`` when images [N, ...] hold NaN / Inf or pixels outside [lo, hi]."""
    if x.shape[0] == 0:
        return
    flat = x.reshape(x.shape[0], -1)
    finite = torch.isfinite(flat).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{what}: images hold NaN or Inf (first at sample {int((~finite).nonzero()[0, 0])})")
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo or xmax > hi:
        raise ValueError(f"{what}: pixel values must lie in [{lo:g}, {hi:g}], found [{xmin:g}, {xmax:g}]")


def _check_labels(y: torch.Tensor, what: str, num_classes: int) -> None:
    if y.numel() == 0:
        return
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0 or ymax >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes - 1}] ({num_classes} classes), found "
                         f"[{ymin}, {ymax}]")


def load_generated(path: str, image_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                   lo: float = 0.0, hi: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generated images and (pseudo-)labels from a ``.npz`` with arrays ``x`` (uint8, scaled by 1/255,
    or float in [lo, hi]; [N, C, H, W], [N, H, W] or [N, H, W, C] with C in {1, 3}) and ``y``
    (integer labels [N]). image_shape / num_classes: what the real data has; a mismatch is a
    ValueError naming the file. Returns (x float32 [N, C, H, W], y int64 [N])."""
    what = f"generated data {path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: not a readable .npz file ({e})") from None
    with f:
        if not hasattr(f, "files"):
            raise ValueError(f"{what}: expected a .npz archive with arrays x and y, got a single array")
        missing = [k for k in ("x", "y") if k not in f.files]
        if missing:
            raise ValueError(f"{what}: missing array(s) {missing}; expected x (images) and y (labels), found "
                             f"{sorted(f.files)}")
        xa, ya = f["x"], f["y"]
    if xa.dtype == np.uint8:
        x = torch.from_numpy(xa.astype(np.float32) / 255.0)
    elif np.issubdtype(xa.dtype, np.floating):
        x = torch.from_numpy(xa.astype(np.float32))
    else:
        raise ValueError(f"{what}: x must be uint8 or float images, got dtype {xa.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif x.dim() != 4:
        raise ValueError(f"{what}: x must be images [N, C, H, W], [N, H, W] or [N, H, W, C], got shape "
                         f"{list(xa.shape)}")
    if ya.ndim != 1 or ya.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: y must hold one label per image ({x.shape[0]}), got shape {list(ya.shape)}")
    if np.issubdtype(ya.dtype, np.floating):
        if not np.all(np.isfinite(ya)) or not np.all(ya == np.round(ya)):
            raise ValueError(f"{what}: y must hold integer class labels, got non-integer values")
    elif not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"{what}: y must hold integer class labels, got dtype {ya.dtype}")
    y = torch.from_numpy(ya.astype(np.int64))
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(int(s) for s in image_shape):
        raise ValueError(f"{what}: images have shape {list(x.shape[1:])}, the real data {list(image_shape)}")
    check_images(x, what, lo, hi)
    if num_classes is not None:
        _check_labels(y, what, int(num_classes))
    elif int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be >= 0, found {int(y.min())}")
    return x.contiguous(), y


def save_generated(path: str, x, y, **meta) -> str:
    """Write generated images (float32 [N, C, H, W] in [0, 1]) and labels (int64 [N]) as ``x`` / ``y``
    of a ``.npz`` (plus any scalar / array ``meta``), atomically; returns the path."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}.npz")
    np.savez_compressed(tmp, x=x.astype(np.float32), y=y.astype(np.int64),
                        **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


class MixedLoader:
    """A drop-in for ``DataLoader`` in ``robustops.train.fit``: yields ``(x, y)`` batches (``(x, y,
    is_generated)`` with ``return_source``) that mix real and generated samples at ``ratio``
    (fraction generated), with ``__len__`` and ``set_epoch``. Rules in the module's docstring.

    real: the real training data (a TensorDataset, a pair (images, labels), or any Dataset of
    (image, label), which is read whole into memory once). generated: the same, or a ``.npz`` path
    (:func:`load_generated`); its images must have the real images' shape and its labels lie in
    [0, num_classes) (default num_classes: the real labels' maximum + 1). Pixels of both must lie in
    [lo, hi]. The batch order is kept in ``batch_sampler`` (:class:`ProxyBatchSampler`), where
    ``fit`` finds ``set_epoch``. Batches are built on the CPU by indexing; ``pin_memory`` pins them."""

    def __init__(self, real, generated, batch_size: int, ratio: float, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, num_classes: Optional[int] = None,
                 return_source: bool = False, lo: float = 0.0, hi: float = 1.0, pin_memory: bool = False):
        self.real_x, self.real_y = as_tensors(real, "real")
        if self.real_x.shape[0] == 0:
            raise ValueError("real: no samples")
        check_images(self.real_x, "real", lo, hi)
        if num_classes is None:
            if int(self.real_y.min()) < 0:
                raise ValueError(f"real: labels must be >= 0, found {int(self.real_y.min())}")
            num_classes = int(self.real_y.max()) + 1
        self.num_classes = _checks.check_int(num_classes, "num_classes", 1)
        _check_labels(self.real_y, "real", self.num_classes)
        shape = tuple(self.real_x.shape[1:])
        if generated is None:
            self.gen_x, self.gen_y = self.real_x[:0], self.real_y[:0]
        elif isinstance(generated, (str, os.PathLike)):
            self.gen_x, self.gen_y = load_generated(os.fspath(generated), shape, self.num_classes, lo, hi)
        else:
            self.gen_x, self.gen_y = as_tensors(generated, "generated")
            if tuple(self.gen_x.shape[1:]) != shape:
                raise ValueError(f"generated: images have shape {list(self.gen_x.shape[1:])}, the real data "
                                 f"{list(shape)}")
            check_images(self.gen_x, "generated", lo, hi)
            _check_labels(self.gen_y, "generated", self.num_classes)
        self.gen_x = self.gen_x.to(self.real_x.dtype)
        self.batch_sampler = ProxyBatchSampler(self.real_x.shape[0], self.gen_x.shape[0], batch_size, ratio,
                                               seed=seed, rank=rank, world_size=world_size)
        self.sampler = None
        self.batch_size = int(batch_size)
        self.return_source = bool(return_source)
        self.pin_memory = bool(pin_memory)

    @property
    def dataset(self):
        """``ConcatDataset([real, generated])``, which the sampler's indices address."""
        from torch.utils.data import ConcatDataset

        return ConcatDataset([TensorDataset(self.real_x, self.real_y), TensorDataset(self.gen_x, self.gen_y)])

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        real, gen = self.batch_sampler.epoch_indices()
        r, g = real.shape[1], gen.shape[1]
        src = torch.cat([torch.zeros(r, dtype=torch.bool), torch.ones(g, dtype=torch.bool)])
        for t in range(real.shape[0]):
            x = torch.cat([self.real_x[real[t]], self.gen_x[gen[t]]])
            y = torch.cat([self.real_y[real[t]], self.gen_y[gen[t]]])
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield (x, y, src.clone()) if self.return_source else (x, y)


# --------------------------------------------------------------------------------- generator

class PCAGMMGenerator:
    """A class-conditional Gaussian mixture in PCA space (see the module's docstring); made by
    :func:`fit_generator`. Attributes (numpy): ``mean`` [D], ``components`` [d, D], per class c
    ``weights[c]`` [K_c], ``means[c]`` [K_c, d], ``chol[c]`` [K_c, d, d]; ``priors`` [num_classes];
    ``image_shape``."""

    def __init__(self, mean, components, weights, means, chol, priors, image_shape):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]
        self.means = [np.asarray(m, dtype=np.float64) for m in means]
        self.chol = [np.asarray(c, dtype=np.float64) for c in chol]
        self.priors = np.asarray(priors, dtype=np.float64)
        self.image_shape = tuple(int(s) for s in image_shape)

    @property
    def num_classes(self) -> int:
        return len(self.priors)

    def class_counts(self, n: int) -> np.ndarray:
        """Samples per class for n: proportional to the priors, rounded by largest remainders (sum n)."""
        raw = self.priors * n
        counts = np.floor(raw).astype(np.int64)
        rest = n - int(counts.sum())
        if rest > 0:
            counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
        return counts

    def sample_class(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n flat images of class c (before clipping): [n, D]."""
        w = self.weights[c]
        k = rng.choice(len(w), size=n, p=w / w.sum())
        eps = rng.standard_normal((n, self.components.shape[0]))
        z = self.means[c][k] + np.einsum("nij,nj->ni", self.chol[c][k], eps)
        return z @ self.components + self.mean

    def generate(self, n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """n images (float32 [n, *image_shape], clipped to [0, 1]) and their labels (int64 [n],
        shuffled), reproducible from seed."""
        n = _checks.check_int(n, "n", 1)
        if isinstance(seed, bool) or not _checks.is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        rng = np.random.default_rng(int(seed))
        counts = self.class_counts(n)
        xs = [self.sample_class(c, int(m), rng) for c, m in enumerate(counts) if m > 0]
        ys = [np.full(int(m), c, dtype=np.int64) for c, m in enumerate(counts) if m > 0]
        x, y = np.concatenate(xs), np.concatenate(ys)
        order = rng.permutation(n)
        x = np.clip(x[order], 0.0, 1.0).astype(np.float32).reshape((n,) + self.image_shape)
        return torch.from_numpy(x), torch.from_numpy(y[order])

    def save(self, path: str, n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """generate(n, seed) written to a .npz (x, y); returns the samples."""
        x, y = self.generate(n, seed)
        save_generated(path, x, y, seed=int(seed))
        return x, y


def fit_generator(x, y, components: int = 4, pca_dim: Optional[int] = 24, seed: int = 0,
                  reg_covar: float = 1e-3, max_iter: int = 200) -> PCAGMMGenerator:
    """Fit a :class:`PCAGMMGenerator` on images x ([N, ...] floats in [0, 1], or uint8) and labels y.

    components: mixture components per class (fewer where a class has fewer than 4 samples per
    component: K_c = min(components, max(1, n_c // 4))); pca_dim: PCA dimensions d (None: all, at most
    N - 1 and the pixel count); seed: PCA / EM initialisation; reg_covar: added to the covariances'
    diagonal (in PCA units; keeps small classes' covariances invertible); max_iter: EM iterations."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    xt, yt = as_tensors((x, y), "fit_generator")
    n = xt.shape[0]
    components = _checks.check_int(components, "components", 1)
    if n < 2:
        raise ValueError(f"fit_generator: needs at least 2 images, got {n}")
    if int(yt.min()) < 0:
        raise ValueError(f"fit_generator: labels must be >= 0, found {int(yt.min())}")
    flat = xt.reshape(n, -1).double().numpy()
    limit = min(n - 1, flat.shape[1])
    d = limit if pca_dim is None else _checks.check_int(pca_dim, "pca_dim", 1)
    if d > limit:
        raise ValueError(f"pca_dim must be <= {limit} (images: {n}, pixels: {flat.shape[1]}), got {d}")
    pca = PCA(n_components=d, random_state=int(seed)).fit(flat)
    codes = pca.transform(flat)
    labels = yt.numpy()
    num_classes = int(labels.max()) + 1
    weights, means, chol = [], [], []
    priors = np.bincount(labels, minlength=num_classes).astype(np.float64) / n
    for c in range(num_classes):
        zc = codes[labels == c]
        if zc.shape[0] == 0:  # an absent class: never sampled (prior 0); a placeholder keeps indices aligned
            weights.append(np.ones(1))
            means.append(np.zeros((1, d)))
            chol.append(np.eye(d)[None])
            continue
        if zc.shape[0] == 1:
            weights.append(np.ones(1))
            means.append(zc.copy())
            chol.append(np.sqrt(reg_covar) * np.eye(d)[None])
            continue
        k = min(components, max(1, zc.shape[0] // 4))
        gm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=reg_covar, max_iter=max_iter,
                             random_state=int(seed)).fit(zc)
        weights.append(gm.weights_)
        means.append(gm.means_)
        chol.append(np.linalg.cholesky(gm.covariances_))
    return PCAGMMGenerator(pca.mean_, pca.components_, weights, means, chol, priors, tuple(xt.shape[1:]))
