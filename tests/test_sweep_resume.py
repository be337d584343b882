"""A sweep killed with SIGKILL at random moments (in base training, selection, fine-tuning or between runs) and
rerun ends with exactly the records of an uninterrupted sweep: same run files, same numbers (timings, memory and
versions aside), every run done, no leftover fine-tuning checkpoints.

The sweep runs as the real command (`python -m mipp sweep`) in a subprocess. Kill delays are drawn from a seeded
generator and measured from the moment the sweep logged its start (after the imports), spread over the time the
uninterrupted sweep took; where a kill lands still depends on the machine's speed, which is the point: the records
must not.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipp.experiments.store import ResultStore, stable_view

SRC = Path(__file__).resolve().parents[1] / "src"
# 4 runs (MIPP and random, at initialisation and trained), one shared base model trained for 2 epochs with a
# checkpoint every 2 steps, so that kills also land between mid-epoch checkpoints; fine-tuning budgets 0 and 1.
TINY = {"name": "resume", "models": [{"name": "mlp", "hidden": [24, 12]}],
        "data": [{"name": "synthetic", "options": {"n": 240, "input_size": 8}}], "methods": ["mipp", "random"],
        "targets": [0.5], "seeds": [0], "regimes": ["init", "trained"], "finetune_epochs": [0, 1],
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 2}, "n_samples": 200, "train_eval_n": 100,
        "latency": False}
STARTUP_TIMEOUT = 300  # seconds until the sweep logs its start (imports on a loaded machine are slow)


def sweep(config: Path, out: Path, log: Path) -> subprocess.Popen:
    """Start `python -m mipp sweep` on one thread with this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with open(log, "a") as handle:
        return subprocess.Popen([sys.executable, "-m", "mipp", "sweep", "--config", str(config), "--out", str(out)],
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def started_lines(out: Path) -> int:
    path = out / "sweeps.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_until_started(process: subprocess.Popen, out: Path, lines_before: int) -> float:
    """Block until the sweep has appended its start line to sweeps.jsonl (or ended); returns that moment."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while started_lines(out) <= lines_before and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the sweep did not start within {STARTUP_TIMEOUT} s")
        time.sleep(0.01)
    return time.monotonic()


def run_to_end(config: Path, out: Path, log: Path) -> float:
    """Run the sweep uninterrupted; returns the seconds it worked after logging its start."""
    lines = started_lines(out)
    process = sweep(config, out, log)
    started = wait_until_started(process, out, lines)
    assert process.wait() == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def kill_at(config: Path, out: Path, log: Path, delay: float) -> bool:
    """Start the sweep and SIGKILL it `delay` seconds after it logged its start; False if it finished first."""
    lines = started_lines(out)
    process = sweep(config, out, log)
    started = wait_until_started(process, out, lines)
    while process.poll() is None and time.monotonic() - started < delay:
        time.sleep(0.005)
    if process.poll() is not None:
        assert process.returncode == 0, log.read_text()[-3000:]
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def records(out: Path) -> dict:
    return {r.run_id: r for r in ResultStore(out).records()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep: (its config file, its store, seconds it worked)."""
    folder = tmp_path_factory.mktemp("resume")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = folder / "uninterrupted"
    seconds = run_to_end(config, out, folder / "uninterrupted.log")
    return config, out, seconds


def check_same_as_uninterrupted(out: Path, reference_out: Path) -> None:
    resumed, uninterrupted = records(out), records(reference_out)
    assert len(uninterrupted) == 4 and all(r.status == "done" for r in uninterrupted.values())
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == sorted(f"{k}.json" for k in uninterrupted)
    assert resumed.keys() == uninterrupted.keys()
    for run_id, record in uninterrupted.items():
        assert stable_view(resumed[run_id]) == stable_view(record), run_id
    assert not list(out.glob("work/*.pt")), "a finished fine-tuning left its checkpoint behind"
    base = sorted(p.name for p in (reference_out / "base").iterdir())
    assert sorted(p.name for p in (out / "base").iterdir()) == base
    assert all((out / "base" / name / "base.json").is_file() for name in base)
    for line in (out / "sweeps.jsonl").read_text().splitlines():
        json.loads(line)  # a line cut by a kill is completed by a newline, never glued to the next one


def kill_and_resume(reference, tmp_path: Path, fractions: list) -> int:
    """Kill the sweep once per fraction, that fraction of the remaining work after it started, then let it finish;
    returns the number of kills that landed before the sweep was done."""
    config, reference_out, seconds = reference
    tmp_path.mkdir(parents=True, exist_ok=True)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    landed, done = 0, 0.0
    for fraction in fractions:
        # a resumed sweep skips finished work (about half of what ran before a kill is kept): aim within the rest
        remaining = max(seconds - done / 2, seconds / 5)
        if kill_at(config, out, log, fraction * remaining):
            landed, done = landed + 1, done + fraction * remaining
    run_to_end(config, out, log)
    check_same_as_uninterrupted(out, reference_out)
    return landed


def test_sweep_killed_once_resumes_to_the_uninterrupted_records(reference, tmp_path):
    fraction = random.Random(0).uniform(0.1, 0.5)
    for attempt in range(3):  # a machine much faster than during the reference run may finish before the kill
        if kill_and_resume(reference, tmp_path / f"attempt{attempt}", [fraction / 4 ** attempt]) == 1:
            return
    pytest.fail("the sweep always finished before it could be killed")


@pytest.mark.slow
def test_sweep_killed_many_times_resumes_to_the_uninterrupted_records(reference, tmp_path):
    generator = random.Random(1)
    landed = kill_and_resume(reference, tmp_path, [generator.uniform(0.05, 0.8) for _ in range(6)])
    assert landed >= 3, f"only {landed} of 6 kills landed before the sweep was done"


def test_run_killed_after_its_last_budget_is_completed_on_resume(tmp_path, monkeypatch):
    """The window between storing the last budget and stamping the run done: the resumed sweep must finish the
    record (status done), not take the partial record with every budget for a finished run."""
    from mipp.experiments.config import SweepConfig
    from mipp.experiments.runner import Runner, run_sweep

    config = SweepConfig(**{**TINY, "methods": ["random"], "regimes": ["init"]})

    def killed(self, record):
        raise KeyboardInterrupt  # dies before the finished record is written

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Runner, "finish", killed)
        run_sweep(config, tmp_path, progress=False)
    (stored,) = records(tmp_path).values()
    assert stored.status == "partial" and set(stored.finetune) == {"0", "1"}
    counts = run_sweep(config, tmp_path, progress=False)
    (resumed,) = records(tmp_path).values()
    assert counts["done"] == 1 and resumed.status == "done" and resumed.finished_at is not None
    assert resumed.finetune == stored.finetune


def test_sweep_log_line_cut_by_a_kill_does_not_swallow_the_next(tmp_path):
    from mipp.experiments.config import SweepConfig

    store = ResultStore(tmp_path)
    store.log_sweep(SweepConfig(**TINY), ["first"])
    with open(tmp_path / "sweeps.jsonl", "a") as handle:
        handle.write('{"config": "configs/cut')  # a kill in the middle of the append
    store.log_sweep(SweepConfig(**TINY), ["third"])
    assert [entry["argv"] for entry in store.sweeps()] == [["first"], ["third"]]
