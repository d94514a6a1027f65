"""One collective over a list of tensors, for the training code that keeps extra state in step across
processes (AWP's weight perturbation, FGSM-SDI's generator, generative AT's discriminator)."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["sync_tensors_"]


def sync_tensors_(tensors: Sequence[torch.Tensor], how: str) -> None:
    """In place, over the processes of the default group: ``how="mean"`` replaces every tensor with its
    mean over the ranks, ``how="broadcast"`` with rank 0's value.

    The tensors are flattened into one buffer, so this is one collective however many tensors there are (one
    per parameter would pay the latency once per tensor). The buffer is float32 when some tensor has a lower
    precision (fp16 / bf16 gradients: their sum over ranks could overflow or round), the tensors' common
    dtype otherwise; a broadcast's round trip through it is exact."""
    if how not in ("mean", "broadcast"):
        raise ValueError(f"how must be 'mean' or 'broadcast', got {how!r}")
    tensors = list(tensors)
    if not tensors:
        return
    import torch.distributed as dist

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        if how == "broadcast":
            dist.broadcast(flat, src=0)
        else:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))
