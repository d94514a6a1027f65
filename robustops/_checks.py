"""Argument checks shared by the modules: each error names the argument and says what was expected.

One table of autocast names, one int check, one number check, one per-sample parameter check, one
label check; the attacks, training, smoothing and the CLI all use these.
"""
from __future__ import annotations

import math
import importlib
from typing import Optional, Union

import torch

__all__ = ["is_int", "is_number", "check_int", "check_number", "check_probability", "autocast_dtype",
           "AUTOCAST_NAMES", "check_sample_param", "sample_param_on", "check_labels", "OPTIONAL_PINS",
           "optional_import", "LazyModule"]

#: Accepted spellings of an autocast dtype; None means no autocast (float32).
AUTOCAST_NAMES = {None: None, "none": None, "fp32": None, "float32": None, torch.float32: None,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
                  "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, torch.float16: torch.float16}


def is_int(v) -> bool:
    """An int (Python or numpy), not a bool."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    import numpy as np

    return isinstance(v, np.integer)


def is_number(v) -> bool:
    """A real number (Python or numpy), not a bool."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    import numpy as np

    return isinstance(v, (np.integer, np.floating))


def is_finite_number(v) -> bool:
    """A real number (see is_number) that is neither infinite nor NaN."""
    return is_number(v) and math.isfinite(float(v))


def check_int(v, name: str, minimum: Optional[int] = None) -> int:
    """v as an int, or a ValueError: "<name> must be an int >= <minimum>, got <v>"."""
    if not is_int(v) or (minimum is not None and v < minimum):
        raise ValueError(f"{name} must be an int" + (f" >= {minimum}" if minimum is not None else "") +
                         f", got {v!r}")
    return int(v)


def check_number(v, name: str, minimum: Optional[float] = None, strict: bool = False,
                 maximum: Optional[float] = None, finite: bool = True) -> float:
    """v as a float, checked against minimum (> minimum when strict, else >=) and maximum."""
    ok = is_number(v) and not (finite and not math.isfinite(float(v)))
    if ok and minimum is not None:
        ok = float(v) > minimum if strict else float(v) >= minimum
    if ok and maximum is not None:
        ok = float(v) <= maximum
    if not ok:
        want = "a finite number" if finite else "a number"
        if minimum is not None:
            want += f" {'>' if strict else '>='} {minimum:g}"
        if maximum is not None:
            want += f" and <= {maximum:g}"
        raise ValueError(f"{name} must be {want}, got {v!r}")
    return float(v)


def check_probability(v, name: str = "alpha") -> float:
    """A float in the open interval (0, 1)."""
    if not is_number(v) or not 0.0 < float(v) < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {v!r}")
    return float(v)


def autocast_dtype(v, name: str = "dtype") -> Optional[torch.dtype]:
    """None (no autocast), torch.bfloat16 or torch.float16 from a dtype or its name."""
    key = v.lower() if isinstance(v, str) else v
    try:
        return AUTOCAST_NAMES[key]
    except (KeyError, TypeError):
        raise ValueError(f"{name} (the autocast dtype) must be None, float32, bfloat16 / bf16 or float16 / fp16 "
                         f"(a name or a torch.dtype), got {v!r}") from None


def check_sample_param(p, name: str) -> Union[float, torch.Tensor]:
    """A per-sample parameter at construction time: a finite float >= 0, or a 1-D Tensor[B] (its
    values and length are checked against the batch by :func:`sample_param_on`). A 0-dim tensor
    becomes a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float, torch.Tensor)) and not is_number(p):
        raise TypeError(f"{name} must be a float >= 0 or a Tensor[B], got {type(p).__name__}")
    if isinstance(p, torch.Tensor):
        if p.dim() > 1:
            raise ValueError(f"{name} must be a float or a 1-D Tensor[B] (one value per sample), "
                             f"got shape {list(p.shape)}")
        if p.dim() == 1:
            return p
        p = float(p)
    p = float(p)
    if not (p >= 0 and p < math.inf):  # not NaN, not negative, not inf (written so torch.compile can trace it)
        raise ValueError(f"{name} must be a finite float >= 0, got {p}")
    return p


def sample_param_on(p, name: str, B: int, device) -> Union[float, torch.Tensor]:
    """A per-sample parameter for a batch of B on device: a float, or a float32 Tensor[B] there whose
    values are all finite and >= 0 (checked here in eager mode, one host sync; under torch.compile the
    value check is left out: it is data-dependent and would break the graph)."""
    p = check_sample_param(p, name)
    if not isinstance(p, torch.Tensor):
        return p
    if p.shape[0] != B:
        raise ValueError(f"{name} must be a float or a Tensor[B] with B = {B} (the batch size), "
                         f"got shape {list(p.shape)}")
    if not p.dtype.is_floating_point and p.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold floating-point values, got {p.dtype}")
    p = p.to(device=device, dtype=torch.float32)
    if torch.compiler.is_compiling():
        return p
    bad = ~((p >= 0) & torch.isfinite(p))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and >= 0 for every sample, got {p[i].item()} at index {i}")
    return p


def check_labels(labels, B: int, device, name: str = "labels") -> torch.Tensor:
    """Class indices as an int64 Tensor[B] on device."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be an integer Tensor[B], got {type(labels).__name__}") from None
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer (int64) Tensor[B] of class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"{name} must be a Tensor[B] with B = {B} (one per input), got shape {list(labels.shape)}")
    return labels.to(device=device, dtype=torch.int64)


#: The pip requirement named when an optional package is missing (its top-level name -> requirement).
OPTIONAL_PINS = {"kornia": "kornia==0.9.0", "ot": "POT==0.9.7.post1"}


def optional_import(name: str, feature: str):
    """The module ``name`` (e.g. "kornia.filters"), imported now; an ImportError naming ``feature`` (what
    needs it) and the pip command that installs it when the package is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = name.split(".")[0]
        raise ImportError(f"{feature} needs {top}: pip install {OPTIONAL_PINS.get(top, top)} "
                          f"(importing {name!r} failed: {e})") from e


class LazyModule:
    """A stand-in for an optional module, bound at module level in place of ``import name``: its first
    attribute read imports it through :func:`optional_import` (so its ImportError names ``feature``),
    so importing the module that holds it never needs the package."""

    def __init__(self, name: str, feature: str):
        self._name, self._feature, self._module = name, feature, None

    def __getattr__(self, attr: str):
        if attr.startswith("__") or attr in ("_name", "_feature", "_module"):  # copy / pickle probes
            raise AttributeError(attr)
        if self._module is None:
            self._module = optional_import(self._name, self._feature)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._name!r}, loaded={self._module is not None})"
