"""One run of a sweep, and the resumable loop over a sweep's runs.

A run takes its base model (regime "trained": the shared trained model of the store; regime "init": the seeded
initialisation), selects a Plan with its method (timed, with peak memory), applies it, evaluates right after pruning
(test and train accuracy), then for each fine-tuning budget b trains the pruned net for b epochs, each budget from
the pruned weights with a schedule of its own ("init": training the net pruned at initialisation; "trained":
fine-tuning, with the `finetune` overrides), and evaluates again.  The record is saved after pruning and after each
budget, so a killed sweep loses at most one stage; a record missing some budgets is completed by rebuilding the
pruned net from its base and the saved Plan (selection is never redone).

Layer collapse, recorded per run: `guard` when some group is left at the collapse guard's minimum width (the method
would have emptied it or narrowed it further), `untrainable` when the test accuracy after the largest fine-tuning
budget is at most CHANCE_FACTOR / classes (None without a budget > 0); `any` is either.

A network with planted weights (a model registered with `planted`, see mipp.models.registry) is never trained: it is
pruned as given (regime "trained" only), on its own data (labelled by the network of the run's seed), and its record
says how much of the planted truth the plan recovered.  Peak memory of the selection: see memory.py.
"""
from __future__ import annotations

import copy
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from mipp.experiments.claims import Busy, claim
from mipp.experiments.config import RunSpec, SweepConfig, expand, repair_label
from mipp.experiments.memory import PeakMemory
from mipp.experiments.record import WITHOUT_RECONSTRUCTION, RunRecord
from mipp.experiments.store import ResultStore, is_finished
from mipp.io import derived_seed, run_versions, stable_hash
from mipp.plan import Plan
from mipp.progress import Progress
from mipp.recalibrate import recalibrate_batch_norm
from mipp.reconstruct import reconstruction_mode, reconstruction_statistics, refit_readers, refit_sequentially
from mipp.surgery import apply_plan
from mipp.units import find_units

log = logging.getLogger(__name__)
CHANCE_FACTOR = 1.2  # "untrainable": accuracy within 20% (relative) of chance after the largest budget
WAIT_SECONDS = 10.0  # between tries of runs that wait for another process (a base model's training, a matched run)


class NotApplicable(Exception):
    """The method cannot make this run's plan (it said so with a ValueError): recorded as skipped."""


@dataclass
class Splits:
    train: object
    test: object
    train_eval: object  # the fixed subset of `train` on which train accuracy is measured
    num_classes: int
    example: torch.Tensor  # two inputs, to trace models and measure latency


def skip_reason(run: RunSpec) -> str | None:
    """Why `run` cannot be made at all (recorded instead of crashing), or None."""
    from mipp.methods import get_method
    from mipp.models import model_entry

    info = get_method(run.method["name"])
    if run.regime not in info.regimes:
        return f"{info.name} applies to the {'/'.join(info.regimes)} regime only, not {run.regime}"
    if run.target is None and info.needs_budget:
        return f"{info.name} needs a target (null targets are for MIPP's confidence mode)"
    if model_entry(run.model["name"]).planted is not None and run.regime == "init":
        return f"the {run.model['name']} network has planted weights: it is pruned as given (trained regime) only"
    return None


