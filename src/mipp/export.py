"""Export a (pruned) model to TorchScript or ONNX, and check that the written file computes what the model does.

A pruned model is deployed like any other PyTorch model; the one thing worth guarding is that the exported file
reproduces the PyTorch model.  Each export therefore reloads what it wrote (TorchScript with ``torch.jit.load``, ONNX
with onnxruntime), runs it on the example batch and on a batch of one (which also proves the batch axis is
dynamic), and compares with the model's own outputs:

    max |exported - pytorch| <= tolerance * max(1, max |pytorch|)        (tolerance 1e-4 by default)

A file that fails the check is not left behind: it is written in a temporary folder next to the target and moved
into place only once it passed, so ``path`` holds either a checked export or whatever it held before.

ONNX needs the optional extra ``pip install mipp[export]`` (onnx, onnxruntime, onnxscript).  Two exporters exist
in PyTorch: the torch.export-based one ("dynamo", PyTorch's default since 2.9; needs onnxscript) and the older
TorchScript-based one ("torchscript", deprecated by PyTorch but fast and available on every torch mipp supports).
``exporter="auto"`` takes the first when it is installed, else the second; the result says which ran.
TorchScript itself (``torch.jit``) is deprecated by recent torch (2.13 warns) in favour of ``torch.export``, but is the
format many serving stacks load, so it is written here; its DeprecationWarnings are left visible.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

TOLERANCE = 1e-4
ONNX_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_METHODS = ("trace", "script")
INSTALL_HINT = "install the export extra: pip install 'mipp[export]' (onnx, onnxruntime, onnxscript)"


class ExportError(ValueError):
    """The model could not be exported, or the exported file does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    """What an export wrote and how closely the reloaded file matched the model."""

    path: str
    format: str  # "torchscript" | "onnx"
    exporter: str  # torchscript: "trace" | "script"; onnx: "dynamo" | "torchscript"
    max_difference: float  # largest |exported - pytorch| over the checked batches
    tolerance: float  # the bound it was held to (already scaled by max(1, max |pytorch|))
    checked_batch_sizes: list[int]
    opset: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                       method: str = "trace", tolerance: float = TOLERANCE) -> ExportResult:
    """Write `model` as TorchScript to `path` (``torch.jit.trace`` on `example_input`, or ``torch.jit.script``),
    reload it and check its outputs against the model's; raises ExportError if they differ by more than
    `tolerance`. The model is exported in eval mode (its modes are restored afterwards)."""
    if method not in TORCHSCRIPT_METHODS:
        raise ExportError(f"unknown TorchScript method {method!r}; choose one of {TORCHSCRIPT_METHODS}")
    example_input = _check_example(example_input)
    path = Path(path)
    with _eval_mode(model), torch.no_grad():
        try:
            compiled = torch.jit.trace(model, example_input) if method == "trace" else torch.jit.script(model)
        except Exception as exc:  # tracing / scripting raise many types for unsupported code
            raise ExportError(f"torch.jit.{method} could not compile the model ({type(exc).__name__}: "
                              f"{_first_line(exc)}); try method={'script' if method == 'trace' else 'trace'!r}") from exc
        with _staged(path) as staged:
            torch.jit.save(compiled, str(staged))
            loaded = torch.jit.load(str(staged), map_location=example_input.device)
            batches = _check_batches(example_input)
            difference, bound = _compare(model, lambda x: loaded(x), batches, tolerance)
            _raise_if_off("TorchScript", path, difference, bound, hint="export with method='script' or check "
                          "for data-dependent control flow, which tracing freezes")
    return ExportResult(str(path), "torchscript", method, difference, bound, [len(b) for b in batches])


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                exporter: str = "auto", tolerance: float = TOLERANCE) -> ExportResult:
    """Write `model` as ONNX (one self-contained file, dynamic batch axis) to `path`, run it with onnxruntime and
    check its outputs against the model's; raises ExportError if onnxruntime is missing or the outputs differ by
    more than `tolerance`. `exporter`: "auto", "dynamo" (torch.export-based) or "torchscript" (legacy)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
    example_input = _check_example(example_input)
    runtime = _import_onnxruntime()
    chosen = _choose_exporter(exporter)
    path = Path(path)
    with _eval_mode(model), torch.no_grad():
        with _staged(path) as staged:
            try:
                _write_onnx(model, example_input, staged, opset, chosen)
            except ExportError:
                raise
            except Exception as exc:  # the exporters raise many types for unsupported operators
                raise ExportError(f"torch.onnx.export ({chosen} exporter, opset {opset}) failed "
                                  f"({type(exc).__name__}: {_first_line(exc)}); try another opset or "
                                  f"exporter={'torchscript' if chosen == 'dynamo' else 'dynamo'!r}") from exc
            session = runtime.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])

            batches = _check_batches(example_input)
            difference, bound = _compare(model, run, batches, tolerance)
            _raise_if_off("ONNX", path, difference, bound, hint="try another opset or exporter")
    return ExportResult(str(path), "onnx", chosen, difference, bound, [len(b) for b in batches], opset)


def onnx_available() -> bool:
    """Whether ONNX export can run and be checked here (onnxruntime importable)."""
    try:
        _import_onnxruntime()
    except ExportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ helpers


def _check_example(example_input) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or len(example_input) == 0:
        raise ExportError("example_input must be a non-empty batch tensor, e.g. torch.randn(2, C, H, W); its first "
                          "dimension is the batch")
    return example_input


def _check_batches(example_input: torch.Tensor) -> list[torch.Tensor]:
    """The example batch and, when it holds more than one sample, a batch of one (another size, the deployment
    case): a file that only works for the traced batch size fails here."""
    return [example_input] + ([example_input[:1]] if len(example_input) > 1 else [])


def _compare(model: nn.Module, exported, batches: list[torch.Tensor], tolerance: float) -> tuple[float, float]:
    """Largest |exported - model| over `batches`, and the bound it must stay within."""
    difference, scale = 0.0, 1.0
    for batch in batches:
        expected = model(batch).detach().float().cpu()
        got = exported(batch)
        got = (got[0] if isinstance(got, (tuple, list)) else got).detach().float().cpu()
        if got.shape != expected.shape:
            raise ExportError(f"the exported model returns shape {tuple(got.shape)} for a batch of {len(batch)}, "
                              f"the PyTorch model {tuple(expected.shape)}; the batch axis was not exported as "
                              "dynamic")
        difference = max(difference, float((got - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    return difference, tolerance * scale


def _raise_if_off(what: str, path: Path, difference: float, bound: float, hint: str) -> None:
    if not difference <= bound:  # also catches NaN
        raise ExportError(f"the {what} export of {path.name} differs from the PyTorch model by {difference:.3g} "
                          f"(allowed {bound:.3g}); nothing was written. {hint}")


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export the inference graph (batch-norm running statistics, no dropout); restore every module's mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A file name in a temporary folder next to `path`; moved over `path` only if the body finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        staged = Path(folder) / path.name
        yield staged
        os.replace(staged, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnxruntime to check the exported model, and it is not installed; "
                          f"{INSTALL_HINT}") from exc
    return onnxruntime


def _has_dynamo_exporter() -> bool:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return False
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter translates through it)
    except ImportError:
        return False
    return True


def _choose_exporter(exporter: str) -> str:
    if exporter == "auto":
        return "dynamo" if _has_dynamo_exporter() else "torchscript"
    if exporter == "dynamo" and not _has_dynamo_exporter():
        raise ExportError(f"the dynamo ONNX exporter needs torch >= 2.5 and onnxscript (torch {torch.__version__}); "
                          f"{INSTALL_HINT}, or pass exporter='torchscript'")
    return exporter


def _write_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    if exporter == "dynamo":
        if len(example_input) == 1:  # torch.export fixes an axis of size 1 to 1; a batch of 2 keeps it dynamic
            example_input = example_input.expand(2, *example_input.shape[1:])
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (example_input,), str(path), dynamo=True, opset_version=opset,
                          input_names=["input"], output_names=["output"], dynamic_shapes=({0: batch},),
                          external_data=False, verbose=False)
        return
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(model, (example_input,), str(path), opset_version=opset, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      **legacy)
