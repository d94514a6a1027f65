"""Randomized smoothing: batched CERTIFY / PREDICT (``Smooth``, in ``smooth``), the average certified
radius, certified-accuracy curves and their plot (``curves``), and smoothing in the latent space of a
learned perturbation set (``LatentSmooth``, in ``latent``: certified latent L2 radii), and sequential
certification (``Smooth.certify_radius`` / ``certify_radii`` / ``certify_sequential``: the statistics in
``sequential``, the batch-refill engine in ``stream``). The command line (``robustops
certify``, its TSV files and resume) lives in ``robustops.cli.certify``."""
from .curves import (COVER_DISSENT, STANDARD_RADII, acr, certified_accuracy, largest_certifiable_radius,
                     plot_certified_accuracy, plot_curve, samples_for_radius, sigma_for_radius)
from .latent import LatentClassifier, LatentSmooth
from .sequential import ABSTAINED, CERTIFIED, NOT_CERTIFIED, clopper_pearson_upper
from .smooth import ABSTAIN, CertifyResult, PredictResult, Smooth, clopper_pearson_lower, phase_seed
from .stream import SequentialRecord, SequentialResult

__all__ = ["Smooth", "CertifyResult", "PredictResult", "clopper_pearson_lower", "acr", "certified_accuracy",
           "plot_certified_accuracy", "plot_curve", "largest_certifiable_radius", "STANDARD_RADII", "ABSTAIN",
           "phase_seed", "LatentSmooth", "LatentClassifier", "SequentialResult", "SequentialRecord", "CERTIFIED",
           "NOT_CERTIFIED", "ABSTAINED", "clopper_pearson_upper", "sigma_for_radius", "samples_for_radius",
           "COVER_DISSENT"]
