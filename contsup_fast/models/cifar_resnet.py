"""CIFAR ResNets of depth 6n+2 (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, Sec. 4.2), as used by InfoPro and ContSup for their CIFAR experiments.

Stem: Conv3x3(3->16) -> BN -> ReLU; three stages of ``n`` BasicBlocks with 16, 32 and 64
channels (stride 2 at the start of stages 2 and 3, projection shortcut Conv1x1 -> BN where
the shape changes); global average pooling; Linear classifier. Input (N, 3, 32, 32) float,
output logits (N, num_classes).

Each model records its name in ``model.arch`` so that :class:`~contsup_fast.LocalSequential`
can apply the paper's split presets.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: 20, 32, 44, 56, 110, ... (``depth = 6n + 2``).
        num_classes: size of the classifier output.
        widths: channels of the stem and the three stages.

    Raises:
        ValueError: ``depth`` is not of the form 6n+2 with n >= 1.
    """

    def __init__(self, depth: int, num_classes: int = 10, widths=(16, 16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.arch = f"resnet{depth}"
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages: List[nn.Sequential] = []
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage)."""
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage), the ContSup paper's main backbone."""
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage)."""
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage)."""
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage)."""
    return CifarResNet(110, num_classes)
