"""LeNet-5 convolutional network."""
from typing import Sequence

import torch
from torch import nn

from .registry import register_model, scaled

#: Smallest input side for which both 5x5 convolutions and 2x2 max-pools leave a map of at least 1x1.
LENET_MIN_INPUT_SIZE = 12


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) in its common modern form: ReLU and max-pooling.

    conv5x5(6) - ReLU - maxpool2 - conv5x5(16) - ReLU - maxpool2 - flatten - fc120 - ReLU - fc84 - ReLU - fc.
    Inputs smaller than 32 (MNIST's 28x28) get padding 2 on the first convolution, so maps go
    28 -> 28 -> 14 -> 10 -> 5 exactly as for the original 32x32 input; the flattened size is
    measured with a dummy forward, so any input_size >= 12 works.
    ``widths`` holds the actual (conv1, conv2, fc1, fc2) widths, already scaled by the builder.
    """

    def __init__(self, *, in_channels: int, input_size: int, num_classes: int,
                 widths: Sequence[int] = (6, 16, 120, 84)):
        super().__init__()
        c1, c2, f1, f2 = widths
        pad = 2 if input_size < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        with torch.no_grad():
            n_flat = self.flatten(self.features(torch.zeros(1, in_channels, input_size, input_size))).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(n_flat, f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@register_model("lenet5", min_input_size=LENET_MIN_INPUT_SIZE)
def build_lenet5(*, num_classes: int, in_channels: int, input_size: int, width: float):
    model = LeNet5(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                   widths=[scaled(c, width) for c in (6, 16, 120, 84)])
    return model, {}
