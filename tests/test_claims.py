"""Processes sharing one result store: a claim is exclusive and dies with its process; a sweep leaves the runs other
processes hold to them, waits for a base model or a matched run being made elsewhere, and two real `mipp sweep`
processes on one store run every run exactly once."""
import contextlib
import json
import os
import subprocess
import sys
import time

from conftest import TINY_SWEEP as TINY, TINY_SWEEP_RUNS as N_RUNS
from test_experiments import MATCHED as MATCHED_SWEEP
from mipp.experiments import runner as runner_module
from mipp.experiments.claims import Busy, claim
from mipp.experiments.config import SweepConfig, expand
from mipp.experiments.runner import run_sweep
from mipp.experiments.store import ResultStore



def test_a_claim_is_exclusive_and_released_with_the_block(tmp_path):
    path = tmp_path / "locks" / "run.lock"
    with claim(path) as first:
        with claim(path) as second:
            assert first and not second
    with claim(path) as again:
        assert again


def test_a_claim_dies_with_the_process_that_held_it(tmp_path):
    path = tmp_path / "run.lock"
    code = ("import sys, time\nfrom mipp.experiments.claims import claim\n"
            "with claim(sys.argv[1]) as mine:\n    print(mine, flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with claim(path) as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    with claim(path) as mine:
        assert mine


def test_a_sweep_leaves_a_run_that_another_process_holds_to_it(tmp_path):
    runs = expand(SweepConfig(**TINY))
    held = runs[3]
    store = ResultStore(tmp_path)
    with claim(store.claim_path(held.run_id)) as mine:
        assert mine
        counts = run_sweep(SweepConfig(**TINY), tmp_path, progress=False)
    assert (counts["done"], counts["elsewhere"]) == (N_RUNS - 1, 1)
    assert store.get(held.run_id) is None
    counts = run_sweep(SweepConfig(**TINY), tmp_path, progress=False)
    assert (counts["already"], counts["done"], counts["elsewhere"]) == (N_RUNS - 1, 1, 0)


def test_a_run_whose_holder_ended_without_finishing_it_is_run(tmp_path):
    runs = expand(SweepConfig(**TINY))
    store = ResultStore(tmp_path)
    with contextlib.ExitStack() as holder:
        assert holder.enter_context(claim(store.claim_path(runs[0].run_id)))

        def end_the_holder_at_the_last_run(record):
            if record.run_id == runs[-1].run_id:
                holder.close()

        counts = run_sweep(SweepConfig(**TINY), tmp_path, progress=False, on_record=end_the_holder_at_the_last_run)
    assert (counts["done"], counts["elsewhere"]) == (N_RUNS, 0)
    assert store.get(runs[0].run_id).status == "done"


def _released_on_first_wait(monkeypatch, stack: contextlib.ExitStack) -> list:
    """Replace the sweep's sleep between tries: the first one releases what `stack` holds; returns the waits."""
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        stack.close()

    monkeypatch.setattr(runner_module.time, "sleep", sleep)
    return waits


def test_runs_wait_for_a_base_model_that_another_process_is_training(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    trained = [r for r in expand(SweepConfig(**TINY)) if r.regime == "trained"]
    with contextlib.ExitStack() as stack:
        assert stack.enter_context(claim(store.base_dir(trained[0]) / "training.lock"))
        waits = _released_on_first_wait(monkeypatch, stack)
        counts = run_sweep(SweepConfig(**TINY), tmp_path, progress=False)
    assert len(waits) == 1 and (counts["done"], counts["elsewhere"]) == (N_RUNS, 0)
    assert all(store.get(r.run_id).status == "done" for r in trained)


def test_a_base_model_being_trained_elsewhere_is_busy_not_trained_again(tmp_path):
    store = ResultStore(tmp_path)
    run = next(r for r in expand(SweepConfig(**TINY)) if r.regime == "trained")

    def build():
        raise AssertionError("the base model was trained while another process held its lock")

    with claim(store.base_dir(run) / "training.lock"):
        try:
            store.base_model(run, build, None, None, None)
        except Busy as err:
            assert "being trained by another process" in str(err)
        else:
            raise AssertionError("no Busy")


# test_experiments' matched sweep, one seed and one matched baseline
MATCHED = {**MATCHED_SWEEP, "seeds": [0], "methods": MATCHED_SWEEP["methods"][:2]}


def test_a_matched_run_waits_for_the_run_it_matches_in_another_process(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    reference, matched = expand(SweepConfig(**MATCHED))
    assert matched.target["run"] == reference.run_id
    with contextlib.ExitStack() as stack:
        assert stack.enter_context(claim(store.claim_path(reference.run_id)))
        waits = _released_on_first_wait(monkeypatch, stack)
        counts = run_sweep(SweepConfig(**MATCHED), tmp_path, progress=False)
    assert len(waits) == 1 and (counts["done"], counts["failed"], counts["elsewhere"]) == (2, 0, 0)
    assert store.get(matched.run_id).target == store.get(reference.run_id).removed["units"]


def test_two_sweep_processes_on_one_store_run_every_run_once(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    argv = [sys.executable, "-m", "mipp", "sweep", "--config", str(config), "--out", str(tmp_path / "store"),
            "--json", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for _ in range(2)]
    started = time.monotonic()
    results = [json.loads(p.communicate(timeout=600)[0]) for p in processes]
    assert all(p.returncode == 0 for p in processes), time.monotonic() - started
    assert sum(r["done"] for r in results) == N_RUNS  # none ran twice, none was left out
    assert all(r["failed"] == 0 for r in results)
    assert all(r["already"] + r["done"] + r["skipped"] + r["elsewhere"] == N_RUNS for r in results)
    records = ResultStore(tmp_path / "store").records()
    assert len(records) == N_RUNS and all(r.status == "done" for r in records)
