"""Where pruning and training run: `device=` / `--device`. The CUDA tests run only where torch sees a GPU
(scripts/gpu-check.sh runs them); on a CPU-only machine the device plumbing is checked with "cpu" and "auto"."""
import contextlib

import pytest
import torch

import mipp
from mipp.data import ArrayDataset
from mipp.export import export_torchscript
from mipp.reconstruct import reconstruction_statistics
from mipp.train import TrainConfig, evaluate, fit

from conftest import inputs_for, small_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def plan_and_outputs(model, data, probe=None, **options):
    """(Plan, pruned model, its outputs on `probe` (default: 16 calibration inputs), on the CPU) of a prune to half
    of the MACs."""
    pruned, plan = mipp.prune(model, data, budget=0.5, metric="macs", n_samples=256, **options)
    probe = (data[0] if isinstance(data, tuple) else data)[:16] if probe is None else probe
    with torch.no_grad():
        return plan, pruned, pruned(probe.to(next(pruned.parameters()).device)).cpu()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_names_give_the_same_plan_as_the_models_own_device(device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto means cuda here: covered by the CUDA tests")
    model = small_model("vgg11")  # batch norm: recalibration runs too
    data = inputs_for(model, 256, seed=1)
    plan, _, outputs = plan_and_outputs(model, data, method="random")
    again, pruned, again_outputs = plan_and_outputs(model, data, method="random", device=device)
    assert again.kept == plan.kept and torch.equal(again_outputs, outputs)
    assert next(pruned.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_asking_for_cuda_without_one_names_the_fix():
    model = small_model("lenet5")
    with pytest.raises(ValueError, match="no CUDA device; use cpu or auto"):
        mipp.prune(model, inputs_for(model, 256), budget=0.5, device="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        mipp.select_plan(model, inputs_for(model, 256), budget=0.5, device="cuda")


# ---------------------------------------------------------------------------------------------------- CUDA


@contextlib.contextmanager
def full_precision():
    """TF32 off (cuDNN convolutions use it by default on Ampere and later), so the GPU computes what the CPU does to
    float32 rounding and the same units are chosen."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@cuda
@pytest.mark.parametrize("name,method", [("lenet5", "mipp"), ("vgg11", "mipp"), ("resnet18", "mipp"),
                                         ("vgg11", "tp-taylor"), ("vgg11", "thinet")])
def test_prune_on_cuda_chooses_what_the_cpu_chooses(name, method):
    """Capture (or gradients), selection, reconstruction and recalibration on the GPU give the CPU's Plan, and a
    pruned model (left on the GPU) whose outputs match the CPU's as closely as rounding allows.

    The GPU's convolutions round differently (about 1e-7 of each value), and the re-fit of readers amplifies such
    changes: least squares on correlated patch features moved the tiny VGG-11's outputs by 3e-4 of their scale when
    its calibration data moved by 1e-6, on the CPU alone. So the GPU is held to ten times what the same rounding-size
    change of the data does on the CPU (and without the re-fit, to float32 rounding of the outputs)."""
    model = small_model(name)
    images = inputs_for(model, 256, seed=1)
    labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(2))
    nudged = images * (1 + 1e-6 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3)))
    with full_precision():
        for refit in (False, True):
            cpu_plan, _, cpu_out = plan_and_outputs(model, (images, labels), method=method, reconstruct=refit)
            gpu_plan, pruned, gpu_out = plan_and_outputs(model, (images, labels), method=method, device="cuda",
                                                         reconstruct=refit)
            assert next(pruned.parameters()).is_cuda and next(model.parameters()).device.type == "cpu"
            assert gpu_plan.kept == cpu_plan.kept
            scale = float(cpu_out.abs().max())
            rounding = 1e-5 * scale
            if refit:
                nudged_plan, _, nudged_out = plan_and_outputs(model, (nudged, labels), images[:16], method=method)
                assert nudged_plan.kept == cpu_plan.kept
                rounding = max(rounding, float((nudged_out - cpu_out).abs().max()))
            assert float((gpu_out - cpu_out).abs().max()) <= 10 * rounding, (refit, rounding / scale)


@cuda
def test_select_plan_on_cuda_leaves_the_model_where_it_was():
    model = small_model("lenet5")
    plan = mipp.select_plan(model, inputs_for(model, 256), budget=0.5, n_samples=256, device="cuda")
    assert plan.units_kept < plan.units_total and next(model.parameters()).device.type == "cpu"


@cuda
def test_reconstruction_statistics_accumulate_in_float64_on_the_gpu():
    model = small_model("vgg11").cuda()
    data = inputs_for(model, 256, seed=1)
    plan = mipp.select_plan(model, data, method="random", budget=0.5, n_samples=256)
    statistics = reconstruction_statistics(model, plan, data, n_samples=256)
    assert statistics and all(s.gram.dtype == torch.float64 and s.gram.is_cuda for s in statistics.values())


@cuda
def test_training_runs_on_cuda_and_ends_there():
    torch.manual_seed(0)
    model = small_model("lenet5")
    images = inputs_for(model, 512, seed=3)
    labels = images.flatten(1)[:, :10].argmax(1)  # a learnable rule
    train = ArrayDataset(images, labels)
    result = fit(model, train, TrainConfig(epochs=2, batch_size=64, device="cuda", checkpoint_every=0),
                 progress=False)
    assert next(model.parameters()).is_cuda and len(result["history"]) == 2
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result["history"])
    assert 0 <= evaluate(model, train)["accuracy"] <= 1


@cuda
def test_a_cuda_model_exports_and_checks(tmp_path):
    model = small_model("resnet18").cuda()
    result = export_torchscript(model, inputs_for(model, 2).cuda(), tmp_path / "model.pt")
    assert result.max_difference <= result.tolerance