class Runner:
    """Runs RunSpecs into a ResultStore; caches data sets and base models between the runs of one process."""

    def __init__(self, store: ResultStore, *, device: str = "auto", data_root: str | None = None,
                 progress: bool = True, latency: bool = True):
        from mipp.train import resolve_device

        self.store, self.device, self.data_root = store, resolve_device(device), data_root
        self.progress, self.latency = progress, latency
        self._splits: dict = {}
        self._bases: dict = {}
        self._base_latency: dict = {}

    # ------------------------------------------------------------------------------------------ inputs

    def splits(self, run: RunSpec) -> Splits:
        from mipp.models import model_entry

        own_data = model_entry(run.model["name"]).data is not None  # labelled by the network of the run's seed
        key = stable_hash([run.data, run.settings["train_eval_n"], run.seed if own_data else 0])
        if key not in self._splits:
            self._splits = {key: self._load_splits(run)}  # one data set at a time: sweeps are ordered by data
        return self._splits[key]

    def _load_splits(self, run: RunSpec) -> Splits:
        from mipp.data import deformed, load_dataset, subset_indices
        from mipp.models import model_entry

        spec, entry = run.data, model_entry(run.model["name"])
        if entry.data is not None:
            train, test = (own_split(entry, run.seed, split, spec) for split in ("train", "test"))
        else:
            train, test = (load_dataset(spec["name"], split, root=self.data_root, limit=spec["limit"], seed=0,
                                        **spec["options"]) for split in ("train", "test"))
        if spec["deform"]:
            train, test = deformed(train, **spec["deform"]), deformed(test, **spec["deform"])
        n = run.settings["train_eval_n"]
        train_eval = train if n is None or n >= len(train) else train.subset(subset_indices(train.labels, n, 0))
        return Splits(train, test, train_eval, int(train.num_classes), train.images[:2].clone())

    def build(self, run: RunSpec, splits: Splits) -> torch.nn.Module:
        """The seeded initialisation of the run's model (a network with planted weights as planted)."""
        from mipp.models import build_model, model_entry

        spec = dict(run.model)
        name = spec.pop("name")
        if model_entry(name).planted is not None:
            spec["seed"] = run.seed  # its weights are a function of the run's seed
        _, channels, size, _ = splits.train.images.shape
        with torch.random.fork_rng():
            torch.manual_seed(run.seed)
            return build_model(name, num_classes=splits.num_classes, in_channels=channels, input_size=size, **spec)

    def base(self, run: RunSpec, splits: Splits) -> tuple[torch.nn.Module, dict]:
        """(base model, its metrics): the initialisation for "init", the trained model for "trained" (a network with
        planted weights as planted)."""
        from mipp.models import model_entry
        from mipp.train import TrainConfig, evaluate

        key = (run.regime, str(self.store.base_dir(run)))
        if key not in self._bases:
            if run.regime == "init" or model_entry(run.model["name"]).planted is not None:
                model = self.build(run, splits)
                metrics = {"test_accuracy": evaluate(model, splits.test, device=self.device)["accuracy"]}
            else:
                config = TrainConfig(**run.settings["train"], epochs=run.settings["train_epochs"], seed=run.seed,
                                     device=str(self.device))
                model, metrics = self.store.base_model(run, lambda: self.build(run, splits), splits.train,
                                                       splits.test, config, progress=self.progress)
            self._bases = {key: (model.cpu().eval(), metrics)}  # keep one: sweeps are ordered by base model
        return self._bases[key]

    # --------------------------------------------------------------------------------------------- a run

    def execute(self, run: RunSpec, record: RunRecord | None = None) -> RunRecord:
        """Make (or complete) the record of `run` and store it; returns it."""
        started = time.perf_counter()
        if record is None or record.status not in ("done", "partial"):
            reason = skip_reason(run)
            if reason:
                return self.finish(header(run, "skipped", reason))
            splits = self.splits(run)
            base, base_metrics = self.base(run, splits)
            try:
                record = self._prune(run, splits, base, base_metrics)
            except NotApplicable as err:
                return self.finish(header(run, "skipped", str(err)))
            self.store.put(record)
        splits = self.splits(run)
        base, _ = self.base(run, splits)
        for epochs in run.finetune_epochs:
            if str(epochs) not in record.finetune:
                ft_started = time.perf_counter()
                record.finetune[str(epochs)] = self._finetune(run, splits, base, record, epochs)
                record.timings.setdefault("finetune_seconds", {})[str(epochs)] = time.perf_counter() - ft_started
                record.collapse = collapse(record, splits.num_classes)
                self.store.put(record)
        record.timings["last_session_seconds"] = time.perf_counter() - started
        record.status = "done"
        return self.finish(record)

    def finish(self, record: RunRecord) -> RunRecord:
        """Stamp the time the record was finished and store it."""
        record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.store.put(record)
        return record

    def _prune(self, run: RunSpec, splits: Splits, base, base_metrics: dict) -> RunRecord:
        from mipp.api import select_plan
        from mipp.measure import count_macs, count_params
        from mipp.models import model_entry

        budget = self.budget(run)
        try:
            with PeakMemory(device=self.device) as memory:
                started = time.perf_counter()
                plan = select_plan(base, splits.train, method=run.method["name"], budget=budget,
                                   metric=run.metric, min_units=run.settings["min_units"],
                                   n_samples=run.settings["n_samples"], seed=run.seed, example_input=splits.example,
                                   device=None if self.device.type == "cpu" else str(self.device),
                                   **run.method["options"])
                seconds = time.perf_counter() - started
        except ValueError as err:  # the method cannot make this plan (a criterion without BN, an unreachable target)
            raise NotApplicable(f"{type(err).__name__}: {err}") from err
        started = time.perf_counter()
        pruned = pruned_copy(run, splits, base, plan)
        repair_seconds = time.perf_counter() - started
        started = time.perf_counter()
        scores = self.scores(pruned, splits)
        if run.settings.get("reconstruct"):  # the same units without the re-fit: the choice judged on its own
            scores[WITHOUT_RECONSTRUCTION] = self.scores(pruned_copy(run, splits, base, plan, reconstruct=False),
                                                         splits)
        record = header(run, "partial")
        record.target = budget  # a matched run's: the fraction it was given
        record.base = {"test_accuracy": base_metrics["test_accuracy"], "params": count_params(base),
                       "macs": count_macs(base, splits.example),
                       "dir": str(self.store.base_dir(run).name) if run.regime == "trained" else None}
        # decisions (per-unit scores) are too big to keep; stats and versions are stored below, once
        record.plan = {k: v for k, v in plan.to_dict().items() if k not in ("decisions", "stats", "versions")}
        record.layers = list(reversed(plan.sizes))  # group keys from the input to the output
        record.units_kept = {k: len(v) for k, v in plan.kept.items()}
        record.kept_fraction = {k: len(v) / plan.sizes[k] for k, v in plan.kept.items()}
        record.removed = {m: plan.stats[f"{m}_removed"] for m in ("units", "params", "macs")}
        record.measured = {"params": count_params(pruned), "macs": count_macs(pruned, splits.example)}
        record.selection = {"seconds": seconds, "peak_rss_mb": memory.peak_mb, "cuda_peak_mb": memory.cuda_peak_mb,
                            "method_stats": {k: v for k, v in plan.stats.items()
                                             if not k.startswith(("units", "params", "macs"))}}
        record.pruned = scores
        record.finetune = {"0": {k: v for k, v in scores.items() if k != WITHOUT_RECONSTRUCTION}}
        record.timings = {"selection_seconds": seconds, "evaluate_seconds": time.perf_counter() - started,
                          "base_train_seconds": base_metrics.get("train_seconds")}
        if repair_label(run.settings):
            record.timings["repair_seconds"] = repair_seconds
        if self.latency:
            record.latency_ms = latency(pruned, splits.example)
            if record.model not in self._base_latency:
                self._base_latency = {record.model: latency(base, splits.example)}
            record.base_latency_ms = self._base_latency[record.model]
        truth = model_entry(run.model["name"]).planted
        if truth is not None:
            record.planted = truth.recovery(plan.kept)
        record.collapse = collapse(record, splits.num_classes)
        return record

    def budget(self, run: RunSpec) -> float | None:
        """The run's target; for a matched one, the fraction of its metric that the run it matches removed."""
        if not isinstance(run.target, dict):
            return run.target
        label, reference = run.target["as"], self.store.get(run.target["run"])
        if reference is None or reference.status == "partial":  # another process has it (it comes first in a sweep)
            raise Busy(f"this run removes what the {label!r} run {run.target['run']} removed, which has not "
                       "finished yet")
        if reference.status != "done":
            raise NotApplicable(f"the {label!r} run it matches ({run.target['run']}) is {reference.status}")
        reached = reference.removed[run.metric]
        if not 0.0 < reached < 1.0:
            raise NotApplicable(f"the {label!r} run it matches removed {100 * reached:g}% of {run.metric}")
        return reached

    def _finetune(self, run: RunSpec, splits: Splits, base, record: RunRecord, epochs: int) -> dict:
        from mipp.train import TrainConfig, fit

        pruned = pruned_copy(run, splits, base, Plan.from_dict(record.plan))
        settings = run.settings["train" if run.regime == "init" else "finetune"]
        config = TrainConfig(**settings, epochs=epochs, seed=derived_seed(run.seed, "finetune") % 2 ** 31,
                             device=str(self.device))
        path = self.store.work_path(run.run_id, epochs)
        fit(pruned, splits.train, config, checkpoint_path=path, identity={"run": run.run_id}, progress=self.progress,
            description="training the pruned net" if run.regime == "init" else "fine-tuning")
        scores = self.scores(pruned, splits)
        path.unlink(missing_ok=True)
        return scores

    def scores(self, model, splits: Splits) -> dict:
        from mipp.train import evaluate

        test = evaluate(model, splits.test, device=self.device)
        train = evaluate(model, splits.train_eval, device=self.device)
        model.cpu()
        return {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "train_accuracy": train["accuracy"]}


