"""Stylized adversarial training with max-margin learning (Naseer, Khan, Hayat, Khan & Porikli, "Stylized
adversarial defense", TPAMI 2022, arXiv 2007.14672): method ``sat``.

Only the paper's abstract could be read here (no method section, no official code was found), so this is
the closest faithful reading of what the abstract states, with every open choice named:

Target selection. Each sample x_i (label y_i) gets a target x_t(i) of ANOTHER class drawn uniformly from
the minibatch's samples whose label differs (one uniform score per pair from a generator seeded by
``ctx.seed()``, the pair of the same class masked out, the best score taken): the abstract says "a target
sample from another class"; drawing it inside the minibatch (rather than from the data set) is our
choice. A sample whose batch has no other class keeps itself as target and gets none of the
target terms (its attack is plain PGD on the cross-entropy, its margin term is 0).

Attack (the multi-task objective, deep supervision). At the taps phi_l, l = 1..L
(:func:`~robustops.train.perceptual.feature_taps`: every ``feature_modules`` layer by default, or the
depths / layer names of ``sat_layers``), with G(F) = F F^T / (H W) the Gram matrix of a feature map F
[C, H W] (Gatys et al.'s style statistics; a [B, C] output counts as [B, C, 1, 1]),

    style(x', x_t)   = sum_l mean_{c,c'} (G(phi_l(x')) - G(phi_l(x_t)))^2_{cc'}
    content(x', x_t) = sum_l mean_{c,h,w} (phi_l(x') - phi_l(x_t))^2
    boundary(x', t)  = CE(f(x'), y_t) - CE(f(x'), y)

and x' maximises  -(w_s style + w_c content + w_b boundary)  over the eps-ball (PGD on the shared engine,
``ctx.budget`` for eps / alpha, cfg.steps steps, the configured random start): the adversary moves toward
the target's style and content and across the boundary toward the target's class. The boundary term's
form (targeted cross-entropy toward y_t, plus the untargeted one, so a sample without a target is PGD) is
our choice. The attack runs with the model in eval mode (as TRADES' does), so the target's features are
per-sample constants computed once and batch-norm statistics are not disturbed.

Max-margin outer loss. With z(.) the logits and d(a, b) = ||z(a) - z(b)||_2^2,

    L = CE(f(x'), y) + w_mm mean_i max(0, d(x'_i, x_i) - d(x'_i, x_t(i)) + m)

(a triplet hinge: pull the adversary toward its source, push it from the target by a margin m); taking
the distances on the logits and the hinge form are our choices. The step goes through ``ctx.update`` with
the model in train mode (three forwards: x, x_t, then x', the adversarial batch last as in TRADES, so
batch norm's running statistics end on it). The source and target logits z(x), z(x_t) in the hinge are
NOT detached: the gradient flows through all three (a choice the abstract leaves open).

Defaults (the paper's weights could not be read): w_s = w_c = w_b = 1, w_mm = 1, m = 1, all depths.
Randomness comes only from ``ctx.seed()`` (the run's checkpointed generator): resume is exact with no
state of the method's own.

Claim and measurement. The abstract claims stronger robustness than state-of-the-art defenses at unchanged
clean accuracy. On the digits (benchmarks/sat_digits.py, results/sat_digits.csv: 30 epochs, eps 0.2, 2
seeds, CPU) this reading does NOT reproduce it: PGD-20 accuracy 56.7 % against PGD-7 AT's 66.8 % (clean
98.2 % against 98.5 %). The ablation with the boundary term alone (no style, content or max-margin term;
seed 0) reaches 57.8 %, so the gap comes mostly from the targeted boundary term being a weaker adversary
than PGD's untargeted cross-entropy, not from the feature terms or the hinge.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..perceptual import capture_features, feature_taps, four_d
from ..registry import Hyper, Method, register

__all__ = ["SAT", "gram_matrix", "style_loss", "content_loss", "choose_targets", "max_margin_loss", "parse_layers"]


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = F F^T / (H W) of feature maps f [B, C, H, W] (or [B, C]) in float32: Tensor[B, C, C]."""
    f = four_d(f).float()
    flat = f.reshape(f.shape[0], f.shape[1], -1)
    return flat @ flat.transpose(1, 2) / flat.shape[2]


