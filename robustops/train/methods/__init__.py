"""The built-in training methods, one file each; importing a module registers its method."""
from . import natural, pgd, free, fgsm, trades, gaussian, ibp, acert, learned, dale  # noqa: F401  (registration order = listing order)
