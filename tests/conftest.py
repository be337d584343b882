"""Shared fixtures: tiny models at small widths, so the default suite stays fast on 2 cores."""
import os

# Set before torch is imported, and read by the CLI's configure_threads: without it, a CLI run inside a test picks
# its threads from the machine's load, so two runs that must agree bit for bit could use different thread counts.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mipp.models import build_model

# Tiny models run fastest on one thread, and a second thread only contends with other work on a shared machine.
torch.set_num_threads(1)

# (name, build options) of the architectures every pruning test covers, at widths that keep tests fast.
SMALL_MODELS = {
    "mlp": dict(in_channels=1, input_size=28, hidden=(64, 32)),
    "lenet5": dict(in_channels=1, input_size=28),
    "vgg11": dict(in_channels=3, input_size=32, width=0.125),
    "resnet18": dict(in_channels=3, input_size=32, width=0.125),
    "resnet50": dict(in_channels=3, input_size=32, width=0.0625),
    "resnet56": dict(in_channels=3, input_size=32, width=0.25),
}


def small_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **SMALL_MODELS[name]).eval()


def inputs_for(model: torch.nn.Module, n: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """Gaussian inputs of the model's shape; with `rank`, they lie in a random rank-`rank` subspace (like images,
    real inputs are far from full rank, which is what makes units redundant)."""
    cfg = model.mipp_config
    shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, *shape, generator=generator)
    basis = torch.randn(rank, shape[0] * shape[1] * shape[2], generator=generator)
    return (torch.randn(n, rank, generator=generator) @ basis).reshape(n, *shape) / rank ** 0.5


@pytest.fixture(params=sorted(SMALL_MODELS))
def model_name(request):
    return request.param


def assert_same_training(a, b):
    """Two `mipp train` output folders hold bit-identical weights and the same history (timings aside); returns
    the second's (model, record)."""
    from mipp.checkpoint import load_model

    model_a, record_a = load_model(a / "model.pt")
    model_b, record_b = load_model(b / "model.pt")
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), name
    strip = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert strip(record_a["metrics"]["history"]) == strip(record_b["metrics"]["history"])
    return model_b, record_b


# A sweep small enough for a test: a small MLP on synthetic data, MIPP and random at two targets, two seeds, both
# regimes, fine-tuning 0 and 1 epoch (the harness's tests and the claims' tests run it).
TINY_SWEEP = dict(name="tiny", models=[{"name": "mlp", "hidden": [24, 12]}],
                  data=[{"name": "synthetic", "options": {"n": 240, "input_size": 8}}], methods=["mipp", "random"],
                  targets=[0.3, 0.6], seeds=[0, 1], regimes=["init", "trained"], finetune_epochs=[0, 1],
                  train={"epochs": 3, "batch_size": 32}, n_samples=200, train_eval_n=100, latency=False)
TINY_SWEEP_RUNS = 16
