"""Attacks and robust-accuracy evaluation on the fused ``pgd_step_`` and ``random_init`` ops.

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10, norm="linf")
    x_adv = atk(images, labels)                 # like torchattacks: images in clip=(0, 1)
    res = atk.perturb(images, labels)           # AttackResult: x_adv, success, success_step, ...
    robust_accuracy(model, loader, atk)         # {"clean_acc", "robust_acc", "n", ...}

Per iteration an attack runs one forward and one backward with respect to the input only (the
model's parameters are set not to require gradients for the duration) and one fused projection
kernel. Options: restarts (per sample, the first restart that fools, else the one with the highest
loss), early exit (samples that are already fooled leave the batch), per-sample eps / alpha, targeted
attacks, CE / DLR / custom losses, normalization in front of the model (``mean`` / ``std``),
train-mode attacks, autocast, and on CUDA a CUDA-graph replay of the whole iteration.

APGD-CE / APGD-DLR (``APGD``) and APGD-T (``APGDT``), Croce & Hein 2020's Auto-PGD, run on the same
engine with their step-size schedule and momentum. ``LatentPGD`` attacks in a learned perturbation set
(Wong & Kolter 2021): PGD over the latent offset of a perturbation model, on the same engine.

Every attack is an :class:`Attack` (``base``: the model's mode, the clipping box, normalisation,
targets, seeds, the autocast dtype and the ``perturb`` template; its docstring says how to write a new
attack). ``madry_step(eps, steps)`` is Madry et al.'s default step size 2.5 * eps / steps.

``FAB`` / ``FABT`` (Croce & Hein 2020's minimally distorted fast adaptive boundary attack) and
``Square`` (Andriushchenko et al. 2020, gradient-free random search) complete AutoAttack; ``Suite``
(``suites``) runs its standard, plus and rand versions AutoAttack's way, with the per-stage log and a
masking check, and ``robustops.evaluate`` calls it on any model and data.

Layout: ``base`` (Attack, the losses, the default step sizes), ``engine`` (the one projected-gradient
iteration, shared with training), ``pgd`` (PGD / FGSM), ``apgd`` (Auto-PGD), ``fab`` (FAB, FAB-T),
``square`` (Square), ``latent`` (learned perturbation sets), ``graph`` (CUDA-graph replay),
``evaluation`` (robust accuracy of one attack or an ensemble), ``suites`` (AutoAttack and the other
suites of ``robustops evaluate``), ``transfer`` (``Transfer``: examples crafted on a source model, judged by
the target), ``wasserstein`` (``internal_wasserstein``: the internal Wasserstein distance between two images'
patch distributions), ``iwd`` (``IWDAttack``: the loss maximised under an IWD budget) and ``jstm``
(``JSTMAttack``: the joint latent + pixel threat model through a normalising flow).
"""
from .apgd import APGD, APGDT
from .base import Attack, madry_step
from .engine import STARTS, AttackResult, Engine, Recorder
from .evaluation import robust_accuracy
from .fab import FAB, FABT, FABResult
from .iwd import IWDAttack, IWDResult
from .jstm import JointEngine, JSTMAttack, JSTMAttackResult, joint_budget
from .latent import LatentAttackResult, LatentPGD, nearest_member, random_members
from .pgd import FGSM, PGD, dlr_loss
from .square import Square, SquareResult, square_p_selection
from .suites import Suite
from .transfer import Transfer
from .wasserstein import internal_wasserstein

__all__ = ["Attack", "madry_step", "PGD", "FGSM", "APGD", "APGDT", "LatentPGD", "AttackResult", "LatentAttackResult",
           "robust_accuracy", "dlr_loss", "FAB", "FABT", "FABResult", "Square", "SquareResult", "square_p_selection",
           "Suite", "Transfer", "IWDAttack", "IWDResult", "internal_wasserstein", "JSTMAttack", "JSTMAttackResult",
           "JointEngine", "joint_budget", "Engine", "Recorder", "STARTS", "nearest_member", "random_members"]
