"""Residual networks (He et al. 2016): ImageNet-style ResNet-18/34/50 and CIFAR ResNet-20/56.

Shortcuts: identity when the shape is unchanged, otherwise a projection (1x1 convolution
without bias + BatchNorm), i.e. option B of the paper. torchvision uses it for ResNet-18/34/50;
for ResNet-20/56 the paper used zero-padding (option A) but projections are the common choice in
pruning work and keep every channel a real, prunable one.

Each block ends ``relu_out(main(x) + shortcut(x))``: every ReLU is its own module and the add is
out of place, so forward hooks see every activation and torch-pruning can trace the graph.
"""
from dataclasses import dataclass
from functools import partial
from typing import Sequence, Tuple

from torch import nn

from .registry import register_model, scaled


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut (ResNet-18/34 and the CIFAR ResNets)."""

    def __init__(self, in_ch: int, mid: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_ch, out, stride)
        self.relu_out = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50); stride on the 3x3 as in torchvision ("ResNet v1.5")."""

    def __init__(self, in_ch: int, mid: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_ch, out, stride)
        self.relu_out = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages ``layer1..layerN`` of residual blocks (the first stage keeps the resolution,
    each later one halves it), global average pooling, Linear classifier.

    stem="imagenet": 7x7 stride-2 convolution and 3x3 stride-2 max-pool (ImageNet ResNets);
    stem="cifar": 3x3 stride-1 convolution, no pooling (CIFAR ResNets; ``maxpool`` is nn.Identity).
    ``stage_widths`` holds one (block inner width, block output width) pair per stage, already scaled.
    """

    def __init__(self, block: type, blocks_per_stage: Sequence[int], stage_widths: Sequence[Tuple[int, int]],
                 stem_width: int, *, stem: str, in_channels: int, num_classes: int):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU()
            self.maxpool = nn.Identity()
        c = stem_width
        self.num_stages = len(blocks_per_stage)
        for i, (n, (mid, out)) in enumerate(zip(blocks_per_stage, stage_widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, mid, out, stride=2 if (i > 0 and j == 0) else 1))
                c = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


STEMS = ("cifar", "imagenet")


@dataclass(frozen=True)
class ResNetPlan:
    """One ResNet depth: its block, blocks per stage, base stage widths, block expansion, base stem width, and
    whether it takes a "stem" argument (the ImageNet ResNets) or always has the CIFAR stem."""

    block: type
    blocks: Tuple[int, ...]
    base_widths: Tuple[int, ...]
    expansion: int
    stem_width: int
    has_stem: bool


RESNETS = {
    "resnet18": ResNetPlan(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 1, 64, True),
    "resnet34": ResNetPlan(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), 1, 64, True),
    "resnet50": ResNetPlan(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 4, 64, True),
    "resnet20": ResNetPlan(BasicBlock, (3, 3, 3), (16, 32, 64), 1, 16, False),
    "resnet56": ResNetPlan(BasicBlock, (9, 9, 9), (16, 32, 64), 1, 16, False),
}


def resolve_stem(stem, input_size: int) -> str:
    """The stem asked for, or by default "imagenet" for inputs of 128 and more, else "cifar"."""
    if stem is None:
        stem = "imagenet" if input_size >= 128 else "cifar"
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(map(repr, STEMS))} (or None for the default); got {stem!r}")
    return stem


def build_resnet(name: str, *, num_classes: int, in_channels: int, input_size: int, width: float, stem=None):
    plan = RESNETS[name]
    stem = resolve_stem(stem, input_size) if plan.has_stem else "cifar"
    stage_widths = [(scaled(c, width), scaled(c * plan.expansion, width)) for c in plan.base_widths]
    model = ResNet(plan.block, plan.blocks, stage_widths, scaled(plan.stem_width, width), stem=stem,
                   in_channels=in_channels, num_classes=num_classes)
    return model, ({"stem": stem} if plan.has_stem else {})


for _name, _plan in RESNETS.items():
    register_model(_name, extras={"stem": None} if _plan.has_stem else {})(partial(build_resnet, _name))
