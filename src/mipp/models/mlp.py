"""Fully connected network (multilayer perceptron)."""
from typing import Sequence

from torch import nn

from .registry import check_int, register_model, scaled


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


def check_hidden(hidden) -> list:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (list, tuple)):
        raise ValueError(f"hidden must be a list or tuple of positive integers, e.g. (300, 100); got {hidden!r}")
    return [check_int("each entry of hidden", h, 1) for h in hidden]


@register_model("mlp", extras={"hidden": (300, 100)})
def build_mlp(*, num_classes: int, in_channels: int, input_size: int, width: float, hidden):
    hidden = check_hidden(hidden)
    model = MLP(in_channels * input_size * input_size, [scaled(h, width) for h in hidden], num_classes)
    return model, {"hidden": hidden}
