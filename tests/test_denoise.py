"""Generative adversarial training (methods/denoise.py) and its pipeline (models/denoise.py): attacks go
end to end through the denoiser, one step against a hand-written one, checkpoints reload with load_model,
exact resume, the error for a model without a denoiser, video inputs, the CLI."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import CrashingLoader, Interrupt, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from helpers import tiny_cnn
from torch.utils.data import DataLoader, Subset

import robustops as ro
from robustops import train as rt
from robustops.cli import main
from robustops.data import load_digits
from robustops.models import Denoised, Denoiser, load_model


@pytest.fixture(scope="module")
def digits():
    return Subset(load_digits("train"), list(range(96))), Subset(load_digits("test"), list(range(64)))


def pipeline(seed=0, live=True):
    """A small Denoised(Denoiser, tiny CNN); live: the denoiser's last conv randomised (not the identity)."""
    torch.manual_seed(seed)
    den = Denoiser(1, width=4)
    if live:
        nn.init.normal_(den.net[-1].weight, std=0.1)
    return Denoised(den, tiny_cnn(seed, width=8))


def test_attack_gradient_goes_through_the_denoiser():
    model = pipeline().eval()
    x, y = torch.rand(6, 1, 8, 8) * 0.8 + 0.1, torch.randint(0, 10, (6,))
    atk = ro.attacks.PGD(model, eps=0.1, alpha=0.05, steps=1, random_start=False)
    x_adv = atk(x, y)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model.classifier(model.denoiser(xr)), y).backward()
    expected = (x + 0.05 * xr.grad.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)
    xc = x.clone().requires_grad_(True)  # the bare classifier's gradient is another one
    F.cross_entropy(model.classifier(xc), y).backward()
    assert not torch.equal(xc.grad.sign(), xr.grad.sign())


@pytest.mark.parametrize("cls_weight", [0.0, 1.0])
def test_step_without_gan_equals_hand_written_step(cls_weight):
    model = pipeline()
    ref = pipeline()
    tr = rt.Trainer(model, method="denoise", epochs=1, steps_per_epoch=1, eps=0.1, gan_weight=0.0,
                    cls_weight=cls_weight, optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                    schedule="constant")
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    tr.method.perturb = lambda *a: x_adv  # the attack is checked above: fix x_adv here
    disc0 = [p.detach().clone() for p in tr.method.disc.parameters()]
    tr.train_step(x, y)
    x_hat = ref.denoiser(x_adv)
    loss = 0.7 * F.mse_loss(x_hat, x) + cls_weight * F.cross_entropy(ref.classifier(x_hat), y)  # rec_weight 0.7
    params = list(ref.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for (name, p), q, g in zip(model.named_parameters(), params, grads):
        expected = q if g is None else q - 0.5 * g
        torch.testing.assert_close(p.detach(), expected.detach(), msg=name)
    if cls_weight == 0:
        for (name, p), q in zip(model.classifier.named_parameters(), ref.classifier.parameters()):
            assert torch.equal(p, q), name
    # gan_weight 0: D takes no step and its loss is not reported
    assert all(torch.equal(a, b) for a, b in zip(disc0, tr.method.disc.parameters()))
    assert math.isnan(tr.method.log_values()["gan_d_loss"])


def test_defaults_are_the_authors_code_and_the_discriminator_steps():
    from robustops.train.registry import get

    defaults = {h.name: h.default for h in get("denoise").hyper}
    assert (defaults["rec_weight"], defaults["gan_weight"], defaults["disc_lr"]) == (0.7, 0.3, 2e-4)
    tr = rt.Trainer(pipeline(), method="denoise", epochs=1, steps_per_epoch=1, eps=0.1, steps=1)
    disc0 = [p.detach().clone() for p in tr.method.disc.parameters()]
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    tr.train_step(x, y)
    assert any(not torch.equal(a, b) for a, b in zip(disc0, tr.method.disc.parameters()))
    assert tr.method.log_values()["gan_d_loss"] > 0
    from robustops.train.methods.denoise import discriminator_loss
    zero = torch.zeros(4)  # logits 0: each BCE term is log 2, and the code sums the two
    torch.testing.assert_close(discriminator_loss(zero, zero), torch.tensor(2 * math.log(2)))


def test_sync_tensors_refuses_an_unknown_collective():
    from robustops.train.collective import sync_tensors_

    with pytest.raises(ValueError, match="how must be"):
        sync_tensors_([torch.zeros(2)], "sum")
    sync_tensors_([], "mean")  # nothing to do: no process group needed


def test_model_without_denoiser_is_refused():
    with pytest.raises(ValueError, match="Denoised"):
        rt.Trainer(tiny_cnn(0, width=8), method="denoise", epochs=1, eps=0.1)
    with pytest.raises(ValueError, match="normalisation inside the model"):
        rt.Trainer(pipeline(), method="denoise", epochs=1, eps=0.1, mean=[0.5], std=[0.5])


def test_video_inputs_are_denoised_frame_by_frame():
    den = Denoiser(1, width=4)
    nn.init.normal_(den.net[-1].weight, std=0.1)
    model = Denoised(den, nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10)))
    v = torch.rand(2, 3, 1, 8, 8)
    assert model(v).shape == (2, 10)
    torch.testing.assert_close(den(v), den(v.flatten(0, 1)).view_as(v))
    assert ro.models.Discriminator(1)(v).shape == (6,)


