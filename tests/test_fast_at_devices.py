"""Issue 26's training paths on every device present (CUDA marked, skipped without a GPU): FGSM-SDI's
generator, per-sample budgets, the coreset proxies and selection, the denoiser, and video in the video
channels-last layout. On the CPU each is a smoke run of the device path; on a GPU each is checked
against the CPU where the result must not depend on the device."""
import pytest
import torch

from robustops import attacks, models
from robustops import train as rt
from robustops.models import video
from robustops.train import coreset_select as cs
from conftest import devices


def _tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 10))


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("device", devices())
def test_fgsm_sdi_and_per_sample_budgets_train_on_the_device(device):
    x, y = _batch()
    tr = rt.Trainer(_tiny().to(device), method="fgsm_sdi", eps=0.1, sdi_every=2, sdi_width=8, steps_per_epoch=4,
                    budget_schedule="adaptive", budget_adapt="sample", budget_grid=3, device=device)
    for _ in range(3):
        loss, correct, n = tr.train_step(x, y)
    assert torch.isfinite(loss) and n == 16 and tr.method.generator_steps == 2
    assert next(tr.method.generator.parameters()).device.type == device


@pytest.mark.parametrize("device", devices())
def test_coreset_selection_does_not_depend_on_the_device(device):
    g = torch.Generator().manual_seed(3)
    logits, h, y = torch.randn(40, 10, generator=g), torch.randn(40, 6, generator=g), torch.randint(0, 10, (40,))
    ref = cs.select_class(cs.ce_proxy(logits, h, y), "craig", 8, torch.Generator().manual_seed(0))
    out = cs.select_class(cs.ce_proxy(logits.to(device), h.to(device), y.to(device)), "craig", 8,
                          torch.Generator().manual_seed(0))
    assert out[0].tolist() == ref[0].tolist() and out[1].tolist() == ref[1].tolist()


@pytest.mark.parametrize("device", devices())
def test_denoise_steps_on_the_device(device):
    x, y = _batch()
    model = models.get_model("denoised_small_cnn", in_channels=1, input_size=8).to(device)
    tr = rt.Trainer(model, method="denoise", eps=0.1, steps=2, steps_per_epoch=2, device=device)
    loss, _, _ = tr.train_step(x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", devices())
def test_video_channels_last_attack_on_the_device(device):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 8, 3, 16, 16, generator=g) * 0.5, torch.randint(0, 10, (4,), generator=g)
    m = models.get_model("video_cnn", in_channels=3).eval()
    a = attacks.PGD(m, eps=0.1, steps=2, seed=2)(x, y)
    mc = video.model_to_channels_last(models.get_model("video_cnn", in_channels=3)).to(device).eval()
    mc.load_state_dict(m.state_dict())
    b = attacks.PGD(mc, eps=0.1, steps=2, seed=2)(video.to_channels_last(x.to(device)), y.to(device))
    assert video.is_channels_last(b)
    # the random start is drawn by logical index on every device; the model's arithmetic may differ (cuDNN)
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-4 if device == "cuda" else 1e-5)