def own_split(entry, seed: int, split: str, spec: dict):
    """One split of the own data of a network with planted weights: inputs labelled by the network of `seed`."""
    from mipp.data import ArrayDataset

    inputs, labels, classes = entry.data(seed, split, **spec["options"])
    return ArrayDataset(inputs, labels, name=spec["name"], split=split, classes=classes)


def pruned_copy(run: RunSpec, splits: Splits, base: torch.nn.Module, plan: Plan,
                reconstruct: bool | None = None) -> torch.nn.Module:
    """A copy of `base` with `plan` applied and, if the sweep asks, repaired for every method alike: readers of
    removed units re-fitted (on the run's calibration samples) and batch-norm statistics recalibrated. Deterministic,
    so a resumed fine-tuning rebuilds exactly the net that was evaluated. The copy is traced once more: the
    selection's trace belonged to the base, and the selection is timed alone. `reconstruct=False` skips the re-fit
    where the sweep asks for it (recalibration stays), for the accuracy of the choice of units on its own."""
    model = copy.deepcopy(base)
    units = find_units(model, splits.example)
    mode = reconstruction_mode(run.settings.get("reconstruct") if reconstruct is None else reconstruct)
    statistics = {}
    if mode == "independent":
        statistics = reconstruction_statistics(model, plan, splits.train, units=units,
                                               n_samples=run.settings["n_samples"], seed=run.seed)
    apply_plan(model, plan, units=units)
    if mode == "sequential":  # the base is the original each re-fitted reader reproduces (its names are the copy's)
        refit_sequentially(base, model, plan, splits.train, units=units, n_samples=run.settings["n_samples"],
                           seed=run.seed)
    refit_readers(model, statistics)
    if run.settings.get("recalibrate"):
        recalibrate_batch_norm(model, splits.train, seed=run.seed)
    return model


