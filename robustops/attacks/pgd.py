"""PGD and FGSM: configuration, argument checks and the model's state around a run of the
projected-gradient engine (:mod:`robustops.attacks.engine`)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks, _rng
from ..models import Normalize
from .engine import AttackResult, Engine, memory_format, predictions
from .graph import GraphCache

__all__ = ["PGD", "FGSM", "dlr_loss"]

Param = Union[float, int, torch.Tensor]


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Croce & Hein's difference-of-logits-ratio loss, per sample (higher = closer to a misclassification).
    Untargeted: -(z_y - max_{i != y} z_i) / (z_(1) - z_(3)); targeted: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2),
    z_(k) being the k-th largest logit. Needs 3 classes (4 when targeted)."""
    C = logits.shape[1]
    z = logits.float()
    srt = z.sort(dim=1, descending=True).values
    zy = z.gather(1, labels[:, None]).squeeze(1)
    if targets is None:
        if C < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, the model has {C}")
        top_is_y = z.argmax(1) == labels
        other = torch.where(top_is_y, srt[:, 1], srt[:, 0])
        return -(zy - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    if C < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {C}")
    zt = z.gather(1, targets[:, None]).squeeze(1)
    return -(zy - zt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def _ce_score(logits, y):
    labels, targets = y
    if targets is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


class PGD:
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
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable returning logits, got {type(model).__name__}")
        self.model = model
        self.eps = _checks.check_sample_param(eps, "eps")
        self.alpha = None if alpha is None else _checks.check_sample_param(alpha, "alpha")
        self.steps = _checks.check_int(steps, "steps", 1)
        if norm not in ("linf", "l2"):
            raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
        self.norm = norm
        self.random_start = bool(random_start)
        self.restarts = _checks.check_int(restarts, "restarts", 1)
        self.targeted = bool(targeted)
        if not (callable(loss) or loss in ("ce", "dlr")):
            raise ValueError(f'loss must be "ce", "dlr" or a callable loss(logits, y), got {loss!r}')
        self.loss = loss
        try:
            lo, hi = (float(c) for c in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be a pair (lo, hi) of floats, got {clip!r}") from None
        if not lo < hi:
            raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
        self.clip = (lo, hi)
        self.normalizer = None if mean is None and std is None else Normalize(mean, std)
        self.early_stop = bool(early_stop)
        self.record_steps = bool(record_steps)
        if seed is not None and not _checks.is_int(seed):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.train_mode = bool(train_mode)
        self.dtype = _checks.autocast_dtype(dtype)
        self.graph = bool(graph)
        self.target_fn = target_fn
        self._samples_seen = 0
        self._graphs = GraphCache(self.max_graphs)
        self._warned = set()
        self.engine = Engine(self._forward, self._objective, norm=self.norm, lo=lo, hi=hi, dtype=self.dtype,
                             success=self._success, score=_ce_score, l2_radius=l2_radius)

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, torch.Tensor) else f"Tensor[{self.eps.numel()}]"
        return (f"{type(self).__name__}(eps={eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, targeted={self.targeted}, "
                f"loss={self.loss!r}, early_stop={self.early_stop}, graph={self.graph})")

    @property
    def mean(self) -> Optional[torch.Tensor]:
        return None if self.normalizer is None else self.normalizer.mean.flatten()

    @property
    def std(self) -> Optional[torch.Tensor]:
        return None if self.normalizer is None else self.normalizer.std.flatten()

    # ---------------------------------------------------------------------------- the model

    @property
    def _net(self):
        m = self.model
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return m.module  # the reducer expects parameter gradients; the attack needs none
        return m

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input for pixels x: (x - mean) / std when mean / std were given, else x."""
        if self.normalizer is None:
            return x
        if self.normalizer.mean.device != x.device:
            self.normalizer.to(x.device)
        return self.normalizer(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(self.normalize(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for pixels x (normalized as the attack does), in the current model mode."""
        return self.engine.logits(x)

    def _model_state(self):
        """Model in eval (or train, with train_mode) mode and its parameters not requiring gradients;
        both restored afterwards."""
        return frozen(self._net, self.train_mode)

    # ------------------------------------------------------------------------ the objective
    # The engine's y is the pair (labels, targets); targets is None for untargeted attacks.

    def _objective(self, logits, y):
        """Per-sample objective to maximize, [B] (a scalar for a callable returning one)."""
        labels, targets = y
        if self.loss == "ce":
            return _ce_score(logits, y)
        if self.loss == "dlr":
            return dlr_loss(logits, labels, targets)
        out = self.loss(logits, labels if targets is None else targets)
        if not isinstance(out, torch.Tensor) or out.dim() > 1 or (out.dim() == 1 and out.shape[0] != logits.shape[0]):
            raise ValueError(f"a custom loss must return a scalar or per-sample losses [B], got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        out = out.float()
        return out if targets is None else -out

    @staticmethod
    def _success(logits, y):
        """The model is fooled: it predicts another class than the label (the target when targeted).
        Logits with a NaN predict nothing (engine.predictions): no success to claim."""
        labels, targets = y
        pred = predictions(logits)
        return ((pred != labels) & (pred >= 0)) if targets is None else (pred == targets)

    # ------------------------------------------------------------------------------- checks

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, ...], got {type(images).__name__}")
        if images.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"images must be float32, float16 or bfloat16 pixels in clip={self.clip}, "
                            f"got {images.dtype}"
                            + (" (divide uint8 images by 255)" if images.dtype == torch.uint8 else ""))
        if images.dim() < 2:
            raise ValueError(f"images must have a batch dimension [B, ...], got shape {list(images.shape)}")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())
            lo, hi = float(lo), float(hi)
            if not (lo >= self.clip[0] and hi <= self.clip[1]):
                raise ValueError(f"images must lie in clip=({self.clip[0]}, {self.clip[1]}) (pixel space; give "
                                 f"mean/std for a model that takes normalized inputs), got values in [{lo}, {hi}]")
        return images.detach()

    def _targets(self, x, y, targets, B, device):
        if not self.targeted:
            if targets is not None:
                raise ValueError("targets were given to an untargeted attack; build it with targeted=True")
            return None
        if targets is None and self.target_fn is not None:
            targets = self.target_fn(x, y)
        if targets is None:
            raise ValueError("a targeted attack needs targets: call atk(images, labels, targets) with a "
                             "Tensor[B] of target classes, or give target_fn")
        return _checks.check_labels(targets, B, device, "targets")

    # --------------------------------------------------------------------------------- call

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """Adversarial examples for (images, labels): a tensor like images."""
        return self.perturb(images, labels, targets, evaluate=False, **kwargs).x_adv

    #: the default step size is ALPHA_PER_STEP * eps / steps (Madry et al.'s 2.5)
    ALPHA_PER_STEP = 2.5

    def _run_args(self, images, labels, targets, eps, alpha, skip, offset):
        """The checked arguments of one perturb call: (x, y, targets, eps, alpha, skip, offset, empty)
        with eps / alpha per-sample values on x's device (alpha by default ALPHA_PER_STEP * eps / steps)
        and empty the result when no sample is left to attack (see :meth:`_start_run`)."""
        x = self._check_images(images)
        B, device = x.shape[0], x.device
        y = _checks.check_labels(labels, B, device, "labels")
        t = self._targets(x, y, targets, B, device)
        eps = _checks.sample_param_on(self.eps if eps is None else eps, "eps", B, device)
        if alpha is None:
            alpha = self.alpha
        if alpha is None:
            k = self.ALPHA_PER_STEP / self.steps
            alpha = eps * k if isinstance(eps, torch.Tensor) else k * eps
        alpha = _checks.sample_param_on(alpha, "alpha", B, device)
        skip, offset, empty = self._start_run(x, skip, offset)
        return x, y, t, eps, alpha, skip, offset, empty

    def _start_run(self, x: torch.Tensor, skip, offset):
        """(skip on x's device, the run's random-stream offset, an empty AttackResult for B = 0 or
        None): the bookkeeping every perturb starts with. offset None continues after the samples
        this attack has seen."""
        B, device = x.shape[0], x.device
        if skip is not None:
            if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.shape != (B,):
                raise ValueError(f"skip must be a BoolTensor[B] with B = {B}, got "
                                 f"{list(skip.shape) if isinstance(skip, torch.Tensor) else type(skip).__name__}")
            skip = skip.to(device)
        if offset is None:
            offset = self._samples_seen
        self._samples_seen = offset + B
        empty = None
        if B == 0:
            none = torch.zeros(0, dtype=torch.int64, device=device)
            empty = AttackResult(x.clone(), none.bool(), none, none, torch.zeros(0, device=device), none)
        return skip, offset, empty

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
        x, y, t, eps, alpha, skip, offset, empty = self._run_args(images, labels, targets, eps, alpha, skip, offset)
        if empty is not None:
            return empty
        seed = _rng.resolve_seed(self.seed)
        loop = self._graph_loop(x) if self._use_graph(x) else None
        with self._model_state():
            return self.engine.run(x, (y, t), eps, alpha, self.steps,
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
                warnings.warn(f"graph=True needs CUDA inputs, got {x.device}: running the eager path", stacklevel=4)
            return False
        return True

    def _graph_loop(self, x):
        net = self._net
        module = net if isinstance(net, nn.Module) else None
        # The graph reads the model's parameters and buffers where they were at capture: a model moved
        # or re-allocated since (.to(), new tensors) gets a new graph.
        storage = tuple(t.data_ptr() for t in net.parameters()) + tuple(t.data_ptr() for t in net.buffers()) \
            if module is not None else ()
        key = (tuple(x.shape), x.dtype, x.device, memory_format(x), self.targeted, self.norm, self.clip,
               id(self.loss) if callable(self.loss) else self.loss, self.dtype, self.train_mode, self.steps,
               id(net), hash(storage),
               None if self.normalizer is None else tuple(map(tuple, self.normalizer.values())))
        return self._graphs.loop(self.engine, module, key, self.steps, self.early_stop)


def _set_mode(net: nn.Module, training: bool) -> None:
    try:
        net.train(training)
    except (NotImplementedError, RuntimeError):
        pass  # e.g. torch.export modules, whose mode is fixed


@contextlib.contextmanager
def frozen(module, training: bool = False):
    """module (an nn.Module, else nothing happens) in eval mode (train mode with training=True) with its
    parameters not requiring gradients, for an attack that differentiates through it only to the input;
    mode and flags restored afterwards."""
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        _set_mode(module, training)
        for p, rg in flags:
            if rg:
                p.requires_grad_(False)
        yield
    finally:
        for p, rg in flags:
            if rg:
                p.requires_grad_(True)
        _set_mode(module, was_training)


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
