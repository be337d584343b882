"""Fully connected network (multilayer perceptron)."""
from typing import Sequence

from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear-ReLU hidden layers, then a Linear classifier.

    With hidden=(300, 100) on 28x28 inputs this is LeNet-300-100 (LeCun et al. 1998),
    the usual fully connected baseline in the pruning literature (e.g. Han et al. 2015).
    ``hidden`` holds the actual widths (already scaled by the builder).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        layers = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.flatten(x)))
