"""J-SIGR: Jacobian norm with selective input-gradient regularisation (Liu, Wu, Zhao, Boussaid, Bennamoun &
Xie 2022, arXiv 2207.13036): a model made locally linear-stable by a penalty on the Frobenius norm of its
input-output Jacobian, and interpretable by a penalty on its perturbation-based saliency map outside the
pixels it selects, for robustness to transferred attacks.

The loss of a minibatch, as implemented here:

    L = (1 - a) CE(f(x), y) + a CE(f(x'), y)
        + lambda_J / 2 * mean_b ||J(x_b)||_F^2                                         (Jacobian norm)
        + lambda_S * mean_b || M_b * grad_x CE(f(x'_b), y_b) ||_2^2                  (selective input gradient)

- J(x) = df(x)/dx, the logits' Jacobian at the clean input, estimated with Hoffman et al.'s random
  projections (:func:`robustops.train.jacobian.jacobian_frobenius`: C ||v^T J||^2, v uniform on the
  sphere; ``jsigr_projections`` draws, each one vector-Jacobian product, back-propagated by double
  back-propagation) -- the Jacobian regulariser of Hoffman et al. 2019 with their lambda_JR / 2 scaling.
- The perturbation-based saliency map of x is the input gradient of the loss at the perturbed input
  x' = x + delta, delta the PGD-k perturbation of the threat model (eps, alpha, steps, norm, random start;
  ``ctx.budget``): S(x) = grad_x CE(f(x'), y). The selection M_b keeps the pixels where the map is weak:
  M_b = 1 on the elements of |S(x_b)| (detached) below their per-sample (1 - jsigr_keep) quantile (the
  lowest 1 - jsigr_keep fraction), 0 on the top jsigr_keep fraction, the salient ones, which are left free.
  The penalty therefore vanishes exactly when the saliency is supported on at most a jsigr_keep fraction
  of the input, and drives it there otherwise: sparse, object-aligned saliency (Ross & Doshi-Velez 2018's
  input-gradient regularisation made selective).
- a = ``jsigr_adv``: the weight of the cross-entropy on x' (0: clean cross-entropy, the choice made here;
  1: adversarial training with both regularisers). With lambda_S = 0 and a = 0, x' is unused: neither the
  PGD attack nor the forward on x' runs (the attack's seed is still drawn; the weights are those of the
  full step, but BatchNorm's running statistics then see the clean batch only).

What could not be read, and the choices made: the method section of arXiv 2207.13036 (its equations for
the two terms and the saliency's selection) was not available to this implementation (only the abstract:
"linearized robustness through Jacobian normalization" and "regularizes the perturbation-based saliency
maps"), nor was the authors' code (github.com/Lywu-github/jJ-SIGR, named in the journal version); the
equations above are the closest faithful reading of it built from the two works it extends
(Hoffman et al. 2019's Jacobian regulariser, Ross & Doshi-Velez 2018's input-gradient penalty with a
mask), and the defaults are those works' MNIST values where they have one: lambda_J = 0.01 and one
projection (Hoffman et al.); lambda_S = 1, keep = 0.5 and the PGD perturbation as the saliency's
"perturbation" are choices made here. A secondary survey page (emergentmind.com, "Selective Input Gradient
Regularization", citing Liu et al. 2022; only its opening could be read) describes SIGR as penalising the
input gradient only on the elements deemed non-salient, perturbation-based masks being one way to choose
them: the direction of M_b here (the weak elements penalised, the salient ones free). It gives no selection
rule (a fixed fraction, a threshold), so the per-sample quantile at jsigr_keep stays a choice made here. The
selection mask is taken without gradient (a quantile is
piecewise constant). The whole loss is computed in float32 with autocast off (the double backward of an
fp16 input gradient underflows), so a run with ``amp`` trains J-SIGR's step in full precision; the PGD
perturbation follows the run's autocast. The random projections
come from a generator seeded by ``ctx.seed()`` each step, so an interrupted run resumes exactly without
method state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..jacobian import jacobian_frobenius
from ..registry import Hyper, Method, register

__all__ = ["JSIGR", "selection_mask", "selective_penalty"]


def selection_mask(saliency: torch.Tensor, keep: float) -> torch.Tensor:
    """M [B, ...]: 1 on the elements of |saliency| strictly below each sample's (1 - keep) quantile (the
    non-salient ones, penalised), 0 on the rest; keep in [0, 1). Detached."""
    a = saliency.detach().abs().flatten(1).float()
    n = a.shape[1]
    free = int(round(keep * n))  # the top `free` elements per sample are left unpenalised
    if free <= 0:
        return torch.ones_like(saliency, dtype=torch.float32)
    thresh = a.topk(free, dim=1).values[:, -1:]
    return (a < thresh).float().view_as(saliency)


def selective_penalty(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_b || M_b * grad_b ||_2^2 (per-sample sum over elements, averaged over the batch)."""
    return (mask * grad.float()).flatten(1).pow(2).sum(1).mean()


