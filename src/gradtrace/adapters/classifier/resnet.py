"""A small ResNet for small images, laid out and named as torchvision's `resnet18` (BasicBlock residual blocks).

Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`), so group
names read the same for this model and for a torchvision ResNet a user builds through the factory kind. What
differs, for images of 8–32 pixels: the stem is one 3x3 convolution with stride 1 and no max-pool (as in the
CIFAR ResNets), the number of stages, their widths and blocks come from the config, and the normalisation is
GroupNorm by default (`norm: "batch"` for torchvision's BatchNorm; the modules keep the `bn` names either way).
GroupNorm keeps every example's output independent of the batch it is in, in training as in featurization,
and the Kronecker featurizer hooks it (BatchNorm's parameters take its slower vmap path there).

Forward passes are written for `torch.func` (no in-place ops, no data-dependent control flow).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradtrace.adapters.classifier.configs import check_model_config


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """GroupNorm with gcd(groups, channels) groups, or BatchNorm2d."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(int(groups), int(channels)), channels)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with a residual connection (1x1 projection when the shape
    changes)."""

    def __init__(self, inplanes: int, planes: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes, groups)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            make_norm(norm, planes, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem (3x3 conv + norm), stages `layer1..layerK` of BasicBlocks (stage i > 1 halves the resolution), global
    average pool, `fc` to the classes' logits."""

    def __init__(self, config: dict):
        super().__init__()
        check_model_config(config)
        self.config: dict = copy.deepcopy(config)
        widths, blocks = config["widths"], config["blocks"]
        norm, groups = config["norm"], config["norm_groups"]
        self.conv1 = nn.Conv2d(config["channels"], widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, widths[0], groups)
        inplanes = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = [BasicBlock(inplanes if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, norm, groups)
                     for j in range(count)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], config["num_classes"])
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Set by training: the ids trained on (None = all; also restored by load_checkpoint) and its log.
        self.train_ids: np.ndarray | None = None
        self.train_log: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
