"""A network with planted redundancy: the ground truth that a pruning method should recover (the paper's Fig. 4).

Hidden layer `planted` (linear, 12 units) reads a Gaussian input of 10 dimensions:
  informative units 0-4 and 9-10, each a distinct input direction;
  unit 5 an exact copy of unit 0; unit 6 = unit 1 + unit 2; unit 7 = 0.5 * unit 3 - unit 4 (linear relations);
  units 8 and 11 dead (always zero).
The next layer (16 ReLU units) reads every planted unit, and a linear head gives 4 outputs. A method that preserves
information removes the dead units and exactly one unit of each relation, and keeps units 9 and 10, whose
information no other unit has.

Registered as model "planted" (its weights are planted, so it is never trained, only pruned as given); its data are
Gaussian inputs labelled by the network itself (`planted_examples`). The network reads its input flattened to 10
features whatever its layout (the experiments feed (N, 1, 1, 10)), so pass example inputs explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .registry import check_int, register_model

INPUT_DIM = 10
OUTPUTS = 4
SPLIT_SIZES = {"train": 4000, "test": 1000}


@dataclass(frozen=True)
class PlantedTruth:
    group: str  # the group key of the planted layer
    dead: tuple[int, ...]
    relations: tuple[tuple[int, ...], ...]  # each relation: remove exactly one of these units
    unique: tuple[int, ...]  # carry information no other unit has: must be kept

    def recovery(self, kept: dict) -> dict:
        """How much of the truth a plan's kept units recovered: dead units removed, one unit per relation, unique
        units kept."""
        alive = set(kept[self.group])
        dead = sum(u not in alive for u in self.dead)
        relations = sum(sum(u not in alive for u in relation) == 1 for relation in self.relations)
        unique = sum(u in alive for u in self.unique)
        exact = (dead, relations, unique) == (len(self.dead), len(self.relations), len(self.unique))
        return {"dead_removed": dead, "relations_resolved": relations, "unique_kept": unique, "exact": exact}


TRUTH = PlantedTruth(group="planted", dead=(8, 11), relations=((0, 5), (1, 2, 6), (3, 4, 7)), unique=(9, 10))


class PlantedNet(nn.Module):
    def __init__(self, hidden: int = 16, outputs: int = OUTPUTS):
        super().__init__()
        self.planted = nn.Linear(INPUT_DIM, 12)
        self.hidden = nn.Linear(12, hidden)
        self.relu = nn.ReLU()
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.head(self.relu(self.hidden(self.planted(x.flatten(1)))))


def planted_network(seed: int = 0) -> PlantedNet:
    """The network with its planted weights; the ReLU layer and the head are random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    model = PlantedNet()
    with torch.no_grad():
        for layer in (model.hidden, model.head):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
        w = torch.zeros(12, INPUT_DIM)
        for unit, direction in zip((0, 1, 2, 3, 4, 9, 10), range(7)):
            w[unit, direction] = 1.0 + 0.25 * unit / 12  # distinct scales, so ties cannot hide an error
        w[5] = w[0]
        w[6] = w[1] + w[2]
        w[7] = 0.5 * w[3] - w[4]
        model.planted.weight.copy_(w)
        model.planted.bias.zero_()
    model.mipp_config = None  # built outside the registry: pass example inputs explicitly
    return model.eval()


def planted_inputs(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Gaussian inputs; directions 7-9 are read by nobody (they only add nothing)."""
    return torch.randn(n, INPUT_DIM, generator=torch.Generator().manual_seed(seed))


def planted_examples(seed: int, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(inputs (n, 1, 1, 10), labels, class names): Gaussian inputs labelled by the planted network of `seed` (its
    argmax), so accuracy is agreement with that network; each split has inputs of its own, the same for every seed."""
    n = n or SPLIT_SIZES[split]
    inputs = planted_inputs(n, seed=1000 + {"train": 0, "test": 1}[split])
    with torch.no_grad():
        labels = planted_network(seed)(inputs).argmax(1)
    return inputs[:, None, None, :], labels, tuple(f"output_{i}" for i in range(OUTPUTS))


@register_model("planted", extras={"seed": 0}, planted=TRUTH, data=planted_examples)
def build_planted(*, num_classes: int, in_channels: int, input_size: int, width: float, seed: int):
    """The planted network of `seed`; its shape is fixed (10 inputs, 4 outputs, width 1)."""
    if num_classes != OUTPUTS or width != 1.0:
        raise ValueError(f"the planted network has a fixed shape: num_classes must be {OUTPUTS} and width 1.0; "
                         f"got num_classes={num_classes}, width={width}")
    seed = check_int("seed", seed, 0)
    return planted_network(seed), {"seed": seed}