def _fit(model, loader, val, out, **kw):
    return rt.fit(model, loader, "denoise", val_loader=val, out_dir=out, epochs=2, eps=0.1, steps=2, seed=3,
                  gan_weight=0.1, progress=False, verbose=False, **kw)


def test_checkpoint_reloads_and_resume_is_exact(digits, tmp_path):
    train_set, test_set = digits
    val = DataLoader(test_set, batch_size=64)
    get = lambda: ro.models.get_model("denoised_small_cnn")  # noqa: E731
    torch.manual_seed(0)
    full = get()
    ref = _fit(full, DataLoader(train_set, batch_size=32, shuffle=True), val, str(tmp_path / "full"),
               model_name="denoised_small_cnn")
    loaded = load_model(str(tmp_path / "full" / "best.pt"))
    assert isinstance(loaded, Denoised)
    x = test_set[0][0][None]
    torch.testing.assert_close(loaded.eval()(x), full.eval()(x), rtol=0, atol=0)
    assert {"rec_loss", "gan_g_loss", "gan_d_loss"} <= set(ref.history[0])
    # a killed run (after 4 of the 6 batches: in the second epoch), resumed by a fresh start
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    ld = DataLoader(train_set, batch_size=32, shuffle=True)
    with pytest.raises(Interrupt):
        _fit(get(), CrashingLoader(ld, after=4), val, run)
    torch.manual_seed(999)
    model = get()
    res = _fit(model, DataLoader(train_set, batch_size=32, shuffle=True), val, run, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert str(strip(res.history)) == str(strip(ref.history))


def test_cli_trains_the_denoised_model(tmp_path):
    out = str(tmp_path / "denoise")
    assert main(["train", "--data", "digits", "--method", "denoise", "--epochs", "1", "--batch-size", "256",
                 "--steps", "2", "--test-steps", "0", "--val-size", "64", "-o", out, "--no-progress",
                 "--gan-weight", "0.05", "--disc-lr", "0.001", "--rec-weight", "0.5", "--cls-weight", "0.9"]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    params = s["config"]["params"]
    assert s["model"] == "denoised_small_cnn"
    assert (params["gan_weight"], params["disc_lr"], params["rec_weight"], params["cls_weight"]) == (0.05, 0.001, 0.5, 0.9)
    assert isinstance(load_model(os.path.join(out, "last.pt")), Denoised)


def test_denoised_model_takes_its_channels_and_every_keyword_from_the_classifier(tmp_path):
    video = ro.models.get_model("denoised_video_cnn", frames=4)
    assert video.classifier.frames == 4 and video.denoiser.net[0].in_channels == 1  # video_cnn: 1 channel
    assert video(torch.rand(2, 4, 1, 16, 16)).shape == (2, 10)
    rgb = ro.models.get_model("denoised_video_cnn", in_channels=3, frames=2, mean=[0.5] * 3, std=[0.5] * 3)
    assert rgb.denoiser.net[0].in_channels == 3
    assert ro.models.get_model("denoised_resnet20").denoiser.net[0].in_channels == 3
    # a checkpoint's model_kwargs (frames) rebuild the same model
    path = ro.models.save_checkpoint(str(tmp_path / "v.pt"), video, "denoised_video_cnn", {"frames": 4})
    assert load_model(path).classifier.frames == 4
