"""VGG networks with batch normalisation, CIFAR style."""
from functools import partial
from typing import Sequence, Union

from torch import nn

from .registry import register_model, scaled

#: Layer plans of Simonyan & Zisserman (2015), configurations A (11), D (16) and E (19);
#: integers are 3x3 convolution widths, "M" a 2x2 max-pool.
VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-BN for small images (the common CIFAR variant): conv3x3-BN-ReLU blocks, max-pools,
    global average pooling and a single Linear classifier (as in Liu et al. 2017, "Network Slimming",
    and most CIFAR pruning work).

    A max-pool that would shrink the map below 1x1 (inputs smaller than 32) is replaced by
    ``nn.Identity`` so layer indices in ``features`` (and state_dict keys) stay the same for
    every input size; the final AdaptiveAvgPool2d(1) makes any input_size >= 1 work.
    ``cfg`` holds the actual (already scaled) widths.
    """

    def __init__(self, cfg: Sequence[Union[int, str]], *, in_channels: int, input_size: int, num_classes: int):
        super().__init__()
        layers = []
        c, size = in_channels, input_size
        for v in cfg:
            if v == "M":
                if size // 2 >= 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                else:
                    layers.append(nn.Identity())
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def build_vgg(name: str, *, num_classes: int, in_channels: int, input_size: int, width: float):
    cfg = [v if v == "M" else scaled(v, width) for v in VGG_CONFIGS[name]]
    return VGG(cfg, in_channels=in_channels, input_size=input_size, num_classes=num_classes), {}


for _name in VGG_CONFIGS:
    register_model(_name)(partial(build_vgg, _name))
