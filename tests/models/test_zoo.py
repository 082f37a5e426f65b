"""Model zoo: names, shapes, parameter counts, fx-traceability and the sk_arch round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sparsekern import models
from sparsekern.models import build

CIFAR = ["resnet20", "resnet56", "resnet110", "vgg16_bn", "vgg19_bn"]
IMAGENET = ["resnet18", "resnet50", "mobilenet_v2"]
ALL = CIFAR + IMAGENET
SMALL_IMAGENET_INPUT = 64  # keeps the ImageNet forwards fast on CPU


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _test_input(name: str, in_channels: int = 3, batch: int = 2, size: int | None = None) -> torch.Tensor:
    if size is None:
        size = 32 if name in CIFAR else SMALL_IMAGENET_INPUT
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, in_channels, size, size, generator=gen)


def test_list_models_is_exact():
    assert models.list_models() == sorted(ALL + ["sru_lm", "transformer_lm"])


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_with_custom_classes_and_channels(name):
    torch.manual_seed(0)
    model = build(name, num_classes=7, in_channels=2).eval()
    x = _test_input(name, in_channels=2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # a non-degenerate network: the two samples give different logits (untrained MobileNetV2 in eval
    # mode has logits ~1e-10 under the standard init, so compare relative to their scale)
    assert (y[0] - y[1]).abs().max() > 1e-3 * y.abs().max() > 0


@pytest.mark.parametrize("name", ALL)
def test_default_num_classes(name):
    model = build(name)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == (10 if name in CIFAR else 1000)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet18", {}, 11_689_512),
        ("resnet50", {}, 25_557_032),
        ("mobilenet_v2", {}, 3_504_872),
        ("vgg16_bn", {"imagenet": True}, 138_365_992),
        ("vgg19_bn", {"imagenet": True}, 143_678_248),
    ],
)
def test_torchvision_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):  # shapes only: skips initialising 100M+ weights
        model = build(name, **kwargs)
    assert _n_params(model) == expected


def _cifar_resnet_params(depth: int, num_classes: int = 10) -> int:
    """Independent count: 3x3 stem, BasicBlocks (two 3x3 convs + 2 BNs), option-B projections, fc."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # conv1 + bn1
    c_in = 16
    for c in (16, 32, 64):
        for i in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c
            if c_in != c:
                total += c_in * c + 2 * c  # 1x1 projection + BN
            c_in = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_cifar_resnet_parameter_counts(depth):
    model = build(f"resnet{depth}")
    assert _n_params(model) == _cifar_resnet_params(depth)
    n = (depth - 2) // 6
    for stage in ("layer1", "layer2", "layer3"):
        assert len(getattr(model, stage)) == n


def test_cifar_vgg_parameter_counts():
    # 13 (16) conv3x3 without bias + BN, then Linear(512, 10): the Network Slimming CIFAR layout.
    def count(cfg):
        total, c_in = 0, 3
        for c in cfg:
            total += 9 * c_in * c + 2 * c
            c_in = c
        return total + 512 * 10 + 10

    vgg16 = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg19 = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    assert _n_params(build("vgg16_bn")) == count(vgg16) == 14_724_042
    assert _n_params(build("vgg19_bn")) == count(vgg19)


@pytest.mark.parametrize("name", ALL)
def test_fx_symbolic_trace_matches_eager(name):
    torch.manual_seed(0)
    model = build(name).eval()
    # give BN non-trivial statistics so a wrongly wired trace would differ
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    traced = torch.fx.symbolic_trace(model)
    x = _test_input(name, size=16 if name in CIFAR else 32)  # small: only the wiring is compared
    with torch.no_grad():
        expected = model(x)
        got = traced(x)
    torch.testing.assert_close(got, expected)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert first_conv in called


@pytest.mark.parametrize("name", ALL)
def test_sk_arch_round_trip(name):
    kwargs = {"num_classes": 5, "in_channels": 1}
    if name.startswith("vgg"):
        kwargs["imagenet"] = name == "vgg19_bn"
    with torch.device("meta"):  # shapes only
        model = build(name, **kwargs)
    arch = models.arch_of(model)
    assert arch == {"name": name, "kwargs": kwargs}
    assert json.loads(json.dumps(arch)) == arch
    with torch.device("meta"):
        rebuilt = build(**arch)
    assert rebuilt.sk_arch == arch
    a = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert list(a) == list(b)
    assert a == b


@pytest.mark.parametrize("name", ALL)
def test_named_constructors_go_through_build(name):
    model = getattr(models, name)(num_classes=3)
    assert model.sk_arch["name"] == name
    assert model.sk_arch["kwargs"]["num_classes"] == 3
    rebuilt = build(**model.sk_arch)
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [tuple(p.shape) for p in model.parameters()]


