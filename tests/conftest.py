"""Shared fixtures: tiny models at small widths, so the default suite stays fast on 2 cores."""
import pytest
import torch

from mipp.models import build_model

# (name, build options) of the architectures every pruning test covers, at widths that keep tests fast.
SMALL_MODELS = {
    "mlp": dict(in_channels=1, input_size=28, hidden=(64, 32)),
    "lenet5": dict(in_channels=1, input_size=28),
    "vgg11": dict(in_channels=3, input_size=32, width=0.125),
    "resnet18": dict(in_channels=3, input_size=32, width=0.125),
    "resnet50": dict(in_channels=3, input_size=32, width=0.125),
    "resnet56": dict(in_channels=3, input_size=32, width=0.25),
}


def small_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **SMALL_MODELS[name]).eval()


def inputs_for(model: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    cfg = model.mipp_config
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=generator)


@pytest.fixture(params=sorted(SMALL_MODELS))
def model_name(request):
    return request.param
