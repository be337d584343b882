"""The latency benchmark's result format and its section of `mipp report` (no timing is asserted: only the shape
of what the benchmark writes and that the report reads it back)."""
import json
import sys
from pathlib import Path

import pytest

from mipp.experiments import report, tables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_latency  # noqa: E402  (a script, importable from its folder)


@pytest.fixture(scope="module")
def lenet_rows():
    """One real, minimal benchmark of LeNet-5 on the CPU (one round, no warm-up)."""
    import torch

    return bench_latency.benchmark("lenet5", "random", [torch.device("cpu")], rounds=1, warmup=0, seed=0)


def test_benchmark_rows_pair_each_target_and_batch_with_its_macs(lenet_rows):
    assert [(r["batch"], r["target"]) for r in lenet_rows] == [(b, t) for b in bench_latency.BATCH_SIZES
                                                             for t in bench_latency.TARGETS]
    for row in lenet_rows:
        assert abs(row["macs_removed"] - row["target"]) < 0.02
        assert row["macs_ratio"] == pytest.approx(1 / (1 - row["macs_removed"]))
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["macs_ratio"])
        assert row["latency_ms_original"] > 0 and row["latency_ms_pruned"] > 0


def test_report_reads_the_benchmark_result_and_renders_its_table(lenet_rows, tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"format": bench_latency.FORMAT, "rows": lenet_rows, "method": "random",
                                "threads": 1, "rounds": 1, "cpu_count": 2, "load_average_before": [1.0, 1.0, 1.0]}))
    section = tables.latency_section(report.load_latency(path), str(path))
    assert section.startswith("\n## Latency") and section.count("\n| lenet5 | cpu |") == len(lenet_rows)


def test_report_refuses_a_file_that_is_not_a_latency_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench_latency.py"):
        report.load_latency(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "mipp-plan/1"}))
    with pytest.raises(ValueError, match="not a latency result"):
        report.load_latency(tmp_path / "other.json")


def test_mipp_report_includes_the_latency_table(lenet_rows, tmp_path, capsys):
    from mipp.cli import main
    from mipp.experiments.config import SweepConfig
    from mipp.experiments.runner import run_sweep

    one_run = dict(name="one", models=[{"name": "mlp", "hidden": [16, 8]}],
                   data=[{"name": "synthetic", "options": {"n": 200, "input_size": 8}}], methods=["random"],
                   targets=[0.5], seeds=[0], regimes=["trained"], finetune_epochs=[0], train={"epochs": 1},
                   n_samples=150, train_eval_n=50, latency=False)
    run_sweep(SweepConfig(**one_run), tmp_path / "store", progress=False)
    latency = tmp_path / "latency.json"
    latency.write_text(json.dumps({"format": bench_latency.FORMAT, "rows": lenet_rows, "method": "random",
                                   "threads": 1, "rounds": 1}))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "store"), "--out", str(out), "--latency", str(latency),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "tables/latency.csv" in result["tables"]
    text = (out / "results.md").read_text()
    assert "## Latency" in text and f"--latency {latency}" in text
