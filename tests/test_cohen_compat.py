"""Compatibility with Cohen, Rosenfeld and Kolter's randomized-smoothing code (locuslab/smoothing):
their CIFAR ResNet's layer names, their checkpoints ({"arch", "state_dict", ...} with "1.module." keys
and a NormalizeLayer that is not in the state dict), certify / predict on one input x [C, H, W], and
``prediction, radius = smooth.certify(...)``."""
import sys
import types

import pytest
import torch
import torch.nn as nn

from robustops import models as M
from robustops.smoothing import Smooth

CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2023, 0.1994, 0.2010]


class TheirNormalizeLayer(nn.Module):
    """Like their NormalizeLayer: the means / sds are plain tensor attributes, not buffers, so the
    state dict has no entry for them."""

    def __init__(self, means, sds):
        super().__init__()
        self.means = torch.tensor(means)
        self.sds = torch.tensor(sds)

    def forward(self, x):
        return (x - self.means[None, :, None, None]) / self.sds[None, :, None, None]


def expected_keys(depth):
    """The state-dict keys of their CIFAR ResNet, written out from its description."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{b}" for b in bn}
    n = (depth - 2) // 6
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"layer{stage}.{i}."
            keys |= {p + "conv1.weight", p + "conv2.weight"} | {p + f"bn{j}.{b}" for j in (1, 2) for b in bn}
            if i == 0 and stage > 1:  # width 16 -> 32 -> 64 with stride 2: a projection shortcut
                keys |= {p + "downsample.0.weight"} | {p + f"downsample.1.{b}" for b in bn}
    return keys


def randomize(model, seed):
    """Random weights and BatchNorm statistics (not the identity BN of a fresh model), moderate enough
    that 110 layers keep finite, input-dependent logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def their_checkpoint(path, depth=110, data_parallel=True, seed=0, arch=None):
    """Writes a checkpoint as their train.py does; returns their whole model (normalisation included)."""
    net = randomize(M.cohen_cifar_resnet(depth), seed)
    theirs = nn.Sequential(TheirNormalizeLayer(CIFAR_MEAN, CIFAR_STD), nn.DataParallel(net) if data_parallel else net)
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.save({"epoch": 90, "arch": arch or f"cifar_resnet{depth}", "state_dict": theirs.state_dict(),
                "optimizer": optimizer.state_dict()}, path)
    return theirs.eval()


# ------------------------------------------------------------------------------ architecture

def test_cohen_resnet_has_their_layer_names_and_size():
    m = M.get_model("cohen_cifar_resnet110")
    assert set(m.state_dict()) == expected_keys(110)
    assert 1.7e6 <= sum(p.numel() for p in m.parameters()) <= 1.75e6  # their ResNet-110: 1.7M
    assert set(M.get_model("cohen_resnet20").state_dict()) == expected_keys(20)
    assert isinstance(M.get_model("Cohen-ResNet20"), M.CohenCifarResNet)
    with torch.no_grad():
        assert M.get_model("cohen_resnet20", num_classes=4).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"6n\+2"):
        M.get_model("cohen_cifar_resnet21")
    with pytest.raises(ValueError, match=r"6n\+2"):
        M.cohen_cifar_resnet(21)


# ------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("depth,data_parallel", [(110, True), (20, False)])
def test_their_checkpoint_loads_and_computes_their_logits(tmp_path, depth, data_parallel):
    path = str(tmp_path / "checkpoint.pth.tar")
    theirs = their_checkpoint(path, depth, data_parallel)
    keys = torch.load(path, weights_only=True)["state_dict"].keys()
    prefix = "1.module." if data_parallel else "1."
    assert all(k.startswith(prefix) for k in keys) and not any("means" in k or "sds" in k for k in keys)

    model = M.load_model(path)
    assert isinstance(model, nn.Sequential) and isinstance(model[0], M.Normalize)
    assert isinstance(model[1], M.CohenCifarResNet) and not model.training
    mean, std = model[0].values()
    assert mean == pytest.approx(CIFAR_MEAN) and std == pytest.approx(CIFAR_STD)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # pixels in [0, 1]
    with torch.no_grad():
        want, got = theirs(x), model(x)
    assert torch.isfinite(want).all() and float(want.std(0).mean()) > 1e-3  # the inputs matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    body, m2, s2 = M.split_normalize(model)  # what the CLI fuses into the noise kernel
    assert body is model[1] and m2 == mean and s2 == std
    # the arch's name (or the registry's) is accepted; another model is refused
    for name in (f"cifar_resnet{depth}", f"cohen_cifar_resnet{depth}", f"cohen_resnet{depth}"):
        assert torch.equal(M.load_model(path, name=name)[1].layer3[-1].bn2.running_var,
                           model[1].layer3[-1].bn2.running_var)
    with pytest.raises(ValueError, match=r"Cohen et al.*leave the name out"):
        M.load_model(path, name=f"resnet{depth}")
    # their bare state dict (no arch entry) with the registry's name: the same model, normalisation included
    bare = str(tmp_path / "bare.pth")
    torch.save(torch.load(path, weights_only=True)["state_dict"], bare)
    with pytest.raises(ValueError, match="raw state dict"):
        M.load_model(bare)
    model2 = M.load_model(bare, name=f"cohen_resnet{depth}")
    assert isinstance(model2[0], M.Normalize)
    with torch.no_grad():
        torch.testing.assert_close(model2(x), want, rtol=1e-4, atol=1e-5)


