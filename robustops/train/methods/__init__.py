"""The built-in training methods, one file each; importing a module registers its method."""
from . import natural, pgd, free, fgsm, trades, gaussian, ibp, acert, learned, dale  # noqa: F401  (registration order = listing order)
from . import consistency  # noqa: F401
from . import macer  # noqa: F401
from . import smoothadv  # noqa: F401
from . import smoothmix  # noqa: F401
from . import fastibp  # noqa: F401
from . import crown_ibp  # noqa: F401
from . import fgsm_sdi  # noqa: F401
from . import denoise  # noqa: F401
from . import rlat  # noqa: F401
from . import ada  # noqa: F401
from . import augrmix  # noqa: F401
from . import infoat  # noqa: F401
from . import sat  # noqa: F401
from . import jsigr  # noqa: F401
from . import iwd  # noqa: F401
from . import ijsat  # noqa: F401
