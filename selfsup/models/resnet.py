"""ResNet (He et al. 2016) in torchvision's layout and state_dict names, without the classifier.

    conv1 (7x7/2) -> bn1 -> relu -> maxpool (3x3/2) -> layer1..layer4 -> avgpool -> (B, C)
    BasicBlock: 3x3 -> 3x3 (expansion 1);  Bottleneck: 1x1 -> 3x3 (stride here, "v1.5") -> 1x1
    (expansion 4); a 1x1 conv + BN `downsample` on the shortcut when the shape changes.

Weights load from / into torchvision checkpoints (drop their `fc.*`). `cifar_stem=True` swaps
the stem for a 3x3 stride-1 conv without max-pool, the usual choice for 28-64 px images.
`fc` is an `nn.Identity` so code that replaces `model.fc` keeps working; it has no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Conv3x3(nn.Conv2d):
    """A 3x3 conv (padding 1) that runs on a 1 x 1 input as the 1 x 1 conv of its centre tap.

    The other 8 taps meet only padding there, so output and gradients are the same (theirs
    exactly 0). Why: CPU oneDNN's bf16 weight gradient of the 3x3 stride-2 conv on a 1 x 1
    input leaves those 8 taps uninitialised (inf / NaN at random, torch 2.13), and a 16-px
    crop behind the ImageNet stem reaches layer4 at 1 x 1 (SwAV's local views;
    tests/test_resnet_bf16_small.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            return nn.functional.conv2d(x, self.weight[:, :, 1:2, 1:2])
        return super().forward(x)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return Conv3x3(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


@dataclass(frozen=True)
class ResNetConfig:
    block: type
    layers: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)


ARCHS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(BasicBlock, (2, 2, 2, 2)),  # 11,176,512 params without fc
    "resnet50": ResNetConfig(Bottleneck, (3, 4, 6, 3)),  # 23,508,032 params without fc
    # the CPU demo net: one BasicBlock per stage at half width, 256-d features, 1.2M params
    "resnet_tiny": ResNetConfig(BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256)),
}


class ResNet(nn.Module):
    """forward(x (B, C, H, W)) -> global-average-pooled features (B, feature_dim)."""

    def __init__(self, block: type, layers, widths=(64, 128, 256, 512), *, in_chans: int = 3,
                 cifar_stem: bool = False, zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 stages, got {layers} and {widths}")
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.feature_dim = widths[3] * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    @classmethod
    def from_name(cls, name: str, **kw) -> ResNet:
        cfg = ARCHS[name]
        return cls(cfg.block, cfg.layers, cfg.widths, **kw)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