def style_loss(feats: Sequence[torch.Tensor], target_grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l mean_{c,c'} (G(feats_l) - target_grams_l)^2 per sample: Tensor[B]."""
    return sum((gram_matrix(f) - g).pow(2).flatten(1).mean(1) for f, g in zip(feats, target_grams))


def content_loss(feats: Sequence[torch.Tensor], target_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l mean_{c,h,w} (feats_l - target_feats_l)^2 per sample: Tensor[B]."""
    return sum((four_d(f).float() - four_d(t).float()).pow(2).flatten(1).mean(1)
               for f, t in zip(feats, target_feats))


def choose_targets(y: torch.Tensor, generator: Optional[torch.Generator] = None):
    """For labels y [B]: (index [B] of each sample's target, a uniform draw among the batch's samples of
    another class; has [B] bool, False where the batch holds no other class (the index is then the
    sample itself)). The draw is on the CPU from ``generator`` (device independent)."""
    B = y.shape[0]
    scores = torch.rand(B, B, generator=generator).to(y.device)
    other = y.view(-1, 1) != y.view(1, -1)
    scores = torch.where(other, scores, torch.full_like(scores, -1.0))
    idx = scores.argmax(1)
    has = other.any(1)
    return torch.where(has, idx, torch.arange(B, device=y.device)), has


def max_margin_loss(z_adv: torch.Tensor, z_src: torch.Tensor, z_tgt: torch.Tensor, margin: float,
                    has: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_i max(0, ||z_adv - z_src||^2 - ||z_adv - z_tgt||^2 + margin), the terms of samples without
    a target (has False) counted as 0."""
    d_src = (z_adv.float() - z_src.float()).pow(2).sum(1)
    d_tgt = (z_adv.float() - z_tgt.float()).pow(2).sum(1)
    hinge = F.relu(d_src - d_tgt + margin)
    if has is not None:
        hinge = hinge * has.to(hinge.dtype)
    return hinge.mean()


def parse_layers(spec: str):
    """``sat_layers``: "all" -> None; "0,2,-1" -> depths; "features.0,features.2" -> layer names."""
    if spec == "all":
        return None
    parts = [p.strip() for p in spec.split(",")]
    if any(not p for p in parts):
        raise ValueError(f"sat_layers must be 'all' or a comma-separated list of depths or layer names, got {spec!r}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        return parts


@register
class SAT(Method):
    name = "sat"
    help = "stylized max-margin AT: style/content/boundary attack toward another class's sample (Naseer et al. 2022)"
    hyper = (Hyper("sat_style", 1.0, "sat: weight of the Gram-matrix style term of the attack", minimum=0.0),
             Hyper("sat_content", 1.0, "sat: weight of the feature content term of the attack", minimum=0.0),
             Hyper("sat_boundary", 1.0, "sat: weight of the class-boundary term of the attack", minimum=0.0),
             Hyper("sat_mm", 1.0, "sat: weight of the max-margin term of the training loss", minimum=0.0),
             Hyper("sat_margin", 1.0, "sat: margin m of the max-margin hinge (squared logit distance)", minimum=0.0),
             Hyper("sat_layers", "all", "sat: feature taps: all, or comma-separated depths / layer names",
                   kind="str"))
    budget_schedules = True

    @classmethod
    def label(cls, cfg) -> str:
        return f"SAT (PGD-{cfg.steps})"

    @classmethod
    def check_config(cls, cfg) -> None:
        parse_layers(cfg.sat_layers)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.taps: List[torch.nn.Module] = feature_taps(ctx.forward, parse_layers(self.cfg.sat_layers))
        self.engine = ctx.engine(self.cfg.norm, objective=self._objective, forward=self._forward)

    def _forward(self, x, context):
        # logits and the per-sample feature term side by side: the engine hands both to the objective
        c = self.cfg
        grams, feats = context[:len(self.taps)], context[len(self.taps):]
        with capture_features(self.taps) as got:
            logits = self.ctx.forward(x)
        feat_term = c.sat_style * style_loss(got, grams) + c.sat_content * content_loss(got, feats)
        return torch.cat([logits.float(), feat_term.view(-1, 1)], 1)

    @staticmethod
    def _objective(out, labels):
        # labels: (y, y_t, switches [B, 2] = (has a target, w_b)); out: the logits and the feature term
        y_src, y_tgt, switches = labels
        has, w_b = switches[:, 0], switches[:, 1]
        logits, feat_term = out[:, :-1], out[:, -1]
        ce_src = F.cross_entropy(logits, y_src, reduction="none")
        boundary = F.cross_entropy(logits, y_tgt, reduction="none") - ce_src
        return -has * (feat_term + w_b * boundary) + (1 - has) * ce_src

    def adversarial(self, x, y):
        """(x', x_t [B, ...] the targets, target index [B], has-target [B]) for the minibatch (model left in
        eval mode)."""
        c, ctx = self.cfg, self.ctx
        gen = torch.Generator().manual_seed(ctx.seed())
        idx, has = choose_targets(y, gen)
        x_tgt = ctx.fmt(x[idx])  # indexing drops channels_last
        eps, alpha = ctx.budget(x, y)
        ctx.forward.eval()
        with torch.no_grad(), ctx.autocast(), capture_features(self.taps) as got:
            ctx.forward(x_tgt)
        context = tuple(gram_matrix(f) for f in got) + tuple(four_d(f).float() for f in got)
        w = has.float()
        # the objective is a static function of (logits, labels): the switches ride along with the labels
        switches = torch.stack([w, torch.full_like(w, c.sat_boundary)], 1)
        x_adv = ctx.attack(x, (y, y[idx], switches), eps, alpha, c.steps, c.norm, c.random_start,
                           engine=self.engine, context=context)
        return x_adv, x_tgt, idx, has

    def step(self, x, y):
        c, ctx = self.cfg, self.ctx
        x_adv, x_tgt, _, has = self.adversarial(x, y)
        ctx.forward.train()

        def closure(net):
            # the adversarial batch last (as TRADES), so batch norm's running statistics end on it
            z_src, z_tgt, z_adv = net(x, x_tgt, x_adv)
            loss = ctx.cross_entropy(z_adv, y) + c.sat_mm * max_margin_loss(z_adv, z_src, z_tgt, c.sat_margin, has)
            return loss, z_adv

        loss, logits = ctx.update(closure)
        return ctx.stats(loss, logits, y)
