"""mipp.experiments: sweeps of pruning experiments, their result store and the report with the paper's figures.

    config.py   SweepConfig (JSON file or flags) -> RunSpecs, each with a stable id
    store.py    OUT/runs/<id>.json per run, shared trained base models, the sweep log
    runner.py   one run (select, prune, evaluate, fine-tune, measure) and the resumable sweep loop
    report.py   tables (Markdown, CSV) and figures (PNG)
    planted.py  the planted-redundancy network
"""
from mipp.experiments.config import RunSpec, SweepConfig, expand
from mipp.experiments.runner import run_sweep
from mipp.experiments.store import ResultStore

__all__ = ["ResultStore", "RunSpec", "SweepConfig", "expand", "run_sweep"]