def test_their_checkpoint_errors(tmp_path, monkeypatch):
    path = str(tmp_path / "unknown.pth.tar")
    their_checkpoint(path, 20, arch="vgg16")
    with pytest.raises(ValueError, match=r"arch 'vgg16'.*cifar_resnet<6n\+2>.*resnet50.*name"):
        M.load_model(path)
    their_checkpoint(path, 20, arch="cifar_resnet21")
    with pytest.raises(ValueError, match=r"arch 'cifar_resnet21'"):
        M.load_model(path)
    # weights of a ResNet-20 under the arch of a ResNet-110
    their_checkpoint(path, 20, arch="cifar_resnet110")
    with pytest.raises(ValueError, match=r"do not fit Cohen et al.'s 'cifar_resnet110'"):
        M.load_model(path)
    their_checkpoint(path, 20)
    with pytest.raises(TypeError, match="unexpected keyword"):
        M.load_model(path, depth=20)
    with pytest.raises(ValueError, match="do not fit"):  # their CIFAR-10 fc has 10 classes
        M.load_model(path, num_classes=100)
    assert M.load_model(path, num_classes=10, in_channels=3, input_size=32)[1].fc.out_features == 10  # CLI kwargs
    # another arch with plain keys and a model name: read as a state dict, as before
    net = randomize(M.cohen_cifar_resnet(20), 3)
    torch.save({"arch": "my_net", "state_dict": net.state_dict()}, path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(M.load_model(path, name="cohen_resnet20")(x), net(x))

    # ImageNet: torchvision's resnet50, or a message that says to install it
    torch.save({"arch": "resnet50", "state_dict": {"1.module.fc.weight": torch.zeros(5, 2)}}, path)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(ValueError, match="install torchvision"):
        M.load_model(path)


def test_their_imagenet_checkpoint_uses_torchvision_resnet50(tmp_path, monkeypatch):
    """With a stand-in for torchvision.models.resnet50: their "1.module." prefix goes, the classes come
    from fc, and the ImageNet normalisation goes in front."""

    class Tiny(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.conv1(x).mean((2, 3)))

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.resnet50 = lambda num_classes=1000: Tiny(num_classes)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    torch.manual_seed(0)
    net = Tiny(7).eval()
    path = str(tmp_path / "imagenet.pth.tar")
    torch.save({"arch": "resnet50", "state_dict": {"1.module." + k: v for k, v in net.state_dict().items()},
                "epoch": 90}, path)
    model = M.load_model(path)
    mean, std = model[0].values()
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    x = torch.rand(2, 3, 9, 9)
    norm = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    torch.testing.assert_close(model(x), net(norm))


# ------------------------------------------------------------------------- certify / predict

@pytest.fixture(scope="module")
def cohen_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cohen") / "checkpoint.pth.tar")
    their_checkpoint(path, 20, seed=5)
    return M.load_model(path)


def test_certify_one_input_with_input_shape(cohen_model):
    """With input_shape, x [C, H, W] is a batch of one: the same samples and result as x[None]."""
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    smooth = Smooth(cohen_model, 10, 0.25, input_shape=(3, 32, 32))
    one = smooth.certify(x, 4, 16, 0.01, 20, seed=7)
    batched = smooth.certify(x[None], 4, 16, 0.01, 20, seed=7)
    assert one.counts.shape == (1, 10) and torch.equal(one.counts, batched.counts)
    assert torch.equal(one.selection_counts, batched.selection_counts)
    prediction, radius = one  # as their certify returns it
    assert type(prediction) is int and type(radius) is float
    assert prediction == int(one.prediction[0]) and radius == float(one.radius[0])
    pred = smooth.predict(x, 16, 0.01, 20, seed=3)
    assert pred.dtype == torch.int64 and pred.shape == (1,)
    assert torch.equal(pred, smooth.predict(x[None], 16, 0.01, 20, seed=3))
    with pytest.raises(ValueError, match="input_shape"):
        smooth.certify(torch.rand(3, 32, 31), 4, 16, 0.01, 20)


def test_certify_one_input_without_input_shape_says_add_the_batch_dimension(cohen_model):
    x = torch.rand(3, 32, 32)
    smooth = Smooth(cohen_model, 10, 0.25)
    for call in (lambda: smooth.certify(x, 4, 16, 0.01, 20), lambda: smooth.predict(x, 16, 0.01, 20)):
        with pytest.raises(ValueError, match=r"one input.*add the batch dimension \(x\.unsqueeze\(0\)") as info:
            call()
        assert isinstance(info.value.__cause__, (RuntimeError, ValueError))  # the classifier's own error, chained
    prediction, radius = smooth.certify(x[None], 4, 16, 0.01, 20, seed=1)  # their habit, one line
    assert isinstance(prediction, int) and isinstance(radius, float)
    assert int(smooth.predict(x[None], 16, 0.01, 20, seed=1)[0]) in range(-1, 10)
    # bare conv net (no Normalize first), and a forward batch of exactly C rows that the conv reads
    # as one unbatched image: still the hint, not a shape error
    bare = cohen_model[1]
    for batch_size in (3, 40):
        with pytest.raises(ValueError, match="add the batch dimension"):
            Smooth(bare, 10, 0.25).certify(x, 1, 2, 0.01, batch_size)


def test_unbatched_hint_rules():
    """No convolution: the hint for 2-D / 3-D x when the classifier fails; other errors pass as they
    are (a wrong number of classes, out of memory, a 4-D x)."""
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match=r"x of shape \[3, 2, 2\].*add the batch dimension"):
        Smooth(flat, 3, 0.5).certify(torch.rand(3, 2, 2), 4, 8, 0.1, 16)
    with pytest.raises(ValueError, match="num_classes") as info:
        Smooth(flat, 4, 0.5).certify(torch.rand(2, 3, 2, 2), 4, 8, 0.1, 16)
    assert "unsqueeze" not in str(info.value)

    class OutOfMemory(nn.Module):
        def forward(self, z):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(RuntimeError, match="out of memory"):
        Smooth(OutOfMemory(), 3, 0.5).certify(torch.rand(3, 2, 2), 4, 8, 0.1, 16)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        Smooth(flat, 3, 0.5).certify(torch.rand(2, 3, 2, 3), 4, 8, 0.1, 16)
    # a first convolution that wants another number of channels than x.shape[1]
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"2 channels.*takes 3.*unsqueeze\(0\)"):
        Smooth(conv, 3, 0.5).certify(torch.rand(5, 2, 4, 4), 4, 8, 0.1, 16)
    with pytest.raises(ValueError, match="input_shape"):  # with input_shape, x is checked up front
        Smooth(conv, 3, 0.5, input_shape=(3, 4, 4)).certify(torch.rand(5, 2, 4, 4), 4, 8, 0.1, 16)


def test_results_unpack_like_theirs():
    """One input: an int and a float (-1 and 0.0 when abstaining); several: the [B] tensors."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    smooth = Smooth(model, 3, 0.5)
    many = smooth.certify(torch.rand(4, 3, 2, 2), 8, 32, 0.01, 64, seed=0)
    p, r = many
    assert p is many.prediction and r is many.radius
    p, r = smooth.certify(torch.rand(1, 3, 2, 2), 8, 1, 0.001, 64, seed=0)  # n = 1 cannot certify
    assert (p, r) == (-1, 0.0) and type(p) is int and type(r) is float
    empty = smooth.certify(torch.rand(0, 3, 2, 2), 8, 32, 0.01, 64, seed=0)
    p, r = empty
    assert p.shape == (0,) and r.shape == (0,)


def test_a_batch_the_first_convolution_takes_keeps_the_classifiers_error():
    """x [B, C, L] of a Conv1d net is a proper batch: its forward error passes unchanged (no hint)."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)

        def forward(self, z):
            raise RuntimeError("something else is wrong")

    with pytest.raises(RuntimeError, match="something else is wrong"):
        Smooth(Broken(), 3, 0.5).certify(torch.rand(4, 2, 7), 4, 8, 0.1, 16)
