"""PGD and FGSM: their options and a run of the projected-gradient engine
(:mod:`robustops.attacks.engine`) on the base :class:`~robustops.attacks.base.Attack`, which owns the
model's state, the box, normalisation, targets and seeds."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .. import _checks
from .base import Attack, Param, dlr_loss, frozen, step_params  # noqa: F401 -- frozen, Param: old home
from .engine import AttackResult, layout
from .graph import GraphCache

__all__ = ["PGD", "FGSM", "dlr_loss"]


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018), L-inf or L2, in pixel space.

    model: an nn.Module (or callable) mapping inputs to logits. If it expects normalized inputs, give
      ``mean`` / ``std`` (per channel): the attack then works on [clip] pixels and feeds the model
      ``(x - mean) / std`` (``models.Normalize``). A model that normalizes inside takes the pixels as they are.
    eps: radius, a float or a Tensor[B] (per sample); alpha: step size (float or Tensor[B]; default
      2.5 * eps / steps); steps >= 1; norm: "linf" or "l2".
    random_start: start from a random draw in the eps-ball (``random_init``), seeded by ``seed``
      (None: a seed drawn from torch's default generator at each call, so torch.manual_seed governs it).
      L-inf: uniform in the box. L2: a uniform direction at a radius set by ``l2_radius``: "uniform"
      (eps * U, the default, as torchattacks' PGDL2) or "ball" (uniform in the ball's volume,
      eps * U^(1/D)). Measured on a PGD-trained digits model (benchmarks/results/l2_start.csv, 20 seeds)
      "uniform" leaves 1.6-1.8 points less robust accuracy at eps 1.0 with one start (p < 1e-6);
      with 5 restarts "ball" is 0.8-1.3 points stronger, so pass l2_radius="ball" with many restarts.
    restarts: independent random starts; per sample the first restart that fools the model is kept,
      else the one with the highest final loss. So more restarts never weaken the attack.
    targeted: minimize the loss towards ``targets`` (given at call time, or made by ``target_fn(images,
      labels)``); success means predicting the target.
    loss: "ce" (cross entropy), "dlr" (Croce & Hein) or a callable ``loss(logits, y)`` returning
      per-sample losses [B] (or a scalar); y is the labels, or the targets when targeted. The attack
      ascends it, or descends it when targeted.
    clip: (lo, hi) valid pixel range; images must lie in it.
    early_stop: evaluation mode: samples that are fooled leave the batch (their x_adv is the iterate
      that fooled), so later steps compute only on samples still standing; a success at any step counts.
    record_steps: keep the full batch but record, per sample, the first step that fooled (and return
      that iterate): the same answer as early_stop, without the early exit.
    train_mode: attack with the model in train mode (as fast adversarial training does; batch-norm
      running statistics are then updated); default eval mode. The model's mode is restored afterwards.
    dtype: autocast dtype for the model's forward (torch.bfloat16 / torch.float16 / their names; None or
      float32: no autocast).
    graph: on CUDA, capture one full iteration (forward, backward to the input, projection) into a
      CUDA graph on static buffers and replay it; new shapes re-capture (a few graphs are cached),
      early exit runs inside the graph as step recording; where capture fails, a warning and the
      eager path.
    """

    max_graphs = 3

    def __init__(self, model, eps: Param, alpha: Optional[Param] = None, steps: int = 10, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, targeted: bool = False,
                 loss: Union[str, Callable] = "ce", clip=(0.0, 1.0), mean=None, std=None, early_stop: bool = False,
                 record_steps: bool = False, seed: Optional[int] = None, train_mode: bool = False, dtype=None,
                 graph: bool = False, target_fn: Optional[Callable] = None, l2_radius: str = "uniform"):
        super().__init__(model, loss=loss, targeted=targeted, target_fn=target_fn, clip=clip, mean=mean, std=std,
                         seed=seed, train_mode=train_mode, dtype=dtype)
        self.eps = _checks.check_sample_param(eps, "eps")
        self.alpha = None if alpha is None else _checks.check_sample_param(alpha, "alpha")
        self.steps = _checks.check_int(steps, "steps", 1)
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.random_start = bool(random_start)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.early_stop = bool(early_stop)
        self.record_steps = bool(record_steps)
        self.graph = bool(graph)
        self._graphs = GraphCache(self.max_graphs)
        self._warned = set()
        self.engine = self.make_engine(self.norm, l2_radius)

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"{type(self).__name__}(eps={eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, targeted={self.targeted}, "
                f"loss={self.loss!r}, early_stop={self.early_stop}, graph={self.graph})")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                eps: Optional[Param] = None, alpha: Optional[Param] = None, offset: Optional[int] = None,
                skip: Optional[torch.Tensor] = None, evaluate: bool = True) -> AttackResult:
        """Runs the attack. images [B, ...] in clip; labels [B]; targets [B] (targeted attacks).

        eps / alpha override the attack's (floats or Tensor[B]). offset: index of this batch's first
        sample in the random stream (default: the number of samples this attack has seen), so that
        every batch draws different random starts, reproducibly from ``seed``. skip: BoolTensor[B] of
        samples counted as already fooled (e.g. misclassified clean inputs); with early_stop they are
        not attacked. evaluate: also compute success / loss / prediction at x_adv (one more forward
        when neither early_stop nor record_steps is on)."""
        return super().perturb(images, labels, targets, offset=offset, skip=skip, evaluate=evaluate, eps=eps,
                               alpha=alpha)

    def prepare(self, x: torch.Tensor, eps: Optional[Param] = None, alpha: Optional[Param] = None) -> dict:
        """eps / alpha per sample on x's device (alpha by default Madry et al.'s :func:`~.base.madry_step`)."""
        return step_params(x, self.eps if eps is None else eps, self.alpha if alpha is None else alpha, self.steps)

    def attack(self, x, y, targets, *, seed, offset, skip, evaluate, eps, alpha) -> AttackResult:
        """The engine's run from a uniform (random_start) or clean start, replayed as a CUDA graph
        with graph=True on CUDA inputs."""
        loop = self._graph_loop(x) if self._use_graph(x) else None
        return self.engine.run(x, (y, targets), eps, alpha, self.steps,
                               start="uniform" if self.random_start else "clean", seed=seed, offset=offset,
                               restarts=self.restarts, record=self.record_steps, early_exit=self.early_stop,
                               evaluate=evaluate, skip=skip, loop=loop)

    # --------------------------------------------------------------------------- CUDA graph

    def _use_graph(self, x) -> bool:
        if not self.graph:
            return False
        if x.device.type != "cuda":
            if "device" not in self._warned:
                self._warned.add("device")
                warnings.warn(f"graph=True needs CUDA inputs, got {x.device}: running the eager path", stacklevel=6)
            return False
        return True

    def _graph_loop(self, x):
        net = self.net
        module = net if isinstance(net, nn.Module) else None
        # The graph reads the model's parameters and buffers where they were at capture: a model moved
        # or re-allocated since (.to(), new tensors) gets a new graph.
        storage = tuple(t.data_ptr() for t in net.parameters()) + tuple(t.data_ptr() for t in net.buffers()) \
            if module is not None else ()
        key = (tuple(x.shape), x.dtype, x.device, layout(x), self.targeted, self.norm, self.clip,
               id(self.loss) if callable(self.loss) else self.loss, self.dtype, self.train_mode, self.steps,
               id(net), hash(storage),
               None if self.normalizer is None else tuple(map(tuple, self.normalizer.values())))
        return self._graphs.loop(self.engine, module, key, self.steps, self.early_stop)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size alpha = eps (L-inf) from
    the clean input. With random_start=True it is FGSM-RS (Wong et al. 2020): a uniform start in the
    ball and a step of alpha = 1.25 * eps by default. Other options as :class:`PGD`."""

    def __init__(self, model, eps: Param, alpha: Optional[Param] = None, norm: str = "linf",
                 random_start: bool = False, **kwargs):
        if "steps" in kwargs and kwargs.pop("steps") != 1:
            raise ValueError("FGSM takes exactly one step; use PGD for more")
        eps = _checks.check_sample_param(eps, "eps")
        if alpha is None:
            alpha = eps * (1.25 if random_start else 1.0)
        super().__init__(model, eps=eps, alpha=alpha, steps=1, norm=norm, random_start=random_start, **kwargs)
