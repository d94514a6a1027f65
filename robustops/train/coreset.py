"""Adversarial coreset selection in a fit (Dolatabadi, Erfani & Leckie, "Adversarial coreset selection
for efficient robust training", ECCV 2022 / IJCV 2023): after a warm start on the full data, every
``coreset_every`` epochs a weighted subset of ``coreset_frac`` of the training set is chosen from
last-layer gradients of the method's adversarial loss (:mod:`.coreset_select`), and the epochs in
between train on that subset with its weights (``Trainer.train_step(x, y, weights)``: the method's
loss becomes the weighted mean sum_i w_i L_i / sum_i w_i over each minibatch).

**Warm start** (the paper's, as in its code): with T = ``epochs`` and kappa = ``coreset_warmup``,
K = floor(kappa T) and W = round(K * frac) (Python's round), the run trains W epochs on the full data,
then T - K epochs on coresets: W + T - K data passes in all. The W full epochs cost what the K subset
epochs they replace would have cost (W ~ K * frac), so the training compute is about T * frac epochs
plus the selections. kappa = 0: no warm start (the first epoch selects from the initial model).
The first coreset epoch selects, then every ``coreset_every``-th coreset epoch.

**The selection pass** runs over the whole training set in order, with the model in eval mode (the
selection leaves BatchNorm's running statistics as they are; ACS's code attacks in train mode): the
method's ``coreset_inputs(x, y)`` gives its adversarial inputs (PGD / FGSM: CE on x_adv; TRADES: the
clean and the adversarial input), one fp32 forward each captures the last nn.Linear's input h and the
logits, and the closed-form proxies are kept per sample ([C] and [D] vectors, not gradients).

**Epoch-equivalents** (the log's ``equiv_epochs``): samples that went through a training step plus
samples that went through a selection pass (each counted once: the selection attacks every sample
with the method's attack and runs one more forward, what a training step costs without its
backward), divided by the size of the training set. ``select_time`` (seconds, inside ``train_time``)
and ``coreset_size`` (samples trained this epoch) are further log columns.

**Schedule**: the learning-rate schedule's length is the exact number of optimizer steps of the mixed
full / subset epochs (:meth:`CoresetRun.total_steps`); ``ctx.progress`` and ``ctx.epoch`` (the pass
``fit`` is in, ``Trainer.pass_index``) are exact. **Resume**: the current subset, its weights,
the selection count and the run's selection seed are in the checkpoint (``state_dict``); the subset
epochs' shuffling and the random rule draw from generators keyed by (that seed, epoch / selection).
**DDP**: every process computes the proxies of its shard (indices rank::world), they are all-gathered,
and every process runs the same deterministic selection (the seed is rank 0's), then trains on its
DistributedSampler part of the subset.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset, TensorDataset

from .. import _rng
from .context import prepare_batch
from .coreset_select import ce_proxy, class_budgets, select_class, trades_proxy

__all__ = ["CoresetPlan", "CoresetRun", "WeightedSubset", "RULES", "last_linear", "stored_labels", "dataset_labels"]

RULES = ("craig", "gradmatch", "random")


class CoresetPlan:
    """The epochs of a coreset run (module docstring): W full epochs, then T - K coreset epochs."""

    def __init__(self, epochs: int, frac: float, every: int, warmup: float):
        self.every = int(every)
        skipped = int(math.floor(warmup * epochs))
        self.full = int(round(skipped * frac))
        self.subset = epochs - skipped
        self.passes = self.full + self.subset

    def is_subset(self, epoch: int) -> bool:
        """Whether the 1-based epoch trains on a coreset."""
        return epoch > self.full

    def selects(self, epoch: int) -> bool:
        """Whether a new coreset is selected at the start of this 1-based epoch."""
        return self.is_subset(epoch) and (epoch - self.full - 1) % self.every == 0


class WeightedSubset(Dataset):
    """(x, y, w) of the samples idx of a dataset whose items start with (x, y)."""

    def __init__(self, dataset, idx: torch.Tensor, weights: torch.Tensor):
        self.dataset, self.idx, self.weights = dataset, idx.tolist(), weights.float()

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        item = self.dataset[self.idx[i]]
        return item[0], item[1], self.weights[i]


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear module (in registration order): the layer the proxies differentiate."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("coreset: the model has no nn.Linear layer (the gradient proxies are those of its last "
                         "linear layer, whose output must be the logits)")
    return found[-1]


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """All processes' rows of t (dim 0), rank-major (padded to the longest, then trimmed)."""
    if world == 1:
        return t
    import torch.distributed as dist

    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    pad = torch.zeros((top - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    parts = [torch.empty((top,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([t, pad]))
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def stored_labels(dataset) -> Optional[torch.Tensor]:
    """The labels a dataset keeps as a whole, int64 [len(dataset)], or None: a TensorDataset's second
    tensor, a torchvision-style ``targets`` (without a ``target_transform``), their rows through a Subset."""
    if isinstance(dataset, Subset):
        inner = stored_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        y = dataset.tensors[1]
    elif getattr(dataset, "targets", None) is not None and getattr(dataset, "target_transform", None) is None:
        y = torch.as_tensor(dataset.targets)
    else:
        return None
    y = y.reshape(-1).long()
    return y if y.numel() == len(dataset) else None


def dataset_labels(dataset, num_workers: int = 0) -> torch.Tensor:
    """The dataset's labels, int64 [n]: :func:`stored_labels` where it has them (no pass over the
    inputs), else one pass of a DataLoader reading every sample."""
    y = stored_labels(dataset)
    if y is not None:
        return y
    return torch.cat([b[1].reshape(-1).long() for b in
                      DataLoader(dataset, batch_size=512, shuffle=False, num_workers=num_workers)])


class CoresetRun:
    """The coreset side of one fit: the plan, the current subset and its weights, the counters."""

    def __init__(self, cfg, loader, rank: int = 0, world: int = 1):
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            raise ValueError("coreset: train_loader must be a torch DataLoader over a map-style dataset with a "
                             "batch_size (the coreset is a subset of its dataset)")
        self.cfg, self.loader, self.rank, self.world = cfg, loader, rank, world
        self.dataset, self.bs, self.drop_last = loader.dataset, loader.batch_size, loader.drop_last
        self.plan = CoresetPlan(cfg.epochs, cfg.coreset_frac, cfg.coreset_every, cfg.coreset_warmup)
        self.labels = dataset_labels(self.dataset, loader.num_workers)
        self.n = self.labels.numel()
        counts = torch.bincount(self.labels).tolist()
        self.budgets = class_budgets(counts, cfg.coreset_frac)
        self.size = sum(self.budgets)
        base = _rng.resolve_seed(None if cfg.seed is None else _rng.derive_seed(cfg.seed, 3))
        self.base = int(self._broadcast(torch.tensor([base], dtype=torch.int64))[0])
        self.idx: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.selections, self.samples = 0, 0
        self.trainer = None

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            t = t.to(dev)
            dist.broadcast(t, 0)
        return t.cpu()

    def bind(self, trainer) -> None:
        """The trainer whose method and model the selection passes use."""
        self.trainer = trainer

    def subset_steps(self) -> int:
        """Optimizer steps of one coreset epoch on this process (DistributedSampler pads to ceil(k / world))."""
        local = math.ceil(self.size / self.world) if self.world > 1 else self.size
        return local // self.bs if self.drop_last else math.ceil(local / self.bs)

    def total_steps(self, full_steps: int, updates_per_batch: int = 1) -> int:
        """The run's exact optimizer steps: W full epochs of full_steps, then the coreset epochs."""
        return (self.plan.full * full_steps + self.plan.subset * self.subset_steps()) * updates_per_batch

    # ---- an epoch

    def epoch_loader(self, epoch: int):
        """(the loader of this 1-based epoch, whether its batches carry weights, selection seconds)."""
        if not self.plan.is_subset(epoch):
            self.samples += self.n
            return self.loader, False, 0.0
        t = 0.0
        if self.plan.selects(epoch) or self.idx is None:
            t0 = time.perf_counter()
            self.select()
            if self.trainer.device.type == "cuda":
                torch.cuda.synchronize(self.trainer.device)
            t = time.perf_counter() - t0
            self.samples += self.n if self.cfg.coreset != "random" else 0
        self.samples += self.size
        ds = WeightedSubset(self.dataset, self.idx, self.weights)
        if self.world > 1:
            sampler = DistributedSampler(ds, num_replicas=self.world, rank=self.rank, shuffle=True,
                                         seed=self.base & ((1 << 62) - 1), drop_last=False)
        else:
            sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(_rng.derive_seed(self.base, 1000 + epoch)))
        loader = DataLoader(ds, batch_size=self.bs, sampler=sampler, drop_last=self.drop_last,
                            num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory)
        return loader, True, t

    def row(self) -> Dict[str, Any]:
        """The epoch log's coreset values (after epoch_loader)."""
        return {"equiv_epochs": self.samples / self.n}

    # ---- the selection

    @torch.no_grad()
    def _features(self, fwd: nn.Module, layer: nn.Linear, x: torch.Tensor):
        seen: List[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append((i[0].reshape(i[0].shape[0], -1), o)))
        try:
            logits = fwd(x).float()
        finally:
            handle.remove()
        h, out = seen[-1]
        if out.shape != logits.shape or not torch.equal(out.float(), logits):
            raise ValueError("coreset: the model's output must be its last nn.Linear layer's output (the gradient "
                             "proxies are that layer's gradients)")
        return h.float(), logits

    def _proxies(self):
        """Per-sample proxy pairs of this process's shard (rank::world) and their global indices."""
        tr = self.trainer
        ctx, method = tr.ctx, tr.method
        layer = last_linear(tr.model)
        mine = torch.arange(self.rank, self.n, self.world)
        shard = torch.utils.data.Subset(self.dataset, mine.tolist())
        parts: List[List[torch.Tensor]] = []
        was = ctx.forward.training
        ctx.forward.eval()
        try:
            for batch in DataLoader(shard, batch_size=self.bs, shuffle=False, num_workers=self.loader.num_workers):
                x, y = prepare_batch(ctx, batch[0], batch[1])
                with torch.enable_grad():
                    inp = method.coreset_inputs(x, y)
                ctx.forward.eval()  # an attack may leave the model in train mode
                h_a, z_a = self._features(ctx.forward, layer, inp["adv"])
                if "clean" in inp:
                    h_c, z_c = self._features(ctx.forward, layer, inp["clean"])
                    pairs = trades_proxy(z_c, h_c, z_a, h_a, y, float(inp["beta"]))
                else:
                    pairs = ce_proxy(z_a, h_a, y)
                parts.append([t for pair in pairs for t in pair])
        finally:
            ctx.forward.train(was)
        flat = [torch.cat(col) for col in zip(*parts)]
        flat = [_gather(t, self.world) for t in flat]
        order = _gather(mine.to(flat[0].device), self.world).cpu()
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)], order

    def select(self) -> None:
        """A new coreset from the current model (every process the same)."""
        rule = self.cfg.coreset
        gen = torch.Generator().manual_seed(_rng.derive_seed(self.base, 1 + self.selections))
        if rule == "random":
            pairs, order = [(torch.zeros(self.n, 1), torch.zeros(self.n, 1))], torch.arange(self.n)
        else:
            pairs, order = self._proxies()
        labels = self.labels[order]
        idx, w = [], []
        for c, k in enumerate(self.budgets):
            if k == 0:
                continue
            members = (labels == c).nonzero()[:, 0]
            dev = members.to(pairs[0][0].device)
            local, weights = select_class([(e[dev], h[dev]) for e, h in pairs], rule, k, gen)
            idx.append(order[members[local.cpu()]])
            w.append(weights.cpu().float())
        self.idx, self.weights = torch.cat(idx), torch.cat(w)
        self.selections += 1

    # ---- checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The current subset and weights, the selection count, the sample counter and the seed."""
        return {"idx": self.idx, "weights": self.weights, "selections": self.selections, "samples": self.samples,
                "base": self.base}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.idx, self.weights = st["idx"], st["weights"]
        self.selections, self.samples, self.base = int(st["selections"]), int(st["samples"]), int(st["base"])