@register
class JSIGR(Method):
    name = "jsigr"
    help = "J-SIGR: Jacobian-norm + selective input-gradient regularisation of the saliency map (Liu et al. 2022)"
    hyper = (Hyper("jsigr_lambda_j", 0.01, "J-SIGR weight of the Jacobian term lambda_J / 2 ||J||_F^2 (Hoffman et "
                   "al.'s lambda_JR)", minimum=0.0),
             Hyper("jsigr_lambda_s", 1.0, "J-SIGR weight of the selective input-gradient term", minimum=0.0),
             Hyper("jsigr_keep", 0.5, "J-SIGR fraction of the most salient input elements left unpenalised, in [0, 1)",
                   minimum=0.0, maximum=0.999),
             Hyper("jsigr_projections", 1, "J-SIGR random projections per sample of the Jacobian estimate",
                   kind="int", minimum=1),
             Hyper("jsigr_adv", 0.0, "J-SIGR weight of the cross-entropy on the perturbed input (0: clean CE, "
                   "the choice made here)", minimum=0.0, maximum=1.0))
    budget_schedules = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"J-SIGR (PGD-{cfg.steps} saliency)"

    def uses_perturbation(self) -> bool:
        """Whether the step needs x' (a selective term or a cross-entropy on it): without, no PGD and no
        forward on x' run."""
        return self.cfg.jsigr_lambda_s > 0 or self.cfg.jsigr_adv > 0

    def perturbed(self, x, y):
        """x' = x + delta, the PGD-k perturbation at this minibatch's budget; None when the step does not use
        it (the attack's seed is drawn all the same, so the seed stream does not depend on it)."""
        c, ctx = self.cfg, self.ctx
        eps, alpha = ctx.budget(x, y)
        if self.uses_perturbation():
            return ctx.attack(x, y, eps, alpha, c.steps, c.norm, c.random_start)
        if c.random_start and (torch.is_tensor(eps) or eps > 0):  # the draw ctx.attack makes
            ctx.seed()
        return None

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        x_adv = self.perturbed(x, y)
        gen = torch.Generator().manual_seed(ctx.seed())
        device_type = x.device.type

        def closure(net):
            xc = x.detach().clone().requires_grad_(True)
            xa = None if x_adv is None else x_adv.detach().clone().requires_grad_(True)
            with torch.autocast(device_type, enabled=False):
                # one call on both batches: under DDP each parameter's gradient is then all-reduced once
                logits, logits_a = (net(xc.float()), None) if xa is None else net(xc.float(), xa.float())
                reg = logits.new_zeros(())
                if c.jsigr_lambda_j > 0:
                    jac = jacobian_frobenius(net, xc, c.jsigr_projections, generator=gen, create_graph=True,
                                             outputs=logits)
                    reg = reg + 0.5 * c.jsigr_lambda_j * jac.sq_norm.mean()
                if c.jsigr_lambda_s > 0:  # the saliency map S(x) = grad_x CE(f(x'), y), kept differentiable
                    (sal,) = torch.autograd.grad(F.cross_entropy(logits_a, y, reduction="sum"), xa, create_graph=True)
                    reg = reg + c.jsigr_lambda_s * selective_penalty(sal, selection_mask(sal, c.jsigr_keep))
            ce = ctx.cross_entropy(logits, y)
            if c.jsigr_adv > 0:
                ce = (1.0 - c.jsigr_adv) * ce + c.jsigr_adv * ctx.cross_entropy(logits_a, y)
            return ce + reg, logits

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
