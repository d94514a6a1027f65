"""Datasets: the embedded digits data and loaders for local data (no downloads, ever).

Every loader returns a ``torch.utils.data.Dataset`` whose items are ``(image, label)`` with
``image`` a float32 tensor [C, H, W] in [0, 1] and ``label`` an int64 scalar.

- :func:`load_digits`: the 8x8 handwritten digits (1797 images, 10 classes) shipped with the package
  in ``robustops/_data/digits.npz``, with a fixed train / test split.
- :func:`load_moving_digits`: a synthetic video set built from them: each digit moving across 8 frames
  of a 16x16 canvas, items [T, C, H, W] = [8, 1, 16, 16].
- :func:`load_npz`: arrays in a ``.npz`` file.
- :func:`load_cifar10`: the python-pickle CIFAR-10 batches from a local directory.
- :func:`load_image_folder`: one sub-directory per class of image files (read with PIL).
- :func:`get_dataset`: any of the above from a string spec, with a dict describing the data.
- :func:`shard`: the part of a dataset one rank evaluates in a distributed run.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

_HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_PATH = os.path.join(_HERE, "_data", "digits.npz")

DIGITS_TRAIN = 1437
DIGITS_TEST = 360
#: The moving digits: frames per video and the side of the canvas the 8x8 digit moves on.
MOVING_FRAMES = 8
MOVING_CANVAS = 16

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_TRAIN_SPLITS = ("train",)
_TEST_SPLITS = ("test", "val", "valid", "validation")


def _check_split(split, allowed=("train", "test")) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in allowed)}, got {split!r}")
    return split


# ------------------------------------------------------------------------------------ digits

def load_digits(split: str = "train") -> TensorDataset:
    """The embedded 8x8 digits: images float32 [N, 1, 8, 8] in [0, 1] (pixel values / 16) and
    int64 labels. The split is fixed: a permutation from ``numpy.random.default_rng(0)``, the first
    1437 samples are "train", the last 360 "test" ("all" gives all 1797 in file order)."""
    _check_split(split, ("train", "test", "all"))
    with np.load(DIGITS_PATH) as f:
        images = f["images"]
        labels = f["labels"]
    idx = _digits_split_index(split)
    x = torch.from_numpy(images[idx].astype(np.float32) / 16.0).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return TensorDataset(x, y)


def _digits_split_index(split: str) -> np.ndarray:
    """The file indices of the digits in a split (load_digits' fixed permutation)."""
    n = DIGITS_TRAIN + DIGITS_TEST
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(0).permutation(n)
    return perm[:DIGITS_TRAIN] if split == "train" else perm[n - DIGITS_TEST:]


def moving_digit_path(seed: int, index: int, frames: int = MOVING_FRAMES) -> np.ndarray:
    """The top-left corners (row, col) [frames, 2] of digit ``index`` (its index in the digits file)
    in the moving-digits video of ``seed``: a start uniform in [0, 8]^2, a direction uniform on the
    circle, 1 pixel per frame, reflected at the canvas' edges, rounded to whole pixels. A function
    of (seed, index) alone (numpy's default_rng keyed by both), so every split agrees."""
    rng = np.random.default_rng([int(seed), int(index)])
    span = MOVING_CANVAS - 8
    start = rng.uniform(0.0, span, size=2)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    p = start[None, :] + np.arange(frames)[:, None] * np.array([np.sin(theta), np.cos(theta)])[None, :]
    p = np.mod(p, 2 * span)
    p = np.where(p > span, 2 * span - p, p)  # reflection at the edges
    return np.clip(np.rint(p), 0, span).astype(np.int64)


def load_moving_digits(split: str = "train", seed: int = 0) -> TensorDataset:
    """Moving digits: each embedded 8x8 digit of the split (load_digits' train / test / all) pasted on a
    black 16x16 canvas along :func:`moving_digit_path` for 8 frames. Videos float32 [N, 8, 1, 16, 16]
    ([B, T, C, H, W]) in [0, 1]; labels int64, the digit's. Deterministic in (seed, digit index)."""
    _check_split(split, ("train", "test", "all"))
    with np.load(DIGITS_PATH) as f:
        images, labels = f["images"], f["labels"]
    idx = _digits_split_index(split)
    x = np.zeros((len(idx), MOVING_FRAMES, 1, MOVING_CANVAS, MOVING_CANVAS), dtype=np.float32)
    for i, k in enumerate(idx):
        img = images[k].astype(np.float32) / 16.0
        for t, (r, c) in enumerate(moving_digit_path(seed, k)):
            x[i, t, 0, r:r + 8, c:c + 8] = img
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(labels[idx].astype(np.int64)))


