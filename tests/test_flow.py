"""robustops.perturbation.Flow (the normalising flow of the joint-space threat model): exact inverse and
log-determinant, bits/dim, the flow protocol, training through fit_perturbation (exact resume, checkpoints),
`robustops perturbation train|quality|show --kind flow` and its argument errors."""
import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("normflows")

import robustops.perturbation as P  # noqa: E402
from robustops.cli import main  # noqa: E402
from robustops.data import load_digits  # noqa: E402
from robustops.perturbation.protocol import check_flow  # noqa: E402

from conftest import devices  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on shared cores a second thread's OpenMP spin-waits
    cost far more than it brings."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _jitter(flow, scale=0.05, seed=0):
    """Random weights everywhere (an untrained flow's couplings start as the identity), after ActNorm's
    data-dependent initialisation on a batch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        flow.encode(torch.rand(8, *flow.image_shape, generator=g).to(next(flow.parameters()).dtype))
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return flow


def _digits(n):
    return load_digits("train").tensors[0][:n]


@pytest.mark.parametrize("shape, kwargs", [((1, 8, 8), {}), ((1, 8, 8), {"levels": 2}),
                                           ((3, 32, 32), {"depth": 1, "hidden": 8})])
def test_decode_inverts_encode(shape, kwargs):
    torch.manual_seed(0)
    flow = _jitter(check_flow(P.Flow(shape[0], shape[1], **kwargs)))
    x = torch.rand(4, *shape)
    z = flow.encode(x)
    assert z.dtype == torch.float32 and z.shape == (4, flow.latent_dim) and flow.latent_dim == math.prod(shape)
    torch.testing.assert_close(flow.decode(z), x, atol=1e-5, rtol=0)
    z2, ld_enc = flow.encode_with_log_det(x)
    x2, ld_dec = flow.decode_with_log_det(z2)
    torch.testing.assert_close(x2, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld_dec, -ld_enc, atol=1e-3, rtol=1e-5)  # the two log-dets are each other's negatives


@pytest.mark.parametrize("device", devices())
def test_trains_and_inverts_on_device(device):
    torch.manual_seed(0)
    flow = P.Flow(depth=1, hidden=8, bins=17)
    x = _digits(64)
    res = P.fit_perturbation(flow, DataLoader(TensorDataset(x), batch_size=32), epochs=1, lr=5e-3, device=device,
                             progress=False, seed=0, val_loader=DataLoader(TensorDataset(x), batch_size=64))
    assert math.isfinite(res.last["bpd"]) and math.isfinite(res.last["val_bpd"])
    xd = x.to(device)
    torch.testing.assert_close(flow.decode(flow.encode(xd)), xd, atol=1e-5, rtol=0)
    s = flow.sample(3, 0.7, torch.Generator().manual_seed(0))
    assert s.device.type == device and s.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("size, levels", [(4, 1), (4, 2)])
def test_log_det_is_that_of_the_autograd_jacobian(size, levels):
    torch.manual_seed(1)
    flow = _jitter(P.Flow(1, size, depth=2, hidden=8, levels=levels).double(), scale=0.1)
    x = torch.rand(1, 1, size, size, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: flow.encode_with_log_det(v.view(1, 1, size, size))[0][0],
                                           x.flatten())
    _, log_det = flow.encode_with_log_det(x)
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(J)[1], atol=1e-8, rtol=1e-8)
    # log_prob is the change of variables: the base density at z plus that log-determinant
    z = flow.encode_with_log_det(x)[0]
    expected = log_det - 0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected.float())


def test_trained_flow_beats_the_uniform_model(digits_flow, digits_flow_path):
    x = load_digits("test").tensors[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bpd = digits_flow.bits_per_dim(x, g)
        untrained = P.Flow(depth=2, hidden=16, bins=17).bits_per_dim(x, torch.Generator().manual_seed(0))
        # bits/dim = -log p(y) / (D ln 2) + log2(bins), y the dequantised x
        y = digits_flow.dequantize(x, torch.Generator().manual_seed(0))
    assert bpd.shape == (x.shape[0],) and torch.isfinite(bpd).all()
    uniform = math.log2(17)
    assert bpd.mean() < uniform - 0.5 < untrained.mean(), (bpd.mean(), untrained.mean())
    torch.testing.assert_close(bpd, -digits_flow.log_prob(y) / (64 * math.log(2)) + uniform)
    assert ((y >= x * 16 / 17) & (y < (x * 16 + 1) / 17)).all()
    loaded = P.load_perturbation_model(digits_flow_path)
    torch.testing.assert_close(loaded.log_prob(x[:8]), digits_flow.log_prob(x[:8]))
    s = digits_flow.sample(5, 0.7, torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 8, 8) and 0 <= s.min() and s.max() <= 1


def test_resume_continues_exactly(tmp_path):
    def loader():
        return DataLoader(TensorDataset(_digits(96)), batch_size=32, shuffle=True)

    def flow():
        return P.Flow(depth=1, hidden=8, bins=17)

    torch.manual_seed(3)
    full = flow()
    init = {k: v.clone() for k, v in full.state_dict().items()}
    kw = dict(epochs=2, lr=5e-3, progress=False, seed=7, schedule="cosine", val_loader=loader())
    P.fit_perturbation(full, loader(), out_dir=str(tmp_path / "full"), **kw)
    part = flow()
    part.load_state_dict(init)
    out = str(tmp_path / "part")
    assert P.fit_perturbation(part, loader(), out_dir=out, stop_after=1, **kw).epochs_run == 1
    resumed = flow()  # a fresh process: new model (ActNorm not yet initialised), loader and optimizer
    res = P.fit_perturbation(resumed, loader(), out_dir=out, resume=True, **kw)
    assert res.resumed_from == 1 and res.epochs_run == 1 and len(res.history) == 2
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k  # bit for bit: the run after the kill is the same run
    with open(os.path.join(out, "log.csv")) as fh:
        lines = fh.read().split()
    assert lines[0] == ",".join(P.FLOW_LOG_COLUMNS) and len(lines) == 3
    # a checkpoint rebuilds the flow: the same densities
    loaded = P.load_perturbation_model(os.path.join(out, "last.pt"))
    assert P.is_flow(loaded) and not loaded.training
    x = _digits(4)
    torch.testing.assert_close(loaded.log_prob(x), resumed.eval().log_prob(x))


def test_bad_arguments():
    for kwargs, match in (({"input_size": 6, "levels": 2}, "divisible by 2\\*\\*levels"), ({"alpha": 0.5}, "alpha"),
                          ({"depth": 0}, "depth must be an int >= 1"), ({"bins": 1}, "bins must be an int >= 2")):
        with pytest.raises(ValueError, match=match):
            P.Flow(**kwargs)
    flow = P.Flow(depth=1, hidden=4)
    with pytest.raises(ValueError, match=r"x must be images \[B, 1, 8, 8\]"):
        flow.encode(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"z must be latents \[B, 64\]"):
        flow.decode(torch.randn(2, 63))
    with pytest.raises(ValueError, match="amp must be None for a Flow"):
        P.fit_perturbation(flow, DataLoader(TensorDataset(_digits(8)), batch_size=8), epochs=1, amp="bf16",
                           progress=False)


def test_cli_train_quality_show(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["perturbation", "train", "--kind", "flow", "--out", out, "--epochs", "1", "--flow-depth", "1",
            "--flow-hidden", "8", "--lr", "0.005", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["kind"] == "flow" and s["bins"] == 17 and s["held_out_images"] == 360
    assert s["held_out_bpd"] < s["uniform_bpd"] == pytest.approx(math.log2(17))
    with open(os.path.join(out, "log.csv")) as fh:
        assert fh.readline().strip() == ",".join(P.FLOW_LOG_COLUMNS)
    ck = os.path.join(out, "model.pt")
    q = str(tmp_path / "q.json")
    assert main(["perturbation", "quality", "--checkpoint", ck, "-o", q, "--threads", "1"]) == 0
    with open(q) as fh:
        assert json.load(fh)["quality"]["bpd"] == pytest.approx(s["held_out_bpd"], abs=0.05)
    png = str(tmp_path / "flow.png")
    assert main(["perturbation", "show", "--checkpoint", ck, "-o", png, "--inputs", "3", "--threads", "1"]) == 0
    assert os.path.getsize(png) > 1000
    # a resume with another architecture is refused, naming the flag
    capsys.readouterr()
    other = [("16" if a == "8" and args[i - 1] == "--flow-hidden" else a) for i, a in enumerate(args)]
    assert main(other + ["--resume"]) == 2
    assert "--flow-hidden=" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [(["--flow-depth", "0"], "--flow-depth must be"),
                                          (["--flow-bins", "1"], "--flow-bins must be 0"),
                                          (["--amp", "bf16"], "--amp must be none for --kind flow"),
                                          (["--flow-levels", "4"], "divisible by 2\\*\\*levels")])
def test_cli_bad_arguments(tmp_path, capsys, extra, match):
    assert main(["perturbation", "train", "--kind", "flow", "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
