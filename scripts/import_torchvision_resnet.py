"""Turn torchvision's pretrained ResNet-18/34/50 weights into a mipp model file (OUT/model.pt) that `mipp prune`,
`mipp eval` and `mipp train`'s output folders take, so the ImageNet recipe starts from a trained network.

    python scripts/import_torchvision_resnet.py --model resnet50 --out runs/r50-imagenet/model.pt
    python scripts/import_torchvision_resnet.py --model resnet50 --weights resnet50.pth --out runs/r50/model.pt

Without --weights it asks torchvision for its default ImageNet weights (needs torchvision and, the first time, a
download); --weights reads a state dict saved from a torchvision ResNet (torch.save(model.state_dict(), ...)).
mipp's ResNets have torchvision's layout ("ResNet v1.5": the stride on the 3x3 convolution) with one name changed:
a block's projection shortcut is `shortcut`, torchvision's `downsample`. The classes are ImageNet's 1,000 in
torchvision's order, which is the sorted order of the ImageNet folder names (n01440764, ...) that mipp's image
folder reader uses.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from mipp.checkpoint import save_model
from mipp.models import build_model

MODELS = ("resnet18", "resnet34", "resnet50")


def mipp_state_dict(torchvision_state: dict) -> dict:
    """torchvision ResNet parameter names -> mipp's (``layerX.Y.downsample.k`` -> ``layerX.Y.shortcut.k``)."""
    return {re.sub(r"\.downsample\.", ".shortcut.", name): tensor for name, tensor in torchvision_state.items()}


def import_resnet(name: str, torchvision_state: dict, *, input_size: int = 224) -> torch.nn.Module:
    """A mipp ResNet (ImageNet stem) holding the given torchvision weights; the class count comes from ``fc``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    state = mipp_state_dict(torchvision_state)
    fc = state.get("fc.weight")
    if fc is None:
        raise ValueError("the weights have no 'fc.weight': pass the state dict of a torchvision ResNet")
    width = state["conv1.weight"].shape[0] / 64
    model = build_model(name, num_classes=fc.shape[0], in_channels=state["conv1.weight"].shape[1],
                        input_size=input_size, width=width, stem="imagenet")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        problem = f"missing {missing[:4]}, unexpected {unexpected[:4]}" if missing or unexpected else None
    except RuntimeError as err:  # shapes that differ
        problem = str(err).splitlines()[-1].strip()
    if problem:
        raise ValueError(f"the weights do not fit mipp's {name} ({problem}); pass the state dict of a torchvision "
                         f"{name}")
    return model.eval()


def torchvision_weights(name: str) -> dict:
    try:
        import torchvision
    except ImportError as err:
        raise SystemExit("torchvision is not installed: pip install torchvision, or pass --weights FILE") from err
    return torchvision.models.get_model(name, weights="DEFAULT").state_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet50")
    parser.add_argument("--weights", default=None, help="a torchvision ResNet's state dict (.pth); default: "
                                                        "torchvision's pretrained ImageNet weights")
    parser.add_argument("--input-size", type=int, default=224, help="input size recorded in the model (default 224)")
    parser.add_argument("--out", required=True, help="mipp model file to write, e.g. runs/r50-imagenet/model.pt")
    args = parser.parse_args(argv)
    state = (torch.load(args.weights, map_location="cpu", weights_only=True) if args.weights
             else torchvision_weights(args.model))
    model = import_resnet(args.model, state, input_size=args.input_size)
    save_model(Path(args.out), model, extra={"source": args.weights or f"torchvision {args.model} DEFAULT weights"})
    print(f"wrote {args.out}: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
