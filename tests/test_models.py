"""Tests for the VGG11 and ResNet18 models in common/models.py."""
import inspect
import math

import pytest
import torch
import torch.nn as nn

import common

SMALL = 0.125  # channel width for the tests that run a forward pass

# Parameter counts of the source models at width 1 (constructed from chengyangfu/pytorch-vgg-cifar10
# vgg.py and kuangliu/pytorch-cifar models/resnet.py, classifier widened to num_classes). Dropout
# has no parameters, so removing it leaves the counts unchanged. ResNet18 without BN has no
# source; its count is the BN model's less its 9,600 BN parameters.
SOURCE_PARAMETER_COUNTS = {
    ("vgg11", True, 10): 9_756_426,  # vgg11_bn
    ("vgg11", True, 100): 9_802_596,
    ("vgg11", False, 10): 9_750_922,  # vgg11
    ("vgg11", False, 100): 9_797_092,
    ("resnet18", True, 10): 11_173_962,  # ResNet18()
    ("resnet18", True, 100): 11_220_132,
    ("resnet18", False, 10): 11_164_362,
    ("resnet18", False, 100): 11_210_532,
}


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name,batch_norm,num_classes", list(SOURCE_PARAMETER_COUNTS))
def test_parameter_count_at_width_one_matches_source(name, batch_norm, num_classes):
    with torch.device("meta"):  # shapes only: no memory, nothing run
        model = common.build_model(name, num_classes=num_classes, batch_norm=batch_norm)
    assert parameter_count(model) == SOURCE_PARAMETER_COUNTS[name, batch_norm, num_classes]


@pytest.mark.parametrize("name", list(common.MODELS))
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, batch_norm, num_classes):
    torch.manual_seed(0)
    model = common.build_model(name, num_classes=num_classes, batch_norm=batch_norm, width=SMALL)
    x = torch.randn(3, 3, 32, 32)  # (N, C, H, W)
    out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(common.MODELS))
def test_batch_norm_false_removes_only_batch_norm(name):
    with_bn = common.build_model(name, batch_norm=True, width=SMALL)
    without = common.build_model(name, batch_norm=False, width=SMALL)
    assert batch_norms(with_bn) and not batch_norms(without)
    bn_parameters = sum(parameter_count(m) for m in batch_norms(with_bn))
    assert parameter_count(without) == parameter_count(with_bn) - bn_parameters


def test_conv_biases_follow_the_sources():
    # VGG convs carry biases with and without BN (source vgg11 / vgg11_bn); ResNet convs never do.
    for batch_norm in (True, False):
        vgg = common.VGG11(batch_norm=batch_norm, width=SMALL)
        resnet = common.ResNet18(batch_norm=batch_norm, width=SMALL)
        vgg_convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
        resnet_convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
        assert len(vgg_convs) == 8 and len(resnet_convs) == 20
        assert all(m.bias is not None for m in vgg_convs)
        assert all(m.bias is None for m in resnet_convs)


@pytest.mark.parametrize("name", list(common.MODELS))
def test_width_multiplier_scales_channels(name):
    counts = [parameter_count(common.build_model(name, width=w)) for w in (0.0625, 0.125, 0.25)]
    assert counts[0] < counts[1] < counts[2] < SOURCE_PARAMETER_COUNTS[name, True, 10]
    model = common.build_model(name, width=0.25)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.out_channels == 16  # 64 * 0.25


@pytest.mark.parametrize("name", list(common.MODELS))
def test_tiny_width_keeps_one_channel(name):
    model = common.build_model(name, width=1e-3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels == 1 for m in convs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_raises_value_error_naming_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'vgg16'.*vgg11.*resnet18"):
        common.build_model("vgg16")


@pytest.mark.parametrize("name", list(common.MODELS))
@pytest.mark.parametrize("kwargs", [{"width": 0.0}, {"width": -1.0}, {"num_classes": 0}])
def test_bad_arguments_raise_value_error(name, kwargs):
    with pytest.raises(ValueError):
        common.build_model(name, **kwargs)


def test_registry_constructors_share_keyword_signature():
    signatures = {name: inspect.signature(cls) for name, cls in common.MODELS.items()}
    assert len(set(map(str, signatures.values()))) == 1
    assert set(signatures["vgg11"].parameters) == {"num_classes", "batch_norm", "width"}


def test_vgg_conv_init_follows_source_rule():
    # Source rule: w ~ N(0, 2 / (k_h * k_w * out_channels)), bias 0. Standardised and pooled
    # over all convs, the weights should have mean 0, std 1 and the normal's kurtosis 3
    # (PyTorch's default uniform init would give std ~ 0.4-0.8 here and kurtosis 1.8).
    torch.manual_seed(0)
    model = common.VGG11(width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    z = torch.cat([
        m.weight.detach().flatten().double()
        / math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
        for m in convs
    ])  # (P,), P ~ 580k
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    kurtosis = ((z - z.mean()) ** 4).mean() / z.var(unbiased=False) ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.1)
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)


