"""The result store of a sweep: one JSON file per run, shared base models, and the log of the sweeps run into it.

    OUT/runs/<run id>.json         one run's record, written atomically after each stage (pruning, each budget)
    OUT/base/<model-data-seed-h>/  a trained base model shared by every run that prunes it (model.pt, base.json),
                                   with the training checkpoint it resumes from (train-state.pt)
    OUT/work/<run id>-ft<b>.pt     the checkpoint of a fine-tuning in progress (removed when it is recorded)
    OUT/work/claims/<run id>.lock  the lock a process holds while it runs the run (mipp.experiments.claims), and
    OUT/base/<...>/training.lock   the one it holds while it trains that base model
    OUT/configs/<name>-<hash>.json the resolved config of each sweep, and OUT/sweeps.jsonl the commands

Nothing is ever deleted or overwritten with less: a killed sweep loses at most the stage it was in, and rerunning
the same command skips every finished run.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mipp.checkpoint import load_model, save_model
from mipp.experiments.claims import Busy, claim
from mipp.experiments.config import RunSpec, SweepConfig
from mipp.io import atomic_write_json, stable_hash
from mipp.experiments.record import RECORD_FORMAT, RunRecord

__all__ = ["RECORD_FORMAT", "ResultStore", "is_finished", "stable_view"]
log = logging.getLogger(__name__)
# Fields that measure the machine, not the method: they differ between two runs of the same config.
VOLATILE = ("timings", "selection", "latency_ms", "finished_at", "versions", "base_latency_ms")


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    # ------------------------------------------------------------------------------------------------ runs

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def get(self, run_id: str) -> RunRecord | None:
        data = self._read(self.path(run_id))
        return None if data is None else self._record(data, self.path(run_id))

    def put(self, record: RunRecord) -> None:
        atomic_write_json(self.path(record.run_id), record.to_dict())

    def records(self) -> list[RunRecord]:
        """Every run record of this store's format (files of another format are left out)."""
        out = []
        for path in sorted(self.runs_dir.glob("*.json")):
            data = self._read(path)
            if data is not None and data.get("format") == RECORD_FORMAT:
                out.append(self._record(data, path))
        return out

    @staticmethod
    def _read(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # cannot happen with atomic writes, unless edited by hand
            log.warning("ignoring unreadable run record %s (it will be recomputed)", path)
            return None

    @staticmethod
    def _record(data: dict, path: Path) -> RunRecord:
        try:
            return RunRecord.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a run record of {RECORD_FORMAT} ({err}): move it out of the store"
                             ) from err

    def work_path(self, run_id: str, epochs: int) -> Path:
        return self.root / "work" / f"{run_id}-ft{epochs}.pt"

    def claim_path(self, run_id: str) -> Path:
        return self.root / "work" / "claims" / f"{run_id}.lock"

    # ----------------------------------------------------------------------------------------- base models

    def base_dir(self, run: RunSpec) -> Path:
        identity = run.base_identity()
        name = f"{run.labels['model']}-{run.labels['data']}-s{run.seed}-{stable_hash(identity)[:10]}"
        return self.root / "base" / name.replace("/", "_")

    def base_model(self, run: RunSpec, build, train_set, test_set, train_config, *, progress: bool = True):
        """The trained base model of `run` (model, metrics): loaded if finished, else trained (resuming) under the
        base's lock; raises `Busy` while another process trains it."""
        folder = self.base_dir(run)
        if not (folder / "model.pt").exists():
            with claim(folder / "training.lock") as mine:
                if not mine:
                    raise Busy(f"base model {folder.name} is being trained by another process")
                if not (folder / "model.pt").exists():  # else saved by another process since the check above
                    return self._train_base(run, build, train_set, test_set, train_config, progress=progress)
        model, record = load_model(folder / "model.pt")
        return model, record["metrics"]

    def _train_base(self, run: RunSpec, build, train_set, test_set, train_config, *, progress: bool):
        from mipp.measure import count_params
        from mipp.train import evaluate, fit

        folder = self.base_dir(run)
        model = build()
        started = time.perf_counter()
        result = fit(model, train_set, train_config, checkpoint_path=folder / "train-state.pt",
                     identity=run.base_identity(), progress=progress)
        model.cpu()
        metrics = {"test_accuracy": evaluate(model, test_set)["accuracy"], "params": count_params(model),
                   "train_seconds": result["seconds"], "wall_seconds": time.perf_counter() - started,
                   "history": result["history"], "identity": run.base_identity()}
        atomic_write_json(folder / "base.json", metrics)  # before model.pt, which marks the base model finished
        save_model(folder / "model.pt", model, metrics=metrics)
        return model, metrics

    def bases(self) -> list[tuple[str, dict]]:
        """(folder name, base.json) of every finished base model of the store, by folder name."""
        return [(path.parent.name, json.loads(path.read_text()))
                for path in sorted((self.root / "base").glob("*/base.json"))]

    # ------------------------------------------------------------------------------------------ sweep log

    def log_sweep(self, config: SweepConfig, argv: list[str] | None, counts: dict | None = None) -> Path:
        """Save the resolved config (rerunnable with --config) and append the command to sweeps.jsonl."""
        data = config.to_dict()
        path = self.root / "configs" / f"{config.name}-{stable_hash(data)[:8]}.json"
        if not path.exists():
            atomic_write_json(path, data)
        line = {"config": str(path.relative_to(self.root)), "argv": argv, "counts": counts,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "sweeps.jsonl"
        cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        with open(path, "a") as handle:
            handle.write(("\n" if cut else "") + json.dumps(line) + "\n")  # end a line cut by a kill first
        return path

    def sweeps(self) -> list[dict]:
        path = self.root / "sweeps.jsonl"
        if not path.exists():
            return []
        out = []
        for text in path.read_text().splitlines():
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out


def is_finished(record: RunRecord | None, budgets, retry_failed: bool = False) -> bool:
    """A run needs no work: done with every requested budget, skipped, or failed (unless retrying)."""
    if record is None:
        return False
    if record.status == "skipped" or (record.status == "failed" and not retry_failed):
        return True
    if record.status != "done":  # a partial record may hold every budget: killed before it was stamped done
        return False
    return all(str(b) in (record.finetune or {}) for b in budgets)


def stable_view(record: RunRecord) -> dict:
    """The record without what measures the machine (times, memory, latency, versions): equal for equal configs."""
    return {k: v for k, v in record.to_dict().items() if k not in VOLATILE}
