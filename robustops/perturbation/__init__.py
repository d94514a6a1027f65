"""Learned perturbation sets (Wong and Kolter 2021, "Learning perturbation sets for robust machine
learning", ICLR): a conditional VAE whose prior p(z|x) = N(mu(x), diag(sigma(x)^2)) and decoder g(z, x)
define the set

    S(x) = { g(mu(x) + sigma(x) * u, x) : ||u||_2 <= eps }

of perturbed versions of x. Attacks, training and certification then work in the latent ball of u
(``robustops.attacks.latent``, the ``learned`` training method, latent randomized smoothing).

One file per part, every public name re-exported here (``robustops.perturbation.X``):

- ``protocol.py``: the perturbation-model protocol every other module relies on (any nn.Module that
  has it works, not only :class:`CVAE`), :func:`prior_scale`, :func:`member`; the only file the
  attacks import;
- ``pairs.py``: pair data, :class:`DigitsPairs` (the embedded digits and a known family of
  perturbations, with the true parameters of every pair; fresh perturbations every epoch by default),
  :class:`NpzPairs` (a user's pairs) and :class:`CropFlipPairs` (a joint crop / flip of both images);
- ``families.py``: the digits' known families one at a time (rotation, translation, scaling, thickness,
  L-inf), the held-out-family split, the real-perturbation baseline's data and :func:`pair_accuracy`;
- ``cifar_c.py``: :class:`CifarCPairs`, CIFAR-10-C pairs from a local directory;
- ``cvae.py``: :class:`CVAE` (prior network p(z|x), encoder q(z|x, x~), decoder g(z, x)) and the
  paper's objective, the beta-weighted ELBO (:func:`perturbation_loss`, :func:`kl_gaussians`);
- ``flow.py``: :class:`Flow`, a Glow-style normalising flow (normflows' layers) with the flow protocol
  (encode, decode, exact log_prob and bits/dim), the joint-space threat model's G; :func:`is_flow`;
- ``fit.py``: :func:`fit_perturbation` (training, checkpoints every epoch, exact resume) and the
  checkpoints (:func:`save_perturbation_model`, :func:`load_perturbation_model`);
- ``autoencoder.py``: AdversarialAugment's corruption networks (Calian et al. 2022): :class:`CorruptionAE`
  (a small conv autoencoder trained by reconstruction), :class:`PriorMeanDecoder` (a CVAE used
  deterministically); :func:`corruption_network` (in ``fit.py``) makes one from a module or checkpoint;
- ``quality.py``: the measures of a learned set (:func:`quality`, :func:`choose_eps`,
  :func:`latent_norms`; the paper's sufficient likelihood :func:`prior_member_error`, the ELBO bound
  :func:`likelihood_bound`), :func:`sample` and :func:`plot_perturbations`; it uses the attacks' latent PGD.
"""
from .cvae import CVAE, kl_gaussians, perturbation_loss
from .fit import (CHECKPOINT_FORMAT, LOG_COLUMNS, PerturbationFit, fit_perturbation, load_perturbation_model,
                  save_perturbation_model)
from .pairs import CropFlipPairs, DigitsPairs, NpzPairs, crop_flip, pairs_per_epoch, set_pairs_epoch, transform_images
from .protocol import check_perturbation_model, member, prior_scale
# Last, and after the submodule of the same name: robustops.perturbation.quality is the function.
from .quality import (choose_eps, latent_norms, likelihood_bound, plot_perturbations, prior_member_error, quality,
                      sample, truncated_prior)

__all__ = ["prior_scale", "member", "check_perturbation_model", "DigitsPairs", "NpzPairs", "transform_images",
           "CropFlipPairs", "crop_flip", "set_pairs_epoch", "pairs_per_epoch",
           "CVAE", "kl_gaussians", "perturbation_loss", "fit_perturbation", "PerturbationFit",
           "load_perturbation_model", "save_perturbation_model", "latent_norms", "choose_eps", "quality",
           "sample", "plot_perturbations", "CHECKPOINT_FORMAT", "prior_member_error", "likelihood_bound",
           "truncated_prior"]
from .autoencoder import CorruptionAE, PriorMeanDecoder, is_autoencoder  # noqa: E402
from .fit import corruption_network, frozen_model  # noqa: E402
from .cifar_c import CifarCPairs  # noqa: E402
from .flow import Flow, is_flow  # noqa: E402
from .fit import FLOW_LOG_COLUMNS  # noqa: E402
from .families import PerturbedImages, held_out_split, pair_accuracy  # noqa: E402

__all__ += ["Flow", "is_flow", "FLOW_LOG_COLUMNS"]
__all__ += ["CorruptionAE", "PriorMeanDecoder", "corruption_network", "frozen_model", "is_autoencoder", "CifarCPairs", "PerturbedImages", "held_out_split", "pair_accuracy"]