@pytest.mark.parametrize("name", list(common.MODELS))
def test_default_init_elsewhere(name):
    # Layers the sources do not re-initialise keep PyTorch's default: weights uniform in
    # +-1/sqrt(fan_in), BN weight 1 and bias 0.
    torch.manual_seed(0)
    model = common.build_model(name, width=0.25)
    defaults = [nn.Linear] if name == "vgg11" else [nn.Linear, nn.Conv2d]
    for m in model.modules():
        if isinstance(m, tuple(defaults)):
            bound = 1.0 / math.sqrt(m.weight[0].numel())
            assert m.weight.abs().max().item() <= bound
            assert m.weight.abs().max().item() > 0.9 * bound  # uniform fills the interval
    for m in batch_norms(model):
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", list(common.MODELS))
@pytest.mark.parametrize("batch_norm", [True, False])
def test_float64_forward_matches_float32(name, batch_norm):
    torch.manual_seed(0)
    model = common.build_model(name, batch_norm=batch_norm, width=SMALL).eval()
    x = torch.randn(2, 3, 32, 32)  # (N, C, H, W)
    out32 = model(x)
    out64 = model.double()(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)


def test_vgg_layer_order_is_configuration_a():
    # Configuration A of Simonyan & Zisserman (2015), written out: conv widths, "M" a max pool
    config_a = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    assert common.VGG11_CONFIG == config_a
    with torch.device("meta"):
        model = common.VGG11(width=1.0)
    expected = []
    for v in config_a:
        expected += ["MaxPool2d"] if v == "M" else ["Conv2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in model.features] == expected
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
        (512, 512)]
    assert [type(m).__name__ for m in model.classifier] == [
        "Linear", "ReLU", "Linear", "ReLU", "Linear"]  # the source's, dropout removed
    assert [(m.in_features, m.out_features) for m in model.classifier
            if isinstance(m, nn.Linear)] == [(512, 512), (512, 512), (512, 10)]


def test_resnet18_channels_at_width_one():
    with torch.device("meta"):
        model = common.ResNet18(width=1.0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # stem, then per stage two blocks of two 3x3 convs, a 1x1 shortcut in the first block of
    # stages 2-4 (modules() lists it after the block's second conv)
    assert [m.out_channels for m in convs] == [64] + [64] * 4 + [128] * 5 + [256] * 5 + [512] * 5
    assert [m.kernel_size for m in convs].count((1, 1)) == 3
    assert [m.stride for m in convs].count((2, 2)) == 6  # first conv and shortcut, stages 2-4
    assert (model.linear.in_features, model.linear.out_features) == (512, 10)


@pytest.mark.parametrize("name,width,expected", [
    # hand-counted at width 1/32, no BN: VGG11 convs 56 + 76 + 296 + 584 + 1168 + 3 x 2320,
    # linears 272 + 272 + 170
    ("vgg11", 1 / 32, 9_854),
    ("vgg11", 1.0, 9_750_922),
])
def test_parameter_count_at_reduced_width(name, width, expected):
    with torch.device("meta"):
        model = common.build_model(name, batch_norm=False, width=width)
    assert parameter_count(model) == expected


def test_resnet_stage_shapes():
    model = common.ResNet18(width=SMALL)
    shapes = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, stage).register_forward_hook(
            lambda m, i, o, stage=stage: shapes.__setitem__(stage, tuple(o.shape)))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == {"layer1": (2, 8, 32, 32), "layer2": (2, 16, 16, 16),
                      "layer3": (2, 32, 8, 8), "layer4": (2, 64, 4, 4)}


@pytest.mark.parametrize("stride,in_planes", [(1, 4), (2, 4)])
def test_basic_block_adds_its_shortcut(stride, in_planes):
    # With the second conv zeroed (and no BN), a block reduces to relu(shortcut(x)): the identity
    # when shapes match, a strided 1x1 conv otherwise.
    torch.manual_seed(0)
    planes = 4 if stride == 1 else 8
    block = common.BasicBlock(in_planes, planes, stride, batch_norm=False)
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(2, in_planes, 8, 8)  # (N, C, H, W)
    expected = torch.relu(x if stride == 1 else block.shortcut(x))
    torch.testing.assert_close(block(x), expected)
    assert len(block.shortcut) == (0 if stride == 1 else 1)
