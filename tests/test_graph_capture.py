"""The PGD CUDA-graph runner's device and stream handling (robustops.attacks.graph).

On CPU, torch.cuda's device / stream / graph calls are replaced by recording fakes that behave like
torch's (a stream context makes its stream's device current; ``torch.cuda.graph`` leaves its capture
stream current when capture_end raises; a graph captured on another device's stream replays
nothing), with the data on a pretended cuda:1 while cuda:0 is current: the capture must ask for
cuda:1's stream, put the caller's device and streams back after a failure, and detect an empty
graph. The real captures (cuda:0, and cuda:1 while cuda:0 is current) run where GPUs are present."""
import contextlib
import warnings

import pytest
import torch
from helpers import train_digits_model

from robustops import attacks as A
from robustops.attacks.graph import EmptyGraphError, GraphRunner
from robustops.data import load_digits

DATA_DEVICE = 1  # the pretended GPU of the data; cuda:0 is current


def _case(device):
    """A trained digits model and 64 test images on device."""
    x, y = load_digits("test").tensors
    return train_digits_model(epochs=5, seed=0).to(device), x[:64].to(device), y[:64].to(device)


def _index(device) -> int:
    if isinstance(device, torch.device):
        return device.index
    return int(device)


class FakeStream:
    def __init__(self, cuda, device: int, name: str):
        self.cuda, self.device_index, self.name = cuda, device, name

    def wait_stream(self, other) -> None:
        self.cuda.log.append(("wait", self.name, other.name))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeGraph:
    def __init__(self, cuda):
        self.cuda = cuda
        self.capture_stream = None

    def replay(self) -> None:
        # What a real graph does: the captured kernels run, those of the data's device only when the
        # capture stream was on that device (else the graph is empty).
        self.cuda.log.append(("replay", self.capture_stream.name))
        if self.cuda.replay_runs and self.capture_stream.device_index == DATA_DEVICE:
            self.cuda.runner.iteration()
            self.cuda.runner.marker.add_(1)


class FakeCuda:
    """torch.cuda's device, stream and graph calls on a pretended two-GPU machine, recording them."""

    def __init__(self):
        self.device = 0
        self.streams = {0: FakeStream(self, 0, "default0"), 1: FakeStream(self, 1, "default1")}
        self.defaults = dict(self.streams)
        self.log = []
        self.runner = None
        self.replay_runs = True  # False: every captured graph is empty
        self.capture_end_fails = False
        self.capture_device = None

    # -- the patched calls
    def current_device(self) -> int:
        return self.device

    def set_device(self, d) -> None:
        self.device = _index(d)

    def current_stream(self, device=None) -> FakeStream:
        return self.streams[self.device if device is None else _index(device)]

    def set_stream(self, s: FakeStream) -> None:  # like torch: the stream's device becomes current
        self.device = s.device_index
        self.streams[s.device_index] = s

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 -- torch.cuda.Stream
        idx = self.device if device is None else _index(device)
        s = FakeStream(self, idx, f"side{idx}.{len(self.log)}")
        self.log.append(("new stream", idx))
        return s

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        prev_src, prev_dst = self.current_stream(), self.streams[s.device_index]
        self.set_stream(s)
        yield
        self.set_stream(prev_dst)
        self.set_stream(prev_src)

    @contextlib.contextmanager
    def device_ctx(self, d):
        prev = self.device
        self.device = _index(d)
        yield
        self.device = prev

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802 -- torch.cuda.CUDAGraph
        return FakeGraph(self)

    @contextlib.contextmanager
    def graph(self, g: FakeGraph, pool=None, stream=None, **kwargs):
        # torch.cuda.graph: the stream context is entered, capture_begin, the body, capture_end, and
        # the stream context is left only when capture_end succeeded.
        g.capture_stream = stream if stream is not None else FakeStream(self, self.device, f"capture{self.device}")
        ctx = self.stream(g.capture_stream)
        ctx.__enter__()
        self.capture_device = self.device
        self.log.append(("capture", g.capture_stream.name, self.device))
        yield
        if self.capture_end_fails:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        ctx.__exit__(None, None, None)

    def synchronize(self, device=None) -> None:
        self.log.append(("synchronize", device))

    def install(self, monkeypatch) -> "FakeCuda":
        for name in ("current_device", "set_device", "current_stream", "set_stream", "Stream", "stream",
                     "CUDAGraph", "graph", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "device", self.device_ctx)
        # The runner's tensors stay on the CPU; its device is the pretended cuda:1.
        init, capture = GraphRunner.__init__, GraphRunner.capture

        def fake_init(runner, *args, **kwargs):
            init(runner, *args, **kwargs)
            runner.device = torch.device("cuda", DATA_DEVICE)

        def recording_capture(runner):
            self.runner = runner
            return capture(runner)

        monkeypatch.setattr(GraphRunner, "__init__", fake_init)
        monkeypatch.setattr(GraphRunner, "capture", recording_capture)
        monkeypatch.setattr(A.PGD, "_use_graph", lambda atk, x: atk.graph)
        return self

    def assert_caller_state_back(self) -> None:
        assert self.device == 0, f"current device left at cuda:{self.device}"
        assert self.streams == self.defaults, f"current streams left at {self.streams}"