# --------------------------------------------------------------------------------------- npz

def _to_images(a: np.ndarray, what: str) -> torch.Tensor:
    """uint8 or float images [N, H, W], [N, C, H, W] or [N, H, W, C] (C in {1, 3}) to float32
    NCHW in [0, 1] (uint8 is divided by 255; floats are kept as they are)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        t = torch.from_numpy(a.astype(np.float32))
    else:
        raise TypeError(f"{what} must hold uint8 or floating-point images, got dtype {a.dtype}")
    out = as_nchw(t)
    if out is not None:
        return out
    if t.dim() == 2:
        raise ValueError(f"{what} must be images [N, H, W], [N, C, H, W] or [N, H, W, C], got a 2-D array "
                         f"of shape {list(a.shape)}; reshape flat images before saving")
    raise ValueError(f"{what} must be images [N, H, W], [N, C, H, W] or [N, H, W, C], got shape {list(a.shape)}")


def as_nchw(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Images [N, H, W], [N, C, H, W] or [N, H, W, C] (C in {1, 3}, read as NHWC only when dim 1 is not
    a channel count) as a contiguous NCHW tensor; None for any other number of dimensions."""
    if t.dim() == 3:
        return t.unsqueeze(1).contiguous()
    if t.dim() == 4:
        if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(0, 3, 1, 2)
        return t.contiguous()
    return None


def _to_labels(a: np.ndarray, n: int, what: str) -> torch.Tensor:
    a = np.asarray(a).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"{what} must have one label per image ({n}), got {a.shape[0]}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            bad = int(np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))[0])
            raise ValueError(f"{what} must hold integer class labels, got the non-integer {a[bad]!r} at index {bad}")
    elif not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
        raise ValueError(f"{what} must hold integer class labels, got dtype {a.dtype}")
    return torch.from_numpy(a.astype(np.int64))


def _npz_keys(keys, split: Optional[str]) -> Tuple[str, str]:
    keys = set(keys)
    if split is not None:
        names = [split] + (["val", "valid", "test"] if split in _TEST_SPLITS else [])
        for s in names:
            for xk, yk in ((f"x_{s}", f"y_{s}"), (f"images_{s}", f"labels_{s}")):
                if xk in keys and yk in keys:
                    return xk, yk
    for xk, yk in (("x", "y"), ("images", "labels")):
        if xk in keys and yk in keys:
            return xk, yk
    want = (f"x_{split}/y_{split} or " if split is not None else "") + "x/y or images/labels"
    raise KeyError(f"the .npz file must contain the arrays {want}; it has {sorted(keys)}")


