"""The certification modes of `robustops certify` / `robustops predict`, one :class:`Certifier` each, and
the table that chooses one per run from the flags: randomized smoothing with a fixed number of samples
(CERTIFY / PREDICT), of the image or of a learned perturbation set's latent offsets (--threat learned),
sequential smoothing (--sequential) and the bounds (--method ibp|crown|crown-ibp|best).

A mode is chosen by the flag values in its ``when`` (over AXES, whose defaults need no flag); the most
specific mode that matches wins, the earlier one in CERTIFIERS on a tie, and it refuses with a CLIError
the flags it cannot honour. A new mode is one Certifier subclass in this table, its own flags added
by its add_arguments."""
from __future__ import annotations

from typing import List, Tuple, Type

from .base import (COLUMNS, DECISION_LETTERS, HEADERS, Certifier, Checkpoint, Inputs, Rows, Settings,
                   decisions_field, results_file)
from .ibp import BOUND_METHODS, BestCertifier, CrownCertifier, CrownIbpCertifier, IbpCertifier
from .sequential import SequentialCertifier
from .smoothing import LatentCertifier, SmoothingCertifier

__all__ = ["Certifier", "Checkpoint", "Settings", "Inputs", "Rows", "CERTIFIERS", "AXES", "choose", "choices",
           "HEADERS", "COLUMNS", "DECISION_LETTERS", "decisions_field", "results_file", "SmoothingCertifier",
           "LatentCertifier", "SequentialCertifier", "IbpCertifier",
           "CrownCertifier", "CrownIbpCertifier", "BestCertifier", "BOUND_METHODS"]

#: The flags that choose a mode, and their values when not given (predict has none of them but --threat).
AXES = {"method": "smoothing", "threat": "norm", "sequential": False}

#: Every mode; on a tie between equally specific modes the earlier one is chosen (and refuses the other's
#: flag: --sequential refuses --method ibp and --threat learned, --method ibp refuses --threat learned).
CERTIFIERS: List[Type[Certifier]] = [SequentialCertifier, IbpCertifier, CrownCertifier, CrownIbpCertifier, BestCertifier,
                                     LatentCertifier, SmoothingCertifier]


def choose(args, command: str) -> Certifier:
    """The mode of a run of command ("certify" or "predict") with the parsed flags args."""
    def matches(cls) -> bool:
        return command in cls.commands and all(getattr(args, k, AXES.get(k)) == v for k, v in cls.when.items())

    return max((cls for cls in CERTIFIERS if matches(cls)), key=lambda cls: len(cls.when))(command)


def choices(axis: str) -> Tuple:
    """The values of a flag of AXES that choose a mode: its default first, then the table's."""
    return tuple(dict.fromkeys([AXES[axis]] + [cls.when[axis] for cls in CERTIFIERS if axis in cls.when]))
