"""The record of one run, shared by the runner (writes it), the store (keeps it) and the report (reads it).

Its JSON is the run-record format "mipp-run/1": the header (format .. versions) is always written, each later field
only once the run has it (a skipped run has no results; a run still in progress has no `finished_at`), always in
the order of the fields below, so a record loads and re-serialises to the same text.  Nested values (the plan,
accuracies per budget, timings, ...) stay plain JSON dicts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

RECORD_FORMAT = "mipp-run/1"
# key in `pruned` of the accuracies right after pruning without reconstruction (recorded when a sweep reconstructs)
WITHOUT_RECONSTRUCTION = "without_reconstruction"
HEADER = ("format", "run_id", "status", "reason", "model", "data", "method", "method_name", "regime", "target",
          "metric", "seed", "config", "versions")


@dataclass
class RunRecord:
    format: str = RECORD_FORMAT
    run_id: Optional[str] = None
    status: Optional[str] = None  # partial | done | skipped | failed
    reason: Optional[str] = None  # why skipped or failed
    model: Optional[str] = None  # labels: model (with its width), data (with "+deform"), method
    data: Optional[str] = None
    method: Optional[str] = None
    method_name: Optional[str] = None  # the registered method the label runs
    regime: Optional[str] = None
    target: Optional[float] = None  # a matched run's: the fraction it was given (what the run it matches removed)
    metric: Optional[str] = None
    seed: Optional[int] = None
    config: Optional[dict] = None  # the run's identity (RunSpec.identity)
    versions: Optional[dict] = None
    matched: Optional[dict] = None  # a run at another run's sparsity: {"label", "run_id"} of that run
    traceback: Optional[str] = None  # of a failed run
    base: Optional[dict] = None  # the unpruned model: test_accuracy, params, macs, dir
    plan: Optional[dict] = None  # Plan.to_dict() without decisions, stats and versions
    layers: Optional[list] = None  # group keys from the input to the output
    units_kept: Optional[dict] = None
    kept_fraction: Optional[dict] = None
    removed: Optional[dict] = None  # fractions of units, params, macs removed (the plan's own count)
    measured: Optional[dict] = None  # params and macs of the pruned model
    selection: Optional[dict] = None  # seconds, peak memory, the method's stats
    pruned: Optional[dict] = None  # accuracies right after pruning
    finetune: Optional[dict] = None  # budget (str, epochs) -> accuracies after it
    timings: Optional[dict] = None
    latency_ms: Optional[dict] = None  # batch size (str) -> ms, pruned and unpruned
    base_latency_ms: Optional[dict] = None
    planted: Optional[dict] = None  # recovery of the planted truth (planted networks only)
    collapse: Optional[dict] = None
    finished_at: Optional[str] = None

    def __post_init__(self):
        if self.format != RECORD_FORMAT:
            raise ValueError(f"run record format {self.format!r} is not {RECORD_FORMAT!r}")
        if self.run_id is None or self.status is None:
            raise ValueError("a run record needs a run_id and a status")

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown run record field(s) {unknown}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in HEADER or getattr(self, f.name) is not None}

    def accuracy(self, stage: str, key: str = "test_accuracy") -> float:
        """Accuracy at `stage` ("pruned", "norec": right after pruning without reconstruction, or "ft<b>" after b
        epochs), NaN where the run has no such stage."""
        if stage == "norec":
            entry = (self.pruned or {}).get(WITHOUT_RECONSTRUCTION)
        else:
            entry = self.pruned if stage == "pruned" else self.finetune.get(stage[2:])
        return math.nan if entry is None else entry[key]

    def budgets(self) -> list[int]:
        """The fine-tuning budgets (> 0 epochs) recorded, in increasing order."""
        return sorted(int(b) for b in self.finetune if int(b) > 0)
