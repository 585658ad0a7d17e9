"""Models: MLPs (with ReLU, tanh or Gaussian activations), VGG11 and ResNet18 for 32x32 inputs,
and the registry `MODELS` behind `build_model`."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

class Gaussian(nn.Module):
    """Gaussian activation exp(-x^2 / (2 sigma^2)), as in coordinate networks."""

    def __init__(self, sigma=0.1):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return torch.exp(-x.square() / (2 * self.sigma ** 2))

    def extra_repr(self):
        return f"sigma={self.sigma}"


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gaussian": Gaussian}


def _init_default(linear, std):
    linear.reset_parameters()  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias


def _init_normal(linear, std):
    nn.init.normal_(linear.weight, 0.0, std)
    nn.init.normal_(linear.bias, 0.0, std)


# Initialisations of one nn.Linear: (linear, std) -> None. "normal" draws weights and biases
# from N(0, std^2); "default" ignores std.
INITS = {"default": _init_default, "normal": _init_normal}


class MLP(nn.Sequential):
    """Fully-connected network: flatten, then `depth` linear layers of width `width` with the
    activation between them (none after the last).

    Args:
        in_features, out_features: input size (after flattening) and number of outputs.
        width: hidden width. depth: number of linear layers (>= 1).
        activation: key of ACTIVATIONS. sigma: width of the Gaussian activation.
        init: key of INITS; init_std: the std for "normal".
    """

    def __init__(self, in_features, out_features, width=200, depth=3, activation="relu",
                 init="default", init_std=1.0, sigma=0.1):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (choose from {', '.join(ACTIVATIONS)})")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r} (choose from {', '.join(INITS)})")
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        layers = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(Gaussian(sigma) if activation == "gaussian" else ACTIVATIONS[activation]())
            linear = nn.Linear(fan_in, fan_out)
            INITS[init](linear, init_std)
            layers.append(linear)
        super().__init__(*layers)

    def linears(self):
        """The linear layers, first to last."""
        return [m for m in self if isinstance(m, nn.Linear)]

    def features(self, x):
        """The last hidden layer's features (N, width): the input of the last linear layer."""
        for module in list(self)[:-1]:
            x = module(x)
        return x


def _scaled(channels, width):
    """Channel count `channels * width`, rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


def _check_model_args(num_classes, width):
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")


# VGG11 is configuration "A" of chengyangfu/pytorch-vgg-cifar10's vgg.py: numbers are conv
# output channels, "M" is a 2x2 max-pool.
VGG11_CONFIG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    """VGG11 for 32x32 inputs: chengyangfu/pytorch-vgg-cifar10's `vgg11_bn` without dropout.

    features: per entry of VGG11_CONFIG, conv3x3(padding 1) -> [BatchNorm2d] -> ReLU, or a
    2x2 max-pool; classifier: Linear(512, 512) -> ReLU -> Linear(512, 512) -> ReLU ->
    Linear(512, num_classes). The source's two Dropout layers are removed (paper, B.1/B.2).
    With `batch_norm=False` the BatchNorm2d layers are dropped and nothing takes their place;
    the convolutions keep their biases either way, as in the source's `vgg11` and `vgg11_bn`.

    Initialisation as in the source: conv weights ~ N(0, 2 / (3 * 3 * out_channels)) and conv
    biases zero; Linear and BatchNorm layers keep PyTorch's defaults.

    Args:
        num_classes: number of outputs (10 for CIFAR-10, 100 for CIFAR-100).
        batch_norm: whether each conv is followed by BatchNorm2d.
        width: channel multiplier; every conv and hidden Linear width is scaled and rounded
            (at least 1). 1.0 is the paper's model.
    """

    def __init__(self, *, num_classes=10, batch_norm=True, width=1.0):
        super().__init__()
        _check_model_args(num_classes, width)
        layers, in_channels = [], 3
        for v in VGG11_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = _scaled(v, width)
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())  # out of place (the source's is in place); the same numbers
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        # Same rule and order as the source, so a seeded width-1 model equals the source's.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / n))
                    m.bias.zero_()

    def forward(self, x):  # x: (N, 3, 32, 32)
        x = self.features(x)  # (N, C, 1, 1), C = 512 * width
        return self.classifier(x.flatten(1))  # (N, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block (kuangliu/pytorch-cifar): two conv3x3 plus a shortcut.

    out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), where the shortcut is the
    identity, or conv1x1(stride) -> BN when the shape changes. Convs have no bias, as in the
    source; with `batch_norm=False` each BN is an identity.
    """

    def __init__(self, in_planes, planes, stride=1, batch_norm=True):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            layers = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(planes))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x):  # x: (N, in_planes, H, W)
        out = F.relu(self.bn1(self.conv1(x)))  # (N, planes, H / stride, W / stride)
        out = self.bn2(self.conv2(out))
        # Out-of-place add (the source's is in place); the same numbers.
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs: kuangliu/pytorch-cifar's models/resnet.py, BasicBlock [2,2,2,2].

    conv3x3(3, 64) -> BN -> ReLU, four stages of two BasicBlocks with 64, 128, 256, 512
    planes (strides 1, 2, 2, 2), 4x4 average pool, Linear(512, num_classes). Convs have no
    bias, as in the source. With `batch_norm=False` every BatchNorm2d is removed and nothing
    takes its place (the source has no BN-free variant; the convs stay bias-free, so the only
    change is the missing BN). Initialisation: PyTorch's defaults, as in the source.

    Args:
        num_classes: number of outputs (10 for CIFAR-10, 100 for CIFAR-100).
        batch_norm: whether BatchNorm2d layers are present.
        width: channel multiplier; every stage's planes are scaled and rounded (at least 1).
            1.0 is the paper's model.
    """

    def __init__(self, *, num_classes=10, batch_norm=True, width=1.0):
        super().__init__()
        _check_model_args(num_classes, width)
        planes = [_scaled(p, width) for p in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0]) if batch_norm else nn.Identity()
        blocks, in_planes = [], planes[0]
        for p, stride in zip(planes, (1, 2, 2, 2)):
            blocks.append(nn.Sequential(BasicBlock(in_planes, p, stride, batch_norm),
                                        BasicBlock(p, p, 1, batch_norm)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.linear = nn.Linear(planes[3], num_classes)

    def forward(self, x):  # x: (N, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))  # (N, 64w, 32, 32)
        out = self.layer1(out)  # (N, 64w, 32, 32)
        out = self.layer2(out)  # (N, 128w, 16, 16)
        out = self.layer3(out)  # (N, 256w, 8, 8)
        out = self.layer4(out)  # (N, 512w, 4, 4)
        out = F.avg_pool2d(out, 4)  # (N, 512w, 1, 1)
        return self.linear(out.flatten(1))  # (N, num_classes)


# Constructors sharing the keyword signature (num_classes=10, batch_norm=True, width=1.0).
MODELS = {"vgg11": VGG11, "resnet18": ResNet18}


def build_model(name, **kwargs):
    """The model registered as `name` in MODELS, built with `kwargs`; ValueError if unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)

