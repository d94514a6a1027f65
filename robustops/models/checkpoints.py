"""Checkpoints of robustops models: :func:`save_checkpoint` / :func:`load_model` store and restore
``{"model": name, "model_kwargs": {...}, "state_dict": ...}`` checkpoints, and also load raw state dicts,
TorchScript files and ``torch.export`` archives, and the checkpoints of Cohen et al.'s code
(``{"arch": "cifar_resnet110", "state_dict": ...}``); the digest that seals them (:func:`state_dict_digest`,
:func:`verify_checkpoint`); :func:`unwrap` and :func:`model_device`."""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .._runfiles import atomic_save, check_entries, seal_entries
from .nets import (COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD, COHEN_IMAGENET_MEAN, COHEN_IMAGENET_STD, MODEL_NAMES, Normalize,
                   cohen_cifar_resnet, get_model)

__all__ = ["save_checkpoint", "load_model", "unwrap", "model_device", "state_dict_digest", "verify_checkpoint"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's, DDP's and DataParallel's wrappers (nested ones too): the one whose
    state dict has plain parameter names."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _plain(v):
    """Checkpoint-safe form of a model kwarg (tensors and tuples become lists of floats)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return [_plain(e) for e in v]
    return v


def state_dict_digest(state: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order): stored in
    robustops checkpoints and checked when they load, so a corrupted file is refused instead of
    silently giving a broken model."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify_checkpoint(obj: dict, path: str) -> None:
    """ValueError when a robustops checkpoint's weights, or any of its other entries (method, eps, norm,
    sigma, mean / std, model, model_kwargs, config, data, ...), do not match the checksums stored with
    them; the message names the file and the entry. Files without a checksum (from elsewhere), or with
    one over the weights only (older versions), pass as they always did."""
    if not isinstance(obj, dict):
        return
    check_entries(obj, path)
    want = obj.get("sha256")
    if want is None or "state_dict" not in obj:
        return
    if state_dict_digest(obj["state_dict"]) != want:
        raise ValueError(f"{path!r} is corrupt: its weights do not match the SHA-256 checksum stored with them")


def save_checkpoint(path: str, model: nn.Module, name: str, model_kwargs: Optional[dict] = None, **extra) -> str:
    """Writes ``{"model": name, "model_kwargs": model_kwargs, "state_dict": model's state dict,
    "sha256": its checksum, **extra, "entries_sha256": the checksums of every other entry}`` to path (atomically: a temporary file, then a rename), so that
    ``load_model(path)`` rebuilds it with ``get_model(name, **model_kwargs)``. DDP / torch.compile
    wrappers are unwrapped. Returns path."""
    if not isinstance(name, str):
        raise TypeError(f"name must be the model's registry name (a string), got {type(name).__name__}")
    for reserved in ("model", "model_kwargs", "state_dict", "sha256", "entries_sha256"):
        if reserved in extra:
            raise ValueError(f"{reserved!r} is a reserved checkpoint key; pass it another name")
    kwargs = {k: _plain(v) for k, v in (model_kwargs or {}).items()}
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    ckpt = {"model": name, "model_kwargs": kwargs, "state_dict": state, "sha256": state_dict_digest(state), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(seal_entries(ckpt), path)
    return path


def _archive_kind(path: str) -> Optional[str]:
    """"jit" for a TorchScript archive, "export" for a torch.export archive, None otherwise."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names) \
            or path.endswith(".pt2"):
        return "export"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "jit"
    return None


def _strip_prefixes(state: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, torch.Tensor) for v in obj.values())


# Cohen et al.'s checkpoints: {"arch": ..., "state_dict": ..., "epoch": ..., "optimizer": ...}
_COHEN_CIFAR_ARCH = re.compile(r"^cifar_resnet(\d+)$")
_COHEN_KWARGS = ("num_classes", "in_channels", "input_size", "mean", "std")


def _cohen_arch(arch) -> Optional[Tuple[str, int]]:
    """("cifar", depth) or ("imagenet", 50) for an arch of Cohen et al.'s code that robustops builds
    (any "cifar_resnet<6n+2>", "resnet50"); None for any other."""
    if not isinstance(arch, str):
        return None
    m = _COHEN_CIFAR_ARCH.match(arch)
    if m:
        depth = int(m.group(1))
        return ("cifar", depth) if depth >= 8 and (depth - 2) % 6 == 0 else None
    return ("imagenet", 50) if arch == "resnet50" else None


def _is_cohen_checkpoint(obj) -> bool:
    """A dict with "arch" and "state_dict" entries and no robustops "model" entry."""
    return isinstance(obj, dict) and "arch" in obj and "state_dict" in obj and "model" not in obj