def load_npz(path: str, split: Optional[str] = None) -> TensorDataset:
    """Images and labels from a ``.npz`` file: arrays ``x``/``y`` or ``images``/``labels``, or with a
    split, ``x_<split>``/``y_<split>`` (e.g. ``x_train``, ``y_test``; a file without split arrays is
    used whole). uint8 images are scaled to [0, 1]; NHWC with C in {1, 3} becomes NCHW."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .npz file at {path!r}")
    if not zipfile.is_zipfile(path):  # np.load would call a text file "pickled data"
        raise ValueError(f"{path!r} is not a .npz file (the zip archive of arrays that numpy.savez writes); "
                         f"save the images and labels with numpy.savez(path, x=..., y=...)")
    with np.load(path, allow_pickle=False) as f:
        xk, yk = _npz_keys(f.files, split)
        x = _to_images(f[xk], f"{os.path.basename(path)}[{xk!r}]")
        y = _to_labels(f[yk], x.shape[0], f"{os.path.basename(path)}[{yk!r}]")
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------------- CIFAR-10

def _cifar_dir(root: str) -> Optional[str]:
    for d in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "test_batch")) or os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return None


def load_cifar10(root: str, split: str = "train") -> TensorDataset:
    """CIFAR-10 from the python-pickle batches in a local directory (``root`` itself or
    ``root/cifar-10-batches-py``): ``data_batch_1`` .. ``data_batch_5`` for "train", ``test_batch``
    for "test". Images float32 [N, 3, 32, 32] in [0, 1], int64 labels. Never downloads."""
    _check_split(split, ("train", "test"))
    files = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    how = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
           "extract it there (tar xzf cifar-10-python.tar.gz), so that the files lie in "
           f"{os.path.join(root, 'cifar-10-batches-py')}/")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 directory {root!r} does not exist: create it and {how}")
    d = _cifar_dir(root) or root
    missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} split: missing {', '.join(missing)} in {d!r}. Put the python-pickle batches "
            f"{', '.join(files)} in {root!r} or {os.path.join(root, 'cifar-10-batches-py')!r}: {how}")
    xs, ys = [], []
    for name in files:
        with open(os.path.join(d, name), "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        data = entry.get(b"data", entry.get("data"))
        labels = entry.get(b"labels", entry.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{os.path.join(d, name)} is not a CIFAR-10 python batch (no 'data' / 'labels')")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    y = torch.from_numpy(np.concatenate(ys))
    return TensorDataset(x, y)


# -------------------------------------------------------------------------------- image folder

class ImageFolder(Dataset):
    """Class-per-subdirectory images: ``root/<class>/<image>``. Classes are the sorted
    sub-directory names; items are ``(float32 [C, H, W] in [0, 1], int64 label)``, images converted
    to RGB (or "L" when ``grayscale``) and resized to ``size`` (int or (H, W)) when given."""

    def __init__(self, root: str, size: Union[None, int, Tuple[int, int]] = None, grayscale: bool = False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (expected root/<class>/<image files>)")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"image folder {root!r} has no class sub-directories "
                                    f"(expected root/<class>/<image files>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                for n in sorted(names):
                    if n.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, n), self.class_to_idx[c]))
        if not self.samples:
            raise FileNotFoundError(f"image folder {root!r} has no images with extensions "
                                    f"{', '.join(IMAGE_EXTENSIONS)}")
        self.targets = [t for _, t in self.samples]
        if isinstance(size, int):
            size = (size, size)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mode = "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert(self.mode)
            if self.size is not None and (im.height, im.width) != self.size:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return self.load(path), torch.tensor(target, dtype=torch.int64)


def _split_dir(root: str, split: Optional[str]) -> str:
    if split is None:
        return root
    names = [split] + ([s for s in _TEST_SPLITS if s != split] if split in _TEST_SPLITS else [])
    for s in names:
        d = os.path.join(root, s)
        if os.path.isdir(d):
            return d
    has_splits = any(os.path.isdir(os.path.join(root, s)) for s in _TRAIN_SPLITS + _TEST_SPLITS)
    if has_splits:
        raise FileNotFoundError(f"image folder {root!r} has split directories but none for split {split!r} "
                                f"(looked for {', '.join(names)})")
    return root  # no split directories: the whole folder is the data


def load_image_folder(root: str, split: Optional[str] = None, size=None, grayscale: bool = False) -> ImageFolder:
    """Images in ``root/<class>/...``, or with a split in ``root/<split>/<class>/...`` (``root/train``;
    "test" also finds ``root/val``). A folder without split directories is used whole."""
    return ImageFolder(_split_dir(root, split), size=size, grayscale=grayscale)


# ---------------------------------------------------------------------------------- get_dataset

def _channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(float(v) for v in x.mean(1)), tuple(float(v) for v in x.std(1).clamp_min(1e-6))


def _is_cifar_dir(path: str) -> bool:
    return os.path.isdir(path) and _cifar_dir(path) is not None


def get_dataset(spec: str, split: str = "test"):
    """A dataset from a spec string, and a dict describing it.

    spec: "digits" (embedded); "moving_digits" (embedded videos [T, C, H, W]); a path to a ``.npz`` file (or "npz:PATH"); "cifar10:DIR" or a directory
    holding the CIFAR-10 python batches; "imagefolder:DIR" (optionally "imagefolder:DIR:SIZE") or a
    directory of class sub-directories. split: "train" or "test".

    Returns ``(dataset, info)`` with info = {"name", "num_classes", "input_shape" (C, H, W; videos T, C, H, W),
    "mean", "std" (per-channel tuples of floats, or None for digits)}."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    kind_l = kind.lower()
    if kind_l == "digits" and not rest:
        ds = load_digits(_check_split(split, ("train", "test", "all")))
        return ds, {"name": "digits", "num_classes": 10, "input_shape": (1, 8, 8), "mean": None, "std": None}
    if kind_l in ("moving_digits", "moving-digits") and not rest:
        ds = load_moving_digits(_check_split(split, ("train", "test", "all")))
        return ds, {"name": "moving_digits", "num_classes": 10, "input_shape": (MOVING_FRAMES, 1, MOVING_CANVAS,
                                                                              MOVING_CANVAS), "mean": None, "std": None}
    if kind_l in ("cifar10", "cifar-10") and rest:
        return _cifar(rest, split)
    if kind_l == "npz" and rest:
        return _npz(rest, split)
    if kind_l in ("imagefolder", "folder") and rest:
        root, size = rest, None
        head, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit() and head:
            root, size = head, int(tail)
        return _folder(root, split, size)
    path = os.path.expanduser(spec)
    if path.endswith(".npz") or os.path.isfile(path):
        return _npz(path, split)
    if _is_cifar_dir(path):
        return _cifar(path, split)
    if os.path.isdir(path):
        return _folder(path, split, None)
    raise FileNotFoundError(
        f"unknown dataset {spec!r}: expected \"digits\", a .npz file, \"cifar10:DIR\" (a directory with the "
        f"CIFAR-10 python batches), or \"imagefolder:DIR\" (a directory of class sub-directories)")


