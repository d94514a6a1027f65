"""The one smoothing pass (robustops.smoothing.votes), the graph cache key, and the device / stream that
the sequential engine and the graph runner use: CPU tests with fakes for the CUDA calls, CUDA tests for
a non-current device (two GPUs) and a failed capture."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustops.smoothing import Smooth, stream
from robustops.smoothing.graph import cache_key, model_fingerprint
from robustops.smoothing.votes import ESTIMATION, PREDICTION, SELECTION, Piece, phase_seed, piece_tables


def conv_net(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, classes)).eval()


def test_phases_are_defined_once():
    from robustops.smoothing import smooth as smooth_mod
    assert (smooth_mod.SELECTION, smooth_mod.ESTIMATION, smooth_mod.PREDICTION) == (SELECTION, ESTIMATION, PREDICTION)
    assert smooth_mod.phase_seed is phase_seed
    assert not hasattr(stream, "_SELECTION") and not hasattr(stream, "_ESTIMATION")


def test_piece_tables():
    t = piece_tables([Piece(2, 11, 30, 3, 5), Piece(0, 12, 7, 2, 1)])
    assert t.tolist() == [[2, 2, 2, 0, 0], [11, 11, 11, 12, 12], [30, 31, 32, 7, 8], [5, 5, 5, 1, 1]]


@pytest.mark.parametrize("autocast", [None, "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_pass_over_many_pieces_votes_like_one_pass_per_piece(autocast, channels_last):
    """A batch cut from several inputs, keys and count rows (gaussian_noise_rows + count_votes_segments_)
    gives the votes of running each piece alone (gaussian_noise + count_votes_): the same noise rows."""
    smooth = Smooth(conv_net(), 5, 0.5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], autocast=autocast,
                    channels_last=channels_last)
    x = torch.rand(4, 3, 6, 6)
    pieces = [Piece(1, 7, 40, 5, 3), Piece(0, 9, 0, 3, 0), Piece(3, 7, 1000, 8, 3), Piece(1, 9, 12, 2, 6)]
    sampler = smooth.vote_sampler(x.device)
    together = torch.zeros(8, 6, dtype=torch.int64)
    alone = torch.zeros(8, 6, dtype=torch.int64)
    with torch.inference_mode():
        sampler.run(x, pieces, together)
        for p in pieces:
            sampler.run(x, [p], alone)
    assert torch.equal(together, alone) and int(together.sum()) == 18


def test_nan_column_with_python_scalars():
    from robustops.smoothing.votes import with_nan_column
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]], dtype=dtype)
        out = with_nan_column(logits)
        inf = float("inf")
        assert out.dtype == dtype
        assert out.tolist() == [[1.0, 2.0, -inf], [-inf, -inf, inf]]


def test_graph_cache_key_covers_what_the_graph_closes_over():
    model = conv_net()
    smooth = Smooth(model, 5, 0.25)
    x1 = torch.rand(1, 3, 6, 6)

    def key(s=smooth, x=x1, k=7, batch=64):
        return cache_key(s, x, k, batch, model_fingerprint(s.base_classifier))
    base = key()
    assert key() == base
    assert key(k=8) != base and key(batch=32) != base
    assert key(x=x1.half()) != base and key(x=x1.contiguous(memory_format=torch.channels_last)) != base
    smooth.sigma = 0.5  # another sigma: the captured noise op baked 0.25 in
    assert key() != base
    smooth.sigma = 0.25
    with torch.no_grad():  # in place (an optimizer step): the graph reads the new values, same key
        model[0].weight.add_(1.0)
        model.load_state_dict(copy.deepcopy(model.state_dict()))
    assert key() == base
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # re-allocated: a stale graph
    moved = key()
    assert moved != base
    model.train()
    assert key() != moved
    model.eval()
    assert key(s=Smooth(copy.deepcopy(model), 5, 0.25)) != moved  # another model
    assert key(s=Smooth(model, 6, 0.25)) != moved
    assert key(s=Smooth(model, 5, 0.25, autocast="bf16")) != moved
    normed = key(s=Smooth(model, 5, 0.25, mean=[0.5] * 3, std=[0.2] * 3))
    assert normed != moved and normed != key(s=Smooth(model, 5, 0.25, mean=[0.4] * 3, std=[0.2] * 3))
    assert normed == key(s=Smooth(model, 5, 0.25, mean=[0.5] * 3, std=[0.2] * 3))
    assert key(s=Smooth(model, 5, 0.25, channels_last=True)) != key(s=Smooth(model, 5, 0.25))
    fn = Smooth(lambda z: model(z), 5, 0.25)
    assert cache_key(fn, x1, 7, 64, model_fingerprint(fn.base_classifier)) != moved


class _FakeStream:
    def __init__(self, device):
        self.device = torch.device(device)


def test_engine_records_its_event_on_the_data_devices_stream(monkeypatch):
    """No GPU needed: the CUDA calls are fakes that record the device they were asked for. The data is
    on cuda:1 while cuda:0 is current: the event must be recorded on cuda:1's stream and the pass must
    run with cuda:1 current."""
    calls = []

    class FakeEvent:
        def record(self, stream=None):
            calls.append(("record", None if stream is None else stream.device))

    def current_stream(device=None):
        calls.append(("current_stream", None if device is None else torch.device(device)))
        return _FakeStream(device if device is not None else "cuda:0")

    class FakeDevice:
        def __init__(self, device):
            calls.append(("device", torch.device(device)))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    dev1 = torch.device("cuda", 1)
    with stream._on_device(dev1):
        snap = torch.arange(6)
        host, event = stream._copy_to_host(snap, dev1)
    assert isinstance(event, FakeEvent) and torch.equal(host, snap)
    assert calls == [("device", dev1), ("current_stream", dev1), ("record", dev1)]
    calls.clear()
    assert stream._copy_to_host(snap, torch.device("cpu"))[1] is None and calls == []


def test_engine_passes_and_reads_use_the_data_device(monkeypatch):
    """The engine hands its data device to the pass scope and to the host copy on every pass."""
    seen = []
    on_device, copy_to_host = stream._on_device, stream._copy_to_host

    def spy_scope(device):
        seen.append(("scope", device))
        return on_device(device)

    def spy_copy(snap, device):
        seen.append(("copy", device))
        return copy_to_host(snap, device)
    monkeypatch.setattr(stream, "_on_device", spy_scope)
    monkeypatch.setattr(stream, "_copy_to_host", spy_copy)
    x = torch.rand(3, 3, 6, 6)
    Smooth(conv_net(), 5, 0.5).certify_radius(x, 0.1, 0.01, 64, n0=20, n_min=50, n_max=200, seed=1)
    assert {k for k, _ in seen} == {"scope", "copy"}
    assert all(d == x.device for _, d in seen)


# ------------------------------------------------------------------------------------------ CUDA


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")


@pytest.mark.cuda
def test_non_current_device_gives_the_current_devices_results():
    """Data and model on cuda:1 while cuda:0 is current: the sequential engine (event on cuda:1's stream)
    and Smooth(graph=True) (capture on a cuda:1 stream) give what they give on cuda:0."""
    _two_gpus()
    net = conv_net()
    x = torch.rand(6, 3, 6, 6)
    with torch.cuda.device(0):
        results = []
        for dev in ("cuda:0", "cuda:1"):
            m, xd = copy.deepcopy(net).to(dev), x.to(dev)
            seq = Smooth(m, 5, 0.5).certify_radii(xd, [0.1, 0.3], 0.01, 100, n0=20, n_min=50, n_max=1000, seed=3)
            sm_g = Smooth(m, 5, 0.5, graph=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no capture failure
                g = sm_g.certify(xd, 20, 700, 0.01, 128, seed=4)
            assert len(sm_g._graphs.runners) == 1
            results.append((seq, g))
            assert torch.cuda.current_device() == 0
    (s0, g0), (s1, g1) = results
    for name in ("decisions", "samples", "counts", "selection_counts"):
        assert torch.equal(getattr(s0, name), getattr(s1, name)), name
    assert torch.equal(g0.counts, g1.counts) and torch.equal(g0.selection_counts, g1.selection_counts)


class _Syncing(nn.Module):
    """A classifier that reads a value on the host in its forward: it cannot be captured."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z):
        if float(z.sum()) > -1e30:
            return self.net(z)
        return self.net(z)


@pytest.mark.cuda
def test_failed_capture_restores_the_stream_and_falls_back():
    net = conv_net().cuda()
    x = torch.rand(2, 3, 6, 6, device="cuda")
    eager = Smooth(net, 5, 0.5).certify(x, 20, 300, 0.01, 128, seed=2)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with pytest.warns(UserWarning, match="capture failed"):
            got = Smooth(_Syncing(net), 5, 0.5, graph=True).certify(x, 20, 300, 0.01, 128, seed=2)
        assert torch.cuda.current_stream() == side
    assert torch.equal(got.counts, eager.counts) and torch.equal(got.selection_counts, eager.selection_counts)
    assert np.isfinite(got.radius.numpy()).all()