def _attacks(model, **kw):
    return A.PGD(model, eps=0.1, steps=4, seed=3, **kw), A.PGD(model, eps=0.1, steps=4, seed=3, graph=True, **kw)


@pytest.mark.parametrize("mode", [{}, {"record_steps": True}])
def test_capture_uses_a_side_stream_of_the_data_device(monkeypatch, mode):
    model, x, y = _case("cpu")
    eager_atk, graph_atk = _attacks(model, **mode)
    eager = eager_atk.perturb(x, y)
    cuda = FakeCuda().install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the capture was accepted
        res = graph_atk.perturb(x, y)
    new_streams = [e for e in cuda.log if e[0] == "new stream"]
    captures = [e for e in cuda.log if e[0] == "capture"]
    assert new_streams == [("new stream", DATA_DEVICE)], cuda.log
    assert len(captures) == 1 and captures[0][1].startswith(f"side{DATA_DEVICE}"), cuda.log
    assert cuda.capture_device == DATA_DEVICE, "capture must run with the data's device current"
    assert cuda.runner.graph is not None
    cuda.assert_caller_state_back()
    # the replays (one check at capture, then `steps`) gave the eager answer, not the random start
    assert [e[0] for e in cuda.log].count("replay") == 1 + 4
    torch.testing.assert_close(res.x_adv, eager.x_adv, atol=1e-6, rtol=0)


def test_a_failed_capture_restores_the_current_device_and_streams(monkeypatch):
    model, x, y = _case("cpu")
    eager_atk, graph_atk = _attacks(model)
    eager = eager_atk(x, y)
    cuda = FakeCuda().install(monkeypatch)
    # the fake leaves the capture stream current when capture_end fails, as torch.cuda.graph does
    cuda.capture_end_fails = True
    with pytest.raises(RuntimeError, match="during capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=FakeStream(cuda, 1, "probe")):
            pass
    assert cuda.streams[1].name == "probe" and cuda.device == 1
    cuda.streams, cuda.device = dict(cuda.defaults), 0
    with pytest.warns(UserWarning, match="capture failed"):
        out = graph_atk(x, y)
    cuda.assert_caller_state_back()
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    assert len(graph_atk._graphs.failed) == 1 and not graph_atk._graphs.runners


def test_an_empty_capture_is_detected_and_runs_eagerly(monkeypatch):
    model, x, y = _case("cpu")
    eager_atk, graph_atk = _attacks(model)
    eager = eager_atk(x, y)
    cuda = FakeCuda().install(monkeypatch)
    cuda.replay_runs = False  # a graph that recorded none of the data device's kernels
    runner_capture = GraphRunner.capture
    with pytest.warns(UserWarning, match="EmptyGraphError.*did not run on cuda:1"):
        out = graph_atk(x, y)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0, msg="the eager path, not the random start")
    cuda.assert_caller_state_back()
    # and on the runner itself: the check raises, and the inputs are left as loaded
    runner = cuda.runner
    before = runner.xa.clone()
    with pytest.raises(EmptyGraphError):
        runner_capture(runner)
    assert torch.equal(runner.xa, before) and runner.graph is None
    cuda.assert_caller_state_back()


# ------------------------------------------------------------------------------ real captures

@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_graph_equals_eager_on_cuda0(norm):
    m, x, y = _case("cuda:0")
    eps = 0.1 if norm == "linf" else 0.8
    default = torch.cuda.current_stream()
    eager = A.PGD(m, eps=eps, steps=5, norm=norm, seed=4, record_steps=True).perturb(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atk = A.PGD(m, eps=eps, steps=5, norm=norm, seed=4, record_steps=True, graph=True)
        res = atk.perturb(x, y)
    assert len(atk._graphs.runners) == 1
    assert torch.cuda.current_stream() == default
    assert torch.equal(res.success, eager.success) and torch.equal(res.success_step, eager.success_step)
    torch.testing.assert_close(res.x_adv, eager.x_adv, atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_graph_on_cuda1_while_cuda0_is_current(norm):
    """The captured graph used to be empty here (captured on a cuda:0 stream): PGD then returned the
    random start."""
    torch.cuda.set_device(0)
    m, x, y = _case("cuda:1")
    eps = 0.1 if norm == "linf" else 0.8
    streams = (torch.cuda.current_stream(0), torch.cuda.current_stream(1))
    eager = A.PGD(m, eps=eps, steps=5, norm=norm, seed=4).perturb(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atk = A.PGD(m, eps=eps, steps=5, norm=norm, seed=4, graph=True)
        res = atk.perturb(x, y)
    assert len(atk._graphs.runners) == 1
    assert torch.cuda.current_device() == 0
    assert (torch.cuda.current_stream(0), torch.cuda.current_stream(1)) == streams
    assert res.x_adv.device == x.device
    assert torch.equal(res.success, eager.success)
    torch.testing.assert_close(res.x_adv, eager.x_adv, atol=1e-5, rtol=0)
