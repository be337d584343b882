"""Model files and checkpoint records: saved atomically, read back with a check of their format.

A model file is a plain dict of tensors and JSON-able values (``format: mipp-model/1``): the architecture is rebuilt
from ``model_config`` with :func:`mipp.models.build_model`, a pruning ``plan`` (if any) shrinks it, and only then the
state dict is loaded.  Nothing is pickled as a class, so files load with ``torch.load(weights_only=True)``.
Writes go through :mod:`mipp.io`; the training loop (:mod:`mipp.train`) reads its resumable checkpoints with
:func:`read_record`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mipp.io import atomic_torch_save, versions
from mipp.models import build_model
from mipp.plan import Plan
from mipp.surgery import apply_plan

MODEL_FORMAT = "mipp-model/1"
TRAIN_STATE_FORMAT = "mipp-train/1"

_HINTS = {
    MODEL_FORMAT: "pass the model file that `mipp train` writes (OUT/model.pt)",
    TRAIN_STATE_FORMAT: "delete it, or start over with a new output folder or --no-resume",
}
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, of another format, or from another run."""


def read_record(path: str | os.PathLike, expected_format: str, *, map_location: Any = "cpu") -> dict:
    """Load a dict written by this module and check its ``format``; errors name the file and the fix."""
    path = Path(path)
    hint = _HINTS.get(expected_format, "")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}; {hint}")
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable mipp checkpoint ({_reason(exc)}); {hint}") from exc
    found = record.get("format") if isinstance(record, dict) else None
    if found != expected_format:
        raise CheckpointError(f"{path} has format {found!r}, expected {expected_format!r}; {hint}")
    return record


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {detail[:200]}"


def _json_data(value: Any, what: str) -> Any:
    """A plain-JSON copy of ``value`` (tuples become lists), so the file loads with weights_only=True."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_model: {what} must be JSON-able ({exc})") from exc


def save_model(path: str | os.PathLike, model: torch.nn.Module, *, metrics: dict | None = None,
               plan: Any = None, extra: dict | None = None) -> Path:
    """Write ``model`` (architecture config, pruned-or-not weights, optional Plan and metrics) atomically to ``path``.

    ``plan`` is a :class:`mipp.plan.Plan` or its ``to_dict()``; it is stored as JSON-able data so that
    :func:`load_model` can rebuild the pruned shapes from the original architecture.
    """
    config = getattr(model, "mipp_config", None)
    if not isinstance(config, dict):
        raise ValueError("save_model needs a model built by mipp.models.build_model (it has no `mipp_config`)")
    if plan is not None and hasattr(plan, "to_dict"):
        plan = plan.to_dict()
    record = {
        "format": MODEL_FORMAT,
        "model_config": _json_data(config, "model.mipp_config"),
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        "plan": _json_data(plan, "plan"),
        "metrics": _json_data(metrics, "metrics"),
        "extra": _json_data(extra, "extra"),
        "versions": versions(),
    }
    atomic_torch_save(path, record)
    return Path(path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns ``(model, record)`` with the model in eval mode."""
    record = read_record(path, MODEL_FORMAT)
    model = build_model(**record["model_config"])
    if record.get("plan") is not None:
        apply_plan(model, Plan.from_dict(record["plan"]))
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {path} do not fit the model they describe "
                              f"({str(exc).splitlines()[0]}); re-save it with mipp's save_model") from exc
    return model.to(device).eval(), record
