"""Mixup, proxy-data and the smoothing-training methods under DDP (two gloo processes): they cannot equal
a single process on whole batches (mixup permutes within each process's half; the proxy loader shards
batches by rank; each rank draws its own noise),
so what is checked is what DDP must guarantee: every rank ends with the same finite weights, the
weights moved, the ranks saw disjoint real and generated samples, and the mixed batches kept their
ratio."""
import os

import pytest
import torch
from helpers import free_port, gloo_group, one_thread, tiny_cnn  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from robustops import proxy
from robustops import train as rt
from robustops.data import load_digits


def _worker(rank, world, port, which, out):
    with gloo_group(rank, world, port):
        real = Subset(load_digits("train"), list(range(256)))
        seen = []
        if which == "proxy":
            gx, gy = torch.rand(600, 1, 8, 8), torch.randint(0, 10, (600,))  # > the 256 an epoch uses
            ld = proxy.MixedLoader(real, (gx, gy), 16, 0.5, seed=3, rank=rank, world_size=world, return_source=False)
            seen = [ld.batch_sampler.epoch_indices(e) for e in (1, 2)]
            kw = {}
        else:
            ld = DataLoader(real, batch_size=16, sampler=DistributedSampler(real, world, rank, shuffle=True, seed=0))
            kw = {"mixup": 1.0} if which == "mixup" else {"noise_copies": 2}
        model = tiny_cnn(seed=11)
        method = "pgd" if which in ("mixup", "proxy") else which
        rt.fit(model, ld, method, epochs=2, eps=0.1, steps=2, lr=0.05, progress=False, verbose=False, seed=0, **kw)
        torch.save({"state_dict": model.state_dict(), "seen": seen}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("which", ["mixup", "proxy", "consistency", "macer", "smoothadv", "smoothmix"])
def test_two_gloo_processes_stay_in_sync(tmp_path, which):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), which, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    start = tiny_cnn(seed=11).state_dict()
    assert sum(float((v - start[k]).abs().sum()) for k, v in r0["state_dict"].items()) > 0
    for k, v in r0["state_dict"].items():
        assert torch.isfinite(v.float()).all(), k
        torch.testing.assert_close(r1["state_dict"][k], v, rtol=0, atol=0)
    if which == "proxy":
        for (real0, gen0), (real1, gen1) in zip(r0["seen"], r1["seen"]):
            assert real0.shape == real1.shape and gen0.shape == gen1.shape  # as many batches on each rank
            assert real0.shape[1] == gen0.shape[1] == 8  # 16 per batch, half generated
            assert not set(real0.flatten().tolist()) & set(real1.flatten().tolist())
            assert not set(gen0.flatten().tolist()) & set(gen1.flatten().tolist())