def _cifar(root: str, split: str):
    ds = load_cifar10(root, split)
    return ds, {"name": "cifar10", "num_classes": 10, "input_shape": (3, 32, 32),
                "mean": CIFAR10_MEAN, "std": CIFAR10_STD}


def _npz(path: str, split: str):
    ds = load_npz(path, split)
    # Statistics and class count from the training arrays when the file has them, so that every
    # split of one file is described the same way.
    with np.load(path, allow_pickle=False) as f:
        try:
            xk, yk = _npz_keys(f.files, "train")
            ref_x = _to_images(f[xk], xk)
        except KeyError:
            ref_x = ds.tensors[0]
        label_keys = [k for k in f.files if k in ("y", "labels") or k.startswith(("y_", "labels_"))]
        maxima = [int(np.asarray(f[k]).max()) for k in label_keys if np.asarray(f[k]).size]
        num_classes = max(maxima) + 1 if maxima else 0
    mean, std = _channel_stats(ref_x) if ref_x.shape[0] else (None, None)  # an empty file: validate() says so
    x = ds.tensors[0]
    return ds, {"name": os.path.splitext(os.path.basename(path))[0], "num_classes": num_classes,
                "input_shape": tuple(x.shape[1:]), "mean": mean, "std": std}


def _folder(root: str, split: str, size):
    ds = load_image_folder(root, split, size=size)
    try:
        ref = load_image_folder(root, "train", size=size)
    except FileNotFoundError:
        ref = ds
    # Per-channel statistics from at most 512 evenly spaced training images.
    n = len(ref)
    picks = np.unique(np.linspace(0, n - 1, min(n, 512)).astype(np.int64))
    imgs = [ref[int(i)][0] for i in picks]
    if len({tuple(im.shape) for im in imgs}) > 1:
        s = torch.zeros(imgs[0].shape[0], dtype=torch.float64)
        s2, cnt = torch.zeros_like(s), 0
        for im in imgs:
            f = im.double().flatten(1)
            s += f.sum(1)
            s2 += (f * f).sum(1)
            cnt += f.shape[1]
        m = s / cnt
        mean = tuple(float(v) for v in m)
        std = tuple(float(v) for v in (s2 / cnt - m * m).clamp_min(1e-12).sqrt())
    else:
        mean, std = _channel_stats(torch.stack(imgs))
    return ds, {"name": os.path.basename(os.path.normpath(root)), "num_classes": len(ref.classes),
                "input_shape": tuple(ds[0][0].shape), "mean": mean, "std": std, "classes": list(ref.classes)}


