"""Model zoo: every network mipp prunes, built by name from a registry (see registry.py).

``build_model(name, num_classes=10, in_channels=3, input_size=32, width=1.0, **extra)`` returns a
plain ``nn.Module`` whose ``mipp_config`` attribute (a JSON-able dict) rebuilds the same
architecture with ``build_model(**model.mipp_config)``. ``mipp_config`` describes the model as
built; it is not updated when the model is later pruned.

Width multiplier: every hidden width c becomes ``max(1, round(c * width))`` (Python's round);
the output layer (num_classes) is never scaled. At width 1 the parameter counts are the standard
ones (e.g. LeNet-5 61,706; ResNet-50 25,557,032).

Conventions kept by every model (pruning and activation capture rely on them): each nonlinearity
is its own ``nn.ReLU()`` module used once per forward, residual adds are out of place, flattening is
an ``nn.Flatten`` module, and the last ``nn.Linear`` in ``model.modules()`` is the classifier.

MODEL_NAMES are the architectures built for any input shape and width; the registry also holds
"planted", the network with planted redundancy (planted.py), whose shape and weights are fixed.
"""
# Importing a module registers its builders; the order of registration is the order of MODEL_NAMES.
from .mlp import MLP
from .lenet import LeNet5
from .vgg import VGG
from .resnet import BasicBlock, Bottleneck, ResNet
from .planted import PlantedNet
from .registry import ModelEntry, build_model, model_entry, model_names, register_model

__all__ = ["MODEL_NAMES", "build_model", "model_entry", "model_names", "register_model", "ModelEntry", "MLP",
           "LeNet5", "VGG", "ResNet", "BasicBlock", "Bottleneck", "PlantedNet"]

MODEL_NAMES = tuple(name for name in model_names() if model_entry(name).planted is None)