def test_arch_of_foreign_model_is_none():
    assert models.arch_of(nn.Linear(2, 2)) is None


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as info:
        build("resnet57")
    msg = str(info.value)
    assert "resnet57" in msg
    for name in ALL:
        assert name in msg
    with pytest.raises(ValueError):
        models.default_input_size("alexnet")


def test_build_rejects_bad_kwargs():
    with pytest.raises(TypeError):
        build("resnet20", num_classes=object())
    with pytest.raises(TypeError):
        build("resnet20", not_an_argument=1)
    with pytest.raises(TypeError):
        build("resnet20", {"num_classes": 3}, num_classes=4)


def test_default_input_size():
    for name in CIFAR:
        assert models.default_input_size(name) == 32
    for name in IMAGENET:
        assert models.default_input_size(name) == 224
    assert models.default_input_size("vgg16_bn", {"imagenet": True}) == 224
    with torch.device("meta"):
        assert models.default_input_size(**build("vgg19_bn", imagenet=True).sk_arch) == 224
    assert models.default_input_size(**build("resnet56").sk_arch) == 32


def test_cifar_resnet_module_names_and_shapes():
    model = build("resnet56")
    mods = dict(model.named_modules())
    for name in ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2",
                 "layer2.0.downsample.0", "layer2.0.downsample.1", "layer3.8.conv2", "avgpool", "fc"]:
        assert name in mods, name
    assert "layer3.9" not in mods and "layer4" not in mods
    assert model.layer1[0].downsample is None  # 16 -> 16, stride 1: identity shortcut
    ds = mods["layer2.0.downsample.0"]
    assert isinstance(ds, nn.Conv2d)
    assert (ds.in_channels, ds.out_channels, ds.kernel_size, ds.stride) == (16, 32, (1, 1), (2, 2))
    assert isinstance(mods["layer3.0.downsample.1"], nn.BatchNorm2d)
    assert mods["layer2.0.conv1"].stride == (2, 2) and mods["layer2.1.conv1"].stride == (1, 1)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert (model.fc.in_features, model.fc.out_features) == (64, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 55 + 2  # 55 convs + 2 projections


def test_imagenet_resnet_module_names_and_shapes():
    r18 = dict(build("resnet18").named_modules())
    assert r18["conv1"].kernel_size == (7, 7) and r18["conv1"].stride == (2, 2)
    assert isinstance(r18["maxpool"], nn.MaxPool2d) and isinstance(r18["relu"], nn.ReLU)
    assert "layer1.0.downsample" not in r18 or r18["layer1.0.downsample"] is None
    assert r18["layer2.0.downsample.0"].out_channels == 128
    assert "layer4.1.conv2" in r18 and "layer4.2" not in r18

    r50 = build("resnet50")
    mods = dict(r50.named_modules())
    block = mods["layer2.0"]
    assert isinstance(block, models.Bottleneck)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (128, 128, 512)
    assert mods["layer1.0.downsample.0"].in_channels == 64
    assert mods["layer1.0.downsample.0"].out_channels == 256
    assert mods["layer1.0.downsample.0"].stride == (1, 1)
    assert [len(getattr(r50, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert r50.fc.in_features == 2048
    keys = set(r50.state_dict())
    for key in ["conv1.weight", "bn1.num_batches_tracked", "layer1.0.bn3.running_var",
                "layer4.2.conv3.weight", "layer3.0.downsample.1.weight", "fc.bias"]:
        assert key in keys, key


def test_vgg_module_names_and_layouts():
    cifar = build("vgg16_bn")
    mods = dict(cifar.named_modules())
    assert isinstance(mods["features.0"], nn.Conv2d) and mods["features.0"].bias is None
    assert isinstance(mods["features.1"], nn.BatchNorm2d) and isinstance(mods["features.2"], nn.ReLU)
    convs = [m for m in cifar.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in cifar.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 4
    assert isinstance(cifar.classifier, nn.Linear) and cifar.classifier.in_features == 512
    feat = cifar.features(torch.zeros(1, 3, 32, 32))
    assert feat.shape == (1, 512, 2, 2)
    assert len([m for m in build("vgg19_bn").features if isinstance(m, nn.Conv2d)]) == 16

    with torch.device("meta"):
        imnet = build("vgg16_bn", imagenet=True)
    assert len([m for m in imnet.features if isinstance(m, nn.MaxPool2d)]) == 5
    assert imnet.features[0].bias is not None and imnet.features[0].bias.shape == (64,)
    assert isinstance(imnet.avgpool, nn.AdaptiveAvgPool2d) and imnet.avgpool.output_size == (7, 7)
    kinds = [type(m) for m in imnet.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert imnet.classifier[0].in_features == 25088 and imnet.classifier[6].out_features == 1000
    assert "features.43" in dict(imnet.named_modules())  # last max-pool of torchvision's vgg16_bn


def test_vgg_custom_cfg_builds_thinner_network():
    cfg = [32, "M", 48, "M", 64, 64]
    model = build("vgg16_bn", cfg=cfg, num_classes=4)
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [32, 48, 64, 64]
    assert model.classifier.in_features == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    rebuilt = build(**model.sk_arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        build("vgg16_bn", cfg=[32, "X"])


def test_vgg_two_fc_classifier_of_the_anp_code():
    model = build("vgg16_bn", classifier="two_fc", num_classes=7)
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (model.classifier[0].in_features, model.classifier[0].out_features) == (512, 512)
    assert (model.classifier[3].in_features, model.classifier[3].out_features) == (512, 7)
    assert _n_params(model) == _n_params(build("vgg16_bn", num_classes=7)) - (512 * 7 + 7) \
        + (512 * 512 + 512) + 2 * 512 + (512 * 7 + 7)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    assert models.vgg16_bn(classifier="two_fc").sk_arch["kwargs"]["classifier"] == "two_fc"
    rebuilt = build(**model.sk_arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    thin = build("vgg16_bn", cfg=[16, "M", 32], classifier="two_fc")
    assert thin.classifier[0].in_features == 32 and thin(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="classifier must be one of"):
        build("vgg16_bn", classifier="three_fc")
    with pytest.raises(ValueError, match="CIFAR-layout option"):
        build("vgg16_bn", classifier="two_fc", imagenet=True)


def test_mobilenet_v2_module_names_and_residuals():
    model = build("mobilenet_v2")
    mods = dict(model.named_modules())
    stem = mods["features.0.0"]
    assert isinstance(stem, nn.Conv2d) and stem.stride == (2, 2) and stem.out_channels == 32
    assert isinstance(mods["features.0.2"], nn.ReLU6)
    # t = 1 block: depthwise first, then the linear projection
    assert mods["features.1.conv.0.0"].groups == 32
    assert mods["features.1.conv.1"].out_channels == 16
    # t = 6 block: 1x1 expand 16 -> 96, depthwise 96 stride 2, project to 24, BN
    b2 = mods["features.2"]
    assert isinstance(b2, models.InvertedResidual)
    assert mods["features.2.conv.0.0"].out_channels == 96
    dw = mods["features.2.conv.1.0"]
    assert dw.groups == 96 and dw.stride == (2, 2)
    assert mods["features.2.conv.2"].out_channels == 24 and isinstance(mods["features.2.conv.3"], nn.BatchNorm2d)
    assert mods["features.18.0"].in_channels == 320 and mods["features.18.0"].out_channels == 1280
    assert "features.19" not in mods
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[1].in_features == 1280
    blocks = [m for m in model.features if isinstance(m, models.InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for b in blocks) == 10
    assert not b2.use_res_connect and mods["features.3"].use_res_connect


def test_mobilenet_residual_is_added():
    block = models.InvertedResidual(8, 8, stride=1, expand_ratio=6).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.conv(x))
    assert models.InvertedResidual(8, 16, 1, 6).use_res_connect is False


def test_standard_init():
    torch.manual_seed(0)
    model = build("resnet56")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = model.layer3[4].conv1.weight  # 64 x 64 x 3 x 3: kaiming fan_out std = sqrt(2 / (64 * 9))
    assert abs(w.std().item() / math.sqrt(2.0 / (64 * 9)) - 1.0) < 0.05
    assert abs(w.mean().item()) < 0.005


def test_zero_init_residual():
    r18 = build("resnet18", zero_init_residual=True)
    assert torch.count_nonzero(r18.layer1[0].bn2.weight) == 0
    r50 = build("resnet50", zero_init_residual=True)
    assert torch.count_nonzero(r50.layer4[2].bn3.weight) == 0


def test_invalid_cifar_depth():
    with pytest.raises(ValueError):
        models.CifarResNet(21)


def test_vgg_imagenet_forward_and_trace():
    torch.manual_seed(0)
    model = build("vgg16_bn", imagenet=True, num_classes=6).eval()
    x = _test_input("vgg16_bn_imagenet", batch=2)  # 64x64: features end at 2x2, avgpool lifts to 7x7
    assert x.shape[-1] == SMALL_IMAGENET_INPUT
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y)
    assert y.shape == (2, 6) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn"])
def test_torch_export_smoke(name):
    model = build(name).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