# ---------------------------------------------------------------------------------- validation

def validate(dataset, info: dict, source: str, lo: float = 0.0, hi: float = 1.0) -> None:
    """Everything robustops' commands need of a dataset, checked before any work: samples, at least
    two classes, finite pixels in [lo, hi] (the attacks' and the noise's pixel space), integer labels
    in [0, num_classes). A ValueError with one line that names ``source`` and the problem otherwise.
    Tensor datasets are checked whole; others (image folders) through their first sample."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{source}: no samples")
    k = int(info.get("num_classes") or 0)
    if k < 2:
        raise ValueError(f"{source}: classification needs at least 2 classes, the labels name {k}")
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
    else:
        x0, y0 = dataset[0][0], dataset[0][1]
        x, y = torch.as_tensor(x0)[None], torch.as_tensor(y0).reshape(1)
    if not x.dtype.is_floating_point:
        raise ValueError(f"{source}: images must be floating point in [{lo:g}, {hi:g}], got {x.dtype}")
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{source}: images hold NaN or Inf values (first at sample {int((~finite).nonzero()[0, 0])})")
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo or xmax > hi:
        hint = " (images in 0..255 or 0..16? scale them into [0, 1]; uint8 arrays are scaled automatically)" \
            if xmax > 1.5 * hi else ""
        raise ValueError(f"{source}: pixel values must lie in [{lo:g}, {hi:g}], found [{xmin:g}, {xmax:g}]{hint}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{source}: labels must be integer class indices, got {y.dtype}")
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0 or ymax >= k:
        raise ValueError(f"{source}: labels must lie in [0, {k - 1}] ({k} classes), found [{ymin}, {ymax}]")


# --------------------------------------------------------------------------------------- shard

class IndexedDataset(Dataset):
    """Wraps a dataset so that items are ``(image, label, index)``, index being the position in the
    wrapped dataset (or in the original dataset, for a Subset made by :func:`shard`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        if isinstance(dataset, Subset):
            self.indices = list(dataset.indices)
        else:
            self.indices = list(range(len(dataset)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return item[0], item[1], torch.tensor(int(self.indices[i]), dtype=torch.int64)


def shard(dataset_or_indices, rank: int, world_size: int):
    """The part of the data that ``rank`` of ``world_size`` handles: every world_size-th sample
    starting at rank (strided, so ranks get sizes that differ by at most one).

    A Dataset gives a ``torch.utils.data.Subset`` whose ``.indices`` are the original indices; an int n
    gives the list of indices of range(n); a sequence / tensor of indices gives its strided part."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if isinstance(dataset_or_indices, bool):
        raise TypeError("shard needs a Dataset, an int or a sequence of indices, got a bool")
    if isinstance(dataset_or_indices, int):
        return list(range(rank, dataset_or_indices, world_size))
    if isinstance(dataset_or_indices, torch.Tensor):
        return dataset_or_indices[rank::world_size]
    if isinstance(dataset_or_indices, Subset):
        base = list(dataset_or_indices.indices)
        return Subset(dataset_or_indices.dataset, base[rank::world_size])
    if isinstance(dataset_or_indices, Dataset):
        return Subset(dataset_or_indices, list(range(rank, len(dataset_or_indices), world_size)))
    if isinstance(dataset_or_indices, (np.ndarray, range, Sequence)):
        return dataset_or_indices[rank::world_size]
    raise TypeError(f"shard needs a Dataset, an int or a sequence of indices, got {type(dataset_or_indices).__name__}")
