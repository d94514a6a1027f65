"""InfoAT (Xu, Zhang, Li & Zhang, "InfoAT: improving adversarial training using the information
bottleneck principle", IEEE TNNLS 2022, arXiv 2206.12292): examples whose input X and latent
representation Z share much information are the ones an attack breaks most easily (the hard ones);
InfoAT estimates I(X; Z) per example and weights those examples up in adversarial training.

Only the paper's abstract could be read here (not its method section), so this is the closest faithful
reading of it, with every choice stated:

- Z: the representation the classifier head reads (the input of the model's last ``nn.Linear``,
  :func:`~robustops.train.mutual_info.latent_module`), of the clean example, from a forward in eval
  mode without gradients (batch-norm statistics untouched).
- I(X; Z) per example: the InfoNCE estimate I_i of :mod:`robustops.train.mutual_info` (a separable
  critic trained alongside the classifier, one Adam step per minibatch at ``info_lr``; the paper trains
  its own estimator network, whose form is not known here).
- The weights (normalised to mean 1 over the minibatch, so that the loss keeps its scale):

      w_i = (1 - info_mix) + info_mix * B * softmax_i(I_i / info_tau)

  info_tau (> 0) sets how sharply high-MI examples dominate (large: uniform), info_mix in [0, 1] how
  much of the loss is re-weighted; info_mix = 0 gives w_i = 1 exactly, and InfoAT is then its base
  method bit for bit (the test). With per-sample weights of the run (a coreset's) the two multiply.
- The objective (``info_base``; which one the paper weights could not be read): "pgd" (default)
  minimises sum_i w_i CE(f(x'_i), y_i) / sum_i w_i at the PGD-k adversary; "trades" minimises
  sum_i w_i (CE(f(x_i), y_i) + beta KL(f(x_i) || f(x'_i))) / sum_i w_i at TRADES' own adversary x'.
  InfoAT sets the weights on the context and runs the base method's own step (``pgd`` / ``trades``:
  its adversary and its weighted loss), so the attack is unchanged. The
  default is the one that measured best on digits (benchmarks/infoat_digits.py, 3 seeds: PGD-20
  accuracy 66.4 % against PGD-7 AT's 65.9 %, clean 98.3 % against 98.4 %; within the seeds' spread).

State (exact resume): the critic, its Adam state and step count. DDP: the critic's gradients are
averaged over the ranks (``collective.sync_tensors_``); the weights are normalised over each rank's
own minibatch (the global batch normalisation would need one more collective per step).
"""
from __future__ import annotations

import torch

from ... import _rng
from ..mutual_info import MIEstimator, latent_module
from ..perceptual import capture_features
from ..registry import Hyper, Method, register
from .pgd import PGDTraining
from .trades import Trades

__all__ = ["InfoAT", "info_weights"]

BASES = ("pgd", "trades")
#: the sub-stream of the run's seed that the critic's initial weights come from (the run uses 2 for the model's
#: initialisation and 3 for the coreset selection)
CRITIC_STREAM = 4


def info_weights(mi: torch.Tensor, tau: float, mix: float) -> torch.Tensor:
    """w = (1 - mix) + mix * B * softmax(mi / tau) of per-example estimates mi [B] (mean 1; mix = 0:
    ones exactly)."""
    if mi.dim() != 1:
        raise ValueError(f"mi must be a Tensor[B], got shape {list(mi.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix!r}")
    return (1.0 - mix) + mix * mi.shape[0] * torch.softmax(mi.float() / tau, dim=0)


@register
class InfoAT(Method):
    name = "infoat"
    help = "InfoAT: adversarial training weighted by a per-example I(X; Z) estimate (Xu et al. 2022)"
    hyper = (Hyper("info_base", "pgd", "InfoAT base objective: pgd or trades", kind="choice", choices=BASES),
             Hyper("beta", 6.0, "TRADES beta", minimum=0.0),
             Hyper("info_tau", 1.0, "InfoAT weight temperature on the MI estimates (nats)", minimum=0.0, strict=True),
             Hyper("info_mix", 0.5, "InfoAT share of the MI re-weighting (0: the base method)", minimum=0.0,
                   maximum=1.0),
             Hyper("info_lr", 1e-3, "InfoAT MI critic learning rate (Adam)", minimum=0.0, strict=True),
             Hyper("info_width", 64, "InfoAT MI critic hidden units", kind="int", minimum=1))
    options = ("ema",)
    sample_weights = True
    budget_schedules = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"InfoAT ({'TRADES' if cfg.info_base == 'trades' else 'PGD'}-{cfg.steps})"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.base = (Trades if self.cfg.info_base == "trades" else PGDTraining)(ctx)
        self.latent = latent_module(ctx.forward)
        # the critic's initial weights from a sub-stream of the run's seed, not from ctx.seed(): the attack's
        # stream stays the base method's (seed None: one drawn from torch's generator; DDP broadcasts rank 0's)
        seed = _rng.resolve_seed(None if self.cfg.seed is None else _rng.derive_seed(self.cfg.seed, CRITIC_STREAM))
        self.estimator = MIEstimator(lr=self.cfg.info_lr, width=self.cfg.info_width, seed=seed,
                                     device=ctx.device, world_size=ctx.world_size)

    def latent_of(self, x: torch.Tensor) -> torch.Tensor:
        """Z of x: the input of the model's last linear layer (eval mode, no gradient; mode restored)."""
        fwd = self.ctx.forward
        was_training = fwd.training
        fwd.eval()
        try:
            with torch.no_grad(), self.ctx.autocast(), capture_features([self.latent], inputs=True) as feats:
                fwd(x)
        finally:
            fwd.train(was_training)
        return feats[-1].float()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """This minibatch's loss weights (one critic step on it first); the run's own weights multiply in."""
        c = self.cfg
        mi = self.estimator.update(x, self.latent_of(x))
        w = info_weights(mi, c.info_tau, c.info_mix)
        return w if self.ctx.weights is None else w * self.ctx.weights

    def step(self, x, y):
        """The base method's own step with ctx.weights = the InfoAT weights (times the run's), restored after;
        info_mix = 0 (w = 1 exactly) leaves the run's weights, or none, as they are: the base step itself."""
        ctx = self.ctx
        own = ctx.weights
        w = self.weights(x)  # the critic steps whatever info_mix is (its state does not depend on it)
        if self.cfg.info_mix > 0:
            ctx.weights = w
        try:
            return self.base.step(x, y)
        finally:
            ctx.weights = own

    def state_dict(self):
        return {"estimator": self.estimator.state_dict()}

    def load_state_dict(self, state) -> None:
        if "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])
