"""mipp.experiments: sweeps of pruning experiments, their result store and the report with the paper's figures.

    config.py      SweepConfig (JSON file or flags) -> RunSpecs, each with a stable id
    record.py      RunRecord: the typed record of one run (its JSON is the run-record format)
    store.py       OUT/runs/<id>.json per run, shared trained base models, the sweep log
    runner.py      one run (select, prune, evaluate, fine-tune, measure) and the resumable sweep loop
    memory.py      peak memory of a selection
    report.py      `mipp report`: loads the stores and writes results.md, tables/ and figures/ with
    statistics.py  means over seeds, MIPP against each baseline paired over seeds, cost, planted-truth recovery
    tables.py      CSV and the Markdown of results.md
    figures.py     the figures (matplotlib)
"""
from mipp.experiments.config import RunSpec, SweepConfig, expand
from mipp.experiments.record import RunRecord
from mipp.experiments.runner import run_sweep
from mipp.experiments.store import ResultStore

__all__ = ["ResultStore", "RunRecord", "RunSpec", "SweepConfig", "expand", "run_sweep"]