def header(run: RunSpec, status: str, reason: str | None = None) -> RunRecord:
    """A record of `run` with only what the run is: the results come later."""
    matched = isinstance(run.target, dict)
    return RunRecord(run_id=run.run_id, status=status, reason=reason, **run.labels, method_name=run.method["name"],
                     regime=run.regime, target=None if matched else run.target, metric=run.metric, seed=run.seed,
                     config=run.identity(), versions=run_versions(),
                     matched={"label": run.target["as"], "run_id": run.target["run"]} if matched else None)


def latency(model, example: torch.Tensor) -> dict:
    """Median CPU latency (ms) at batch 1 and 64, on one thread: on a shared machine, multi-threaded kernels wait
    for descheduled threads and the numbers swing by 100x."""
    from mipp.measure import latency_ms

    model, threads = model.cpu(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {str(b): latency_ms(model, example.cpu(), batch_size=b) for b in (1, 64)}
    finally:
        torch.set_num_threads(threads)


def collapse(record: RunRecord, num_classes: int) -> dict:
    guard = list(record.plan["guard_hits"])
    budgets = record.budgets()
    untrainable = None
    if budgets:
        untrainable = record.finetune[str(budgets[-1])]["test_accuracy"] <= CHANCE_FACTOR / num_classes
    return {"guard": bool(guard), "guard_groups": guard, "untrainable": untrainable,
            "any": bool(guard) or bool(untrainable), "chance": 1.0 / num_classes}


# ------------------------------------------------------------------------------------------------- a sweep


def run_sweep(config: SweepConfig, out: str | Path, *, retry_failed: bool = False, progress: bool = True,
              argv: list[str] | None = None, on_record=None, shard: tuple[int, int] = (0, 1)) -> dict:
    """Run every unfinished run of `config` into the store at `out`; returns counts by status.

    A run that raises (other than a ValueError of the selection: recorded as skipped) is recorded as failed with
    its traceback and the sweep goes on; rerun with retry_failed=True after a fix.  `on_record(record)` is called
    after each run is stored (an exception there stops the sweep: that is how tests interrupt it).
    Several processes may run the same sweep into one store at once: each claims a run before it starts it
    (mipp.experiments.claims) and leaves to the others the runs they hold ("elsewhere" counts those still held
    when it ends; a run whose process ended unfinished it takes up). A run whose base model another process is
    training, or whose matched run another process has not finished, waits for it, so every process stays busy
    until the runs nobody holds are done.  shard (i, n): only the i-th of n fixed shards (see shard_runs), for
    processes that do not share a file system.
    `progress`: a bar over the runs (terminal) or periodic lines naming the run (model, data, regime, method,
    target, seed) and its stage, plus one line per finished run (mipp.progress); the training inside is nested.
    """
    runs = shard_runs(expand(config), *shard)
    store = ResultStore(out)
    store.log_sweep(config, argv)
    runner = Runner(store, device=config.device, data_root=config.data_root, progress=progress,
                    latency=config.latency)
    counts = {"runs": len(runs), "already": 0, "done": 0, "skipped": 0, "failed": 0, "elsewhere": 0}
    train_log = logging.getLogger("mipp.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # "resuming ..." for every fine-tuning would drown the sweep's progress
    try:
        with Progress(len(runs), config.name, "run", enabled=progress) as bar:
            pending = runs
            while pending:
                waiting, blocked = [], None
                for run in pending:
                    outcome, record = _attempt(run, store, runner, retry_failed, bar)
                    if outcome in ("held", "busy"):
                        waiting.append(run)
                        blocked = record if outcome == "busy" else blocked
                        continue
                    counts[outcome] += 1
                    bar.update(1, note=None if record is None else f"{run_name(run)}: {_outcome(record)}",
                               timed=record is not None and record.status != "skipped")  # a skip is instant
                    if record is not None and on_record is not None:
                        on_record(record)
                if blocked is None:  # only runs other processes held when this one passed them are left
                    pending = _settle(waiting, store, retry_failed, counts, bar)
                    continue
                bar.status(f"waiting: {blocked}")
                time.sleep(WAIT_SECONDS)
                pending = waiting
    finally:
        train_log.setLevel(level)
    store.log_sweep(config, argv, counts)
    return {"out": str(out), **counts}


def _settle(held: list[RunSpec], store: ResultStore, retry_failed: bool, counts: dict, bar: Progress) -> list:
    """Of the runs other processes held when this one passed them: count those finished since as "already" and
    those still held as "elsewhere" (theirs to finish); return the rest, unfinished and free (their process ended),
    for this one to run."""
    free = []
    for run in held:
        if is_finished(store.get(run.run_id), run.finetune_epochs, retry_failed):
            counts["already"] += 1
        else:
            with claim(store.claim_path(run.run_id)) as mine:
                if mine:
                    free.append(run)
                    continue
            counts["elsewhere"] += 1
        bar.update(1, timed=False)
    return free


def _attempt(run: RunSpec, store: ResultStore, runner: Runner, retry_failed: bool, bar: Progress):
    """(outcome, record or reason) of one try at `run`: "already" (finished), "held" (another process has it),
    "busy" (what it needs is being made elsewhere; the Busy error) or the status of the record it made."""
    if is_finished(store.get(run.run_id), run.finetune_epochs, retry_failed):
        return "already", None
    with claim(store.claim_path(run.run_id)) as mine:
        if not mine:
            return "held", None
        existing = store.get(run.run_id)  # another process may have finished it since the check above
        if is_finished(existing, run.finetune_epochs, retry_failed):
            return "already", None
        name = run_name(run)
        bar.status(name)
        try:
            record = runner.execute(run, existing)
        except Busy as err:
            return "busy", err
        except Exception as err:  # noqa: BLE001 - one broken run must not stop a night's sweep
            log.error("run %s (%s) failed: %s", run.run_id, name, err)
            record = header(run, "failed", f"{type(err).__name__}: {err}")
            record.traceback = traceback.format_exc(limit=8)
            record = runner.finish(record)
        return record.status, record


def run_name(run: RunSpec) -> str:
    """'lenet5 fashion-mnist trained mipp at 0.7 of macs, seed 0': what a progress line calls a run."""
    labels = run.labels
    target = ("confidence mode" if run.target is None else f"at the {run.metric} of {run.target['as']}"
              if isinstance(run.target, dict) else f"at {run.target} of {run.metric}")
    return f"{labels['model']} {labels['data']} {run.regime} {labels['method']} {target}, seed {run.seed}"


def shard_runs(runs: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Shard `index` of `count`: runs at initialisation round-robin, trained runs by base model (round-robin over the
    base models), so that no base model is trained by two processes; a run with a matched target goes with the run
    it matches."""
    bases = list(dict.fromkeys(stable_hash(r.base_identity()) for r in runs if r.regime == "trained"))
    owners, position = {}, 0
    for run in runs:
        if isinstance(run.target, dict):  # with the run it matches, which comes before it
            owners[run.run_id] = owners[run.target["run"]]
        elif run.regime == "trained":
            owners[run.run_id] = bases.index(stable_hash(run.base_identity())) % count
        else:
            owners[run.run_id], position = position % count, position + 1
    return [run for run in runs if owners[run.run_id] == index]


def _outcome(record: RunRecord) -> str:
    if record.status != "done":
        return f"{record.status} ({record.reason})"
    last = max(record.finetune, key=int)
    return (f"{100 * record.removed['units']:.1f}% units removed, test accuracy "
            f"{100 * record.pruned['test_accuracy']:.2f}% -> {100 * record.finetune[last]['test_accuracy']:.2f}% "
            f"after {last} epoch(s)")
