"""Export to TorchScript and ONNX: pruned LeNet-5, VGG-11 and ResNet-18 reproduce their PyTorch outputs within 1e-4,
checked here again on fresh inputs of another batch size, independently of the export's own check."""
import json
import sys

import pytest
import torch
from torch import nn

import mipp
from mipp.checkpoint import load_model, save_model
from mipp.cli import main
from mipp.export import ExportError, export_onnx, export_torchscript

from conftest import inputs_for, small_model

EXPORTED_MODELS = ["lenet5", "vgg11", "resnet18"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=EXPORTED_MODELS)
def pruned(request):
    """(original, pruned) at half of the MACs removed; random selection keeps the fixture quick, and the repair
    (re-fit, batch-norm recalibration) runs as it does for every method."""
    model = small_model(request.param)
    data = inputs_for(model, 256, seed=1)
    smaller, plan = mipp.prune(model, data, method="random", budget=0.5, metric="macs", n_samples=256)
    assert plan.stats["macs_removed"] >= 0.45
    return model, smaller.eval()


def fresh_inputs(model, n=5):
    return inputs_for(model, n, seed=7)


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((got - expected).abs().max()) <= TOLERANCE * max(1.0, float(expected.abs().max()))


def test_torchscript_export_reproduces_the_pruned_model(pruned, tmp_path):
    original, model = pruned
    result = export_torchscript(model, inputs_for(model, 2), tmp_path / "model.pt")
    assert result.max_difference <= result.tolerance and result.checked_batch_sizes == [2, 1]
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    x = fresh_inputs(model)
    with torch.no_grad():
        assert close(loaded(x), model(x))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in original.parameters())


def test_onnx_export_reproduces_the_pruned_model(pruned, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, model = pruned
    result = export_onnx(model, inputs_for(model, 2), tmp_path / "model.onnx", exporter="torchscript")
    assert result.max_difference <= result.tolerance and result.opset == 18
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = fresh_inputs(model)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert close(got, model(x))


@pytest.mark.parametrize("name", ["lenet5", pytest.param("vgg11", marks=pytest.mark.slow),
                                  pytest.param("resnet18", marks=pytest.mark.slow)])
def test_onnx_dynamo_exporter_reproduces_the_pruned_model(name, tmp_path):
    """PyTorch's default ONNX exporter (torch.export-based) takes seconds per model: one model by default."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = small_model(name)
    smaller, _ = mipp.prune(model, inputs_for(model, 256, seed=1), method="random", budget=0.5, metric="macs",
                            n_samples=256)
    result = export_onnx(smaller, inputs_for(model, 2), tmp_path / "model.onnx", exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_difference <= result.tolerance


def test_export_leaves_the_models_modes_alone(tmp_path):
    model = small_model("lenet5").train()
    export_torchscript(model, inputs_for(model, 2), tmp_path / "model.pt")
    assert all(m.training for m in model.modules())


def test_torchscript_can_script_instead_of_trace(tmp_path):
    model = small_model("lenet5")
    result = export_torchscript(model, inputs_for(model, 2), tmp_path / "model.pt", method="script")
    assert result.exporter == "script" and result.max_difference <= result.tolerance


class BatchSizeScaled(nn.Module):
    """Multiplies by the batch size as a Python number: tracing freezes it, so the export is wrong at other sizes."""

    def forward(self, x):
        return x * float(len(x))


def test_an_export_that_differs_is_refused_and_not_written(tmp_path):
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(ExportError, match="differs from the PyTorch model"):
        export_torchscript(BatchSizeScaled(), torch.ones(3, 4), tmp_path / "wrong.pt")
    assert list(tmp_path.iterdir()) == [], "neither the file nor its staging folder is left"


def test_missing_onnxruntime_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    model = small_model("lenet5")
    with pytest.raises(ExportError, match=r"onnxruntime.*pip install 'mipp\[export\]'"):
        export_onnx(model, inputs_for(model, 2), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_bad_arguments_are_named(tmp_path):
    model = small_model("lenet5")
    with pytest.raises(ExportError, match="example_input"):
        export_torchscript(model, torch.zeros(0, 1, 28, 28), tmp_path / "m.pt")
    with pytest.raises(ExportError, match="unknown ONNX exporter"):
        export_onnx(model, inputs_for(model, 2), tmp_path / "m.onnx", exporter="tflite")


# ------------------------------------------------------------------------------------------------- mipp export


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """What `mipp train` and `mipp prune` leave: an original model file, and a pruned one with its Plan."""
    folder = tmp_path_factory.mktemp("saved")
    model = small_model("lenet5")
    pruned, plan = mipp.prune(model, inputs_for(model, 256, seed=1), method="random", budget=0.5, n_samples=256)
    save_model(folder / "original" / "model.pt", model)
    save_model(folder / "pruned" / "model.pt", pruned, plan=plan)
    plan.save(folder / "pruned" / "plan.json")
    return folder


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_exports_a_pruned_checkpoint_to_both_formats(capsys, saved, tmp_path):
    pytest.importorskip("onnxruntime")
    result = run_json(capsys, ["export", "--checkpoint", str(saved / "pruned" / "model.pt"), "--out", str(tmp_path),
                               "--exporter", "torchscript"])
    assert result["plan_source"] == "checkpoint"
    assert sorted(e["format"] for e in result["exports"]) == ["onnx", "torchscript"]
    assert (tmp_path / "model.torchscript.pt").is_file() and (tmp_path / "model.onnx").is_file()
    model, _ = load_model(saved / "pruned" / "model.pt")
    x = fresh_inputs(model)
    with torch.no_grad():
        assert close(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(x), model(x))


def test_cli_applies_a_plan_to_an_original_checkpoint(capsys, saved, tmp_path):
    result = run_json(capsys, ["export", "--checkpoint", str(saved / "original" / "model.pt"),
                               "--plan", str(saved / "pruned" / "plan.json"), "--format", "torchscript",
                               "--out", str(tmp_path), "--name", "sliced"])
    pruned, _ = load_model(saved / "pruned" / "model.pt")
    assert result["plan_source"] == "file" and result["params"] == sum(p.numel() for p in pruned.parameters())
    assert [e["path"] for e in result["exports"]] == [str(tmp_path / "sliced.torchscript.pt")]


def test_cli_refuses_a_plan_that_is_not_the_checkpoints(capsys, saved, tmp_path):
    model = small_model("lenet5")
    _, other = mipp.prune(model, inputs_for(model, 256, seed=1), method="random", budget=0.3, n_samples=256)
    other.save(tmp_path / "other.json")
    code = main(["export", "--checkpoint", str(saved / "pruned" / "model.pt"), "--plan", str(tmp_path / "other.json"),
                 "--format", "torchscript", "--out", str(tmp_path)])
    assert code == 2 and "already pruned by another Plan" in capsys.readouterr().err
    assert not (tmp_path / "model.torchscript.pt").exists()