def _strip_cohen_prefixes(state: dict) -> dict:
    """Their model is ``nn.Sequential(NormalizeLayer, DataParallel(net))``: keys "1.module.<name>".
    Also "1.<name>" (no DataParallel), "module.<name>", "0.<name>" and "_orig_mod.<name>", repeatedly,
    while every key has the prefix."""
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in ("1.module.", "module.", "1.", "0.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
                break
    return state


def _load_cohen(obj: dict, path: str, name: Optional[str], kwargs: dict) -> nn.Module:
    """``nn.Sequential(Normalize(their mean, std), net)`` in eval mode from a checkpoint of Cohen et
    al.'s code whose arch _cohen_arch knows."""
    arch = obj["arch"]
    family, depth = _cohen_arch(arch)
    if name is not None:
        key = name.lower().replace("-", "_")
        accepted = {arch}
        if family == "cifar":
            accepted |= {f"cohen_{arch}", f"cohen_resnet{depth}"}
        if key not in accepted:
            raise ValueError(f"{path!r} holds Cohen et al.'s {arch!r} model (a locuslab/smoothing checkpoint), but "
                             f"name={name!r} was asked for; leave the name out: the checkpoint's arch says which model")
    unknown = sorted(set(kwargs) - set(_COHEN_KWARGS))
    if unknown:
        raise TypeError(f"load_model() got unexpected keyword arguments for Cohen et al.'s {arch!r}: "
                        f"{', '.join(unknown)} (it takes {', '.join(_COHEN_KWARGS)})")
    state = obj["state_dict"]
    if not _is_state_dict(state):
        raise ValueError(f"{path!r}: the 'state_dict' entry of this Cohen et al. checkpoint ({arch!r}) is not a "
                         f"state dict (names -> tensors)")
    state = _strip_cohen_prefixes(dict(state))
    num_classes = kwargs.get("num_classes")
    if num_classes is None:  # their CIFAR-10 models have 10 classes, ImageNet 1000: read it from fc
        fc = state.get("fc.weight")
        num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else \
            (10 if family == "cifar" else 1000)
    in_channels = kwargs.get("in_channels")
    in_channels = 3 if in_channels is None else in_channels
    if family == "cifar":
        net = cohen_cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels)
        mean, std = COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD
    else:
        try:
            from torchvision.models import resnet50
        except ImportError:
            raise ValueError(f"{path!r} is Cohen et al.'s ImageNet 'resnet50', torchvision's ResNet-50: install "
                             f"torchvision (pip install torchvision) to load it") from None
        if in_channels != 3:
            raise ValueError(f"{path!r}: Cohen et al.'s ImageNet 'resnet50' takes 3 input channels, got "
                             f"in_channels={in_channels}")
        net = resnet50(num_classes=num_classes)
        mean, std = COHEN_IMAGENET_MEAN, COHEN_IMAGENET_STD
    if kwargs.get("mean") is not None or kwargs.get("std") is not None:
        mean, std = kwargs.get("mean"), kwargs.get("std")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path!r}: the weights do not fit Cohen et al.'s {arch!r} ({e})") from e
    return nn.Sequential(Normalize(mean, std), net).eval()


def _from_checkpoint(obj: dict, path: str, name: Optional[str], kwargs: dict):
    """(model, state dict) of a robustops checkpoint {"model", "model_kwargs", "state_dict"}; kwargs
    override the saved model_kwargs."""
    saved = obj["model"]
    if not isinstance(saved, str):
        raise ValueError(f"{path!r}: the checkpoint's 'model' entry must be a model name, got "
                         f"{type(saved).__name__}")
    if name is not None and name.lower().replace("-", "_") != saved.lower().replace("-", "_"):
        raise ValueError(f"{path!r} holds a {saved!r} model, but name={name!r} was asked for")
    if str(obj.get("format", "")).startswith("robustops.perturbation/"):
        raise ValueError(f"{path!r} is a perturbation-model (CVAE) checkpoint, not a classifier: give it as "
                         f"--perturbation-model (robustops.perturbation.load_perturbation_model loads it)")
    model_kwargs = dict(obj.get("model_kwargs") or {})
    model_kwargs.update(kwargs)
    try:
        model = get_model(saved, **model_kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path!r}: {e}") from e
    return model, obj["state_dict"]


