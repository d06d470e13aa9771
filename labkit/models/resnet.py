"""The ResNet family of lab 03 (seed 002's ablations): ResNet-18/34/50 with three variants, stochastic
depth, BlurPool anti-aliased downsampling and a width multiplier.

Built from torchvision's pieces (``conv3x3``/``conv1x1`` from ``torchvision.models.resnet`` and
``torchvision.ops.StochasticDepth``), so with the defaults switched off the network is exactly
torchvision's: ``resnet(50, 1000, small_input=False)`` has ``torchvision.models.resnet50``'s
25,557,032 parameters.

Variants (``variant=``):

- ``"basic"``: the original post-activation block, ``relu(x + bn(conv(...)))`` (He et al. 2015).
- ``"preact"``: pre-activation (He et al. 2016): BN-ReLU *before* each conv, nothing after the
  addition, so the skip path is a clean identity (no ReLU on it); one BN-ReLU before the head.
- ``"convhead"``: the basic network whose last FC layer is a 1×1 conv to ``num_classes`` followed
  by global average pooling — seed 002's best variant.

Switches: ``drop_path_rate`` drops whole residual branches per sample (stochastic depth, Huang et al.
2016) with a rate rising linearly from 0 in the first block to ``drop_path_rate`` in the last;
``use_blurpool`` replaces each stride-2 step by a fixed binomial low-pass filter followed by
subsampling (Zhang 2019, "Making convolutional networks shift-invariant again"); ``width`` multiplies
every channel count (minimum 8) so quick runs fit a 2-core CPU; ``small_input`` uses a 3×3 stride-1
stem without max-pooling (32–64 px images such as Tiny ImageNet) instead of ImageNet's 7×7/2 + pool.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3
from torchvision.ops import StochasticDepth

from labkit.models.summary import count_parameters

VARIANTS = ("basic", "preact", "convhead")
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


class BlurPool(nn.Module):
    """Anti-aliased downsampling: a fixed binomial low-pass filter, then subsampling by ``stride``.

    ``filt_size`` taps of the binomial row (3 → [1, 2, 1]); the 2-D filter is its outer product,
    normalised to sum 1 and applied to each channel separately (depthwise), with reflect padding
    (replicate for maps too small to reflect). It has no trainable parameters: the filter is a buffer.
    """

    def __init__(self, channels: int, stride: int = 2, filt_size: int = 3) -> None:
        super().__init__()
        if filt_size < 1:
            raise ValueError(f"BlurPool: filt_size={filt_size} must be >= 1.")
        row = torch.tensor([math.comb(filt_size - 1, k) for k in range(filt_size)], dtype=torch.float32)
        kernel = torch.outer(row, row)
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel", kernel.expand(channels, 1, filt_size, filt_size).clone())
        self.channels, self.stride, self.filt_size = channels, stride, filt_size
        left = (filt_size - 1) // 2
        self.pad = (left, filt_size - 1 - left, left, filt_size - 1 - left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = min(x.shape[-2:]) <= max(self.pad)
        x = F.pad(x, self.pad, mode="replicate" if small else "reflect")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, filt_size={self.filt_size}"


def _strided_conv(conv, cin: int, cout: int, stride: int, blurpool: bool) -> nn.Module:
    """``conv(cin, cout, stride)``, or with BlurPool: blur-and-subsample then a stride-1 conv."""
    if stride == 1 or not blurpool:
        return conv(cin, cout, stride)
    return nn.Sequential(BlurPool(cin, stride), conv(cin, cout, 1))


def _drop_path(p: float) -> nn.Module:
    return StochasticDepth(p, mode="row") if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34); ``preact`` moves BN-ReLU before each conv."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 preact: bool = False, drop_path: float = 0.0, blurpool: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(cin if preact else planes)
        self.conv1 = _strided_conv(conv3x3, cin, planes, stride, blurpool)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            pre = self.relu(self.bn1(x))
            shortcut = x if self.downsample is None else self.downsample(pre)
            out = self.conv1(pre)
            out = self.conv2(self.relu(self.bn2(out)))
            return shortcut + self.drop_path(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(shortcut + self.drop_path(out))

    def last_bn(self) -> nn.BatchNorm2d | None:
        """The BN that ends the residual branch (zero-initialised in post-activation blocks)."""
        return None if self.preact else self.bn2


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride, torchvision's "v1.5"), 1×1 expand ×4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 preact: bool = False, drop_path: float = 0.0, blurpool: bool = False) -> None:
        super().__init__()
        self.preact = preact
        out_ch = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin if preact else planes)
        self.conv1 = conv1x1(cin, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _strided_conv(conv3x3, planes, planes, stride, blurpool)
        self.bn3 = nn.BatchNorm2d(planes if preact else out_ch)
        self.conv3 = conv1x1(planes, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            pre = self.relu(self.bn1(x))
            shortcut = x if self.downsample is None else self.downsample(pre)
            out = self.conv1(pre)
            out = self.conv2(self.relu(self.bn2(out)))
            out = self.conv3(self.relu(self.bn3(out)))
            return shortcut + self.drop_path(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(shortcut + self.drop_path(out))

    def last_bn(self) -> nn.BatchNorm2d | None:
        """The BN that ends the residual branch (zero-initialised in post-activation blocks)."""
        return None if self.preact else self.bn3


class ResNet(nn.Module):
    """A ResNet built by :func:`resnet`; ``describe()`` gives its settings for the run record."""

    def __init__(self, depth: int = 50, num_classes: int = 200, variant: str = "basic",
                 drop_path_rate: float = 0.0, use_blurpool: bool = False, width: float = 1.0,
                 small_input: bool = True) -> None:
        super().__init__()
        kind, layers = DEPTHS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        preact = variant == "preact"
        self.settings = dict(depth=depth, num_classes=num_classes, variant=variant,
                             drop_path_rate=drop_path_rate, use_blurpool=use_blurpool, width=width,
                             small_input=small_input)
        chans = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        stem = chans[0]
        if small_input:
            self.stem = nn.Sequential(conv3x3(3, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        else:
            pool = (nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), BlurPool(stem, 2)) if use_blurpool
                    else nn.MaxPool2d(3, stride=2, padding=1))
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True), pool)
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        cin, stages = stem, []
        for i, (planes, n) in enumerate(zip(chans, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                cout = planes * block.expansion
                downsample = None
                if stride != 1 or cin != cout:
                    parts = [BlurPool(cin, stride), conv1x1(cin, cout)] if use_blurpool and stride > 1 \
                        else [conv1x1(cin, cout, stride)]
                    if not preact:  # pre-activation shortcuts see the block's BN-ReLU output instead
                        parts.append(nn.BatchNorm2d(cout))
                    downsample = nn.Sequential(*parts)
                blocks.append(block(cin, planes, stride, downsample, preact=preact,
                                    drop_path=rates.pop(0), blurpool=use_blurpool))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_act = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if preact else nn.Identity()
        if variant == "convhead":
            self.head = nn.Sequential(nn.Conv2d(cin, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts as zero, so every block starts as the identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)) and m.last_bn() is not None:
                nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.final_act(x))

    def describe(self) -> dict:
        """The constructor settings plus the parameter count, for the run record."""
        return {"name": f"resnet{self.settings['depth']}", **self.settings,
                "parameters": count_parameters(self)}


def resnet(depth: int = 50, num_classes: int = 200, variant: str = "basic", drop_path_rate: float = 0.0,
           use_blurpool: bool = False, width: float = 1.0, small_input: bool = True) -> ResNet:
    """A ResNet-18/34/50 for ``num_classes`` classes; input float ``[B, 3, H, W]`` → logits ``[B, K]``.

    ``variant``: ``"basic"`` | ``"preact"`` | ``"convhead"`` (see the module docstring);
    ``drop_path_rate`` in [0, 1): stochastic depth of the last block (linearly less before it);
    ``use_blurpool``: anti-aliased stride-2 steps; ``width`` > 0 multiplies channel counts
    (64·width, … 512·width, at least 8); ``small_input``: 3×3 stride-1 stem, no max-pool (32–64 px).
    Any input size of at least 8 px (``small_input``) or 32 px works: the head pools globally.
    """
    if depth not in DEPTHS:
        raise ValueError(f"resnet: depth={depth!r} is not supported; use one of {sorted(DEPTHS)}.")
    if variant not in VARIANTS:
        raise ValueError(f"resnet: variant={variant!r} is not known; use one of {VARIANTS}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"resnet: num_classes={num_classes!r} must be a positive integer.")
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"resnet: drop_path_rate={drop_path_rate!r} must be in [0, 1) (seed 002 used 0.2).")
    if not float(width) > 0:
        raise ValueError(f"resnet: width={width!r} must be > 0 (1.0 = standard channel counts).")
    return ResNet(depth, num_classes, variant, float(drop_path_rate), bool(use_blurpool), float(width),
                  bool(small_input))