def _load_archive(path: str, map_location) -> Optional[nn.Module]:
    """The model of a TorchScript or torch.export file, in eval mode; None for any other file."""
    kind = _archive_kind(path)
    if kind == "jit":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(path, map_location=map_location).eval()
    if kind == "export":
        module = torch.export.load(path).module()
        try:
            module.eval()
        except (NotImplementedError, RuntimeError):
            pass
        return module
    return None


def load_model(path: str, name: Optional[str] = None, map_location="cpu", trusted: bool = False,
               **kwargs) -> nn.Module:
    """A model from a file, in eval mode:

    - a robustops checkpoint ``{"model", "model_kwargs", "state_dict"}`` (from :func:`save_checkpoint`);
      keyword arguments override the saved model_kwargs;
    - a raw state dict (or ``{"state_dict": ...}``): give the model ``name`` (and its kwargs);
    - a TorchScript file (``torch.jit.save``) or a ``torch.export`` archive (``torch.export.save``);
    - a checkpoint of Cohen, Rosenfeld and Kolter's randomized-smoothing code (locuslab/smoothing):
      ``{"arch": "cifar_resnet110", "state_dict": ..., "epoch": ..., "optimizer": ...}`` (a dict with
      "arch" and "state_dict" and no "model" entry). arch "cifar_resnet<6n+2>" (cifar_resnet20,
      cifar_resnet110) builds :func:`cohen_cifar_resnet`, "resnet50" torchvision's ResNet-50 (needs
      torchvision). Their "1.module." key prefix (and "1.", "module.", "0.") is stripped and the
      weights load strictly. Returns ``nn.Sequential(Normalize(mean, std), net)``, which takes [0, 1]
      pixels as their model does: their NormalizeLayer holds its means / sds as plain tensors, not
      in the state dict, so it is recreated from the constants their code publishes
      (COHEN_CIFAR10_MEAN / _STD for the CIFAR archs, COHEN_IMAGENET_MEAN / _STD for resnet50;
      ``mean=`` / ``std=`` replace them). num_classes is read from the fc layer; name, when given,
      must be the arch (or "cohen_<arch>"). With an arch robustops does not build, pass name= to
      load the state dict into that model.

    Files are read with ``torch.load(weights_only=True)``; ``trusted=True`` allows arbitrary pickles
    (a whole pickled nn.Module) from a source you trust."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    archive = _load_archive(path, map_location)
    if archive is not None:
        return archive
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:  # noqa: BLE001
        if trusted:
            raise
        raise ValueError(f"cannot read {path!r} as a weights-only checkpoint ({type(e).__name__}: {e}); "
                         f"expected a robustops checkpoint, a state dict, a TorchScript or torch.export file. "
                         f"If it is a pickled model from a source you trust, pass trusted=True") from e
    if isinstance(obj, nn.Module):
        return obj.eval()
    verify_checkpoint(obj, path)
    if _is_cohen_checkpoint(obj):
        if _cohen_arch(obj["arch"]) is not None:
            return _load_cohen(obj, path, name, kwargs)
        if name is None:
            raise ValueError(f"{path!r} looks like a checkpoint of Cohen et al.'s randomized-smoothing code ('arch' "
                             f"and 'state_dict' entries), but its arch {obj['arch']!r} is none robustops builds: "
                             f"cifar_resnet<6n+2> (cifar_resnet20, cifar_resnet110, ...) or resnet50 (with "
                             f"torchvision). For another model, pass its name (name=... / --model) to load the "
                             f"state dict; known models: {', '.join(MODEL_NAMES)}")
    if isinstance(obj, dict) and "state_dict" in obj and "model" in obj:
        model, state = _from_checkpoint(obj, path, name, kwargs)
    else:
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not _is_state_dict(state):
            raise ValueError(f"{path!r} is neither a robustops checkpoint ({{'model', 'model_kwargs', 'state_dict'}}) "
                             f"nor a state dict nor a TorchScript / torch.export file")
        if name is None:
            raise ValueError(f"{path!r} is a raw state dict: pass the model name (name=... / --model) and its "
                             f"kwargs; known models: {', '.join(MODEL_NAMES)}")
        m = re.match(r"^cohen_(?:cifar_)?resnet(\d+)$", name.lower().replace("-", "_"))
        if m and any(k.startswith(("1.", "0.")) for k in state):
            # the bare state dict of Cohen et al.'s Sequential(NormalizeLayer, net): their prefixes and
            # their normalisation, as for a checkpoint that names its arch
            return _load_cohen({"arch": f"cifar_resnet{m.group(1)}", "state_dict": state}, path, name, kwargs)
        model = get_model(name, **kwargs)
    state = _strip_prefixes(dict(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path!r}: the weights do not fit the model ({e})") from e
    return model.eval()
