"""`mipp prune`, `mipp methods` and the demo, end to end on the synthetic data set (seconds, not minutes)."""
import json
import os

import pytest

from mipp import demo
from mipp.checkpoint import load_model
from mipp.cli import main
from mipp.plan import Plan
from mipp.reconstruct import DEFAULT_MODE

SYNTHETIC = ["--data", "synthetic", "--data-option", "n=600"]


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--model", "mlp", *SYNTHETIC, "--epochs", "2", "--out", str(out), "--json"]) == 0
    return out


@pytest.mark.parametrize("method", ["mipp", "magnitude-l1"])
def test_prune_writes_a_smaller_model_its_plan_and_summary(capsys, trained, tmp_path, method):
    out = tmp_path / method
    result = run_json(capsys, ["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--method", method,
                               "--budget", "0.5", "--samples", "500", "--out", str(out)])
    assert abs(result["units_removed"] - 0.5) <= 0.01
    assert result["params_after"] < result["params_before"]
    plan = Plan.load(out / "plan.json")
    assert plan.method == method and "kept" in (out / "summary.txt").read_text()
    model, record = load_model(out / "model.pt")  # rebuilt from architecture + plan + state dict, no pickle
    assert sum(p.numel() for p in model.parameters()) == result["params_after"]
    evaluated = run_json(capsys, ["eval", "--checkpoint", str(out / "model.pt"), *SYNTHETIC])
    assert evaluated["pruned"] and evaluated["accuracy"] == pytest.approx(result["accuracy_pruned"])


def test_reconstruction_and_recalibration_flags_round_trip(capsys, trained, tmp_path):
    base = ["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--method", "random", "--budget", "0.5",
            "--samples", "300"]
    on = run_json(capsys, base + ["--out", str(tmp_path / "on")])
    off = run_json(capsys, base + ["--no-reconstruct", "--no-recalibrate", "--recalibration-batches", "3",
                                   "--out", str(tmp_path / "off")])
    sequential = run_json(capsys, base + ["--reconstruct-mode", "sequential", "--out", str(tmp_path / "sequential")])
    assert (on["reconstruct"], on["recalibrate"], on["recalibration_batches"]) == (DEFAULT_MODE, True, 16)
    assert (off["reconstruct"], off["recalibrate"], off["recalibration_batches"]) == (False, False, 3)
    assert sequential["reconstruct"] == "sequential" and sequential["readers_refitted"] == on["readers_refitted"]
    assert on["readers_refitted"] >= 1 and off["readers_refitted"] == 0
    for name, result in (("on", on), ("off", off), ("sequential", sequential)):
        settings = Plan.load(tmp_path / name / "plan.json").settings
        assert {k: settings[k] for k in ("reconstruct", "recalibrate", "recalibration_batches")} == \
            {k: result[k] for k in ("reconstruct", "recalibrate", "recalibration_batches")}
    with pytest.raises(SystemExit):
        main(base + ["--recalibration-batches", "0"])
    assert "not a positive number of batches" in capsys.readouterr().err


def test_prune_rejects_bad_input_with_a_message(capsys, trained):
    assert main(["prune", "--checkpoint", str(trained / "missing.pt"), *SYNTHETIC]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--method", "nope",
                 "--budget", "0.5"]) == 2
    assert "unknown pruning method" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--method", "snip"]) == 2
    assert "needs a budget" in capsys.readouterr().err


def test_methods_lists_mipp_and_baselines(capsys):
    names = {m["name"] for m in run_json(capsys, ["methods"])["methods"]}
    assert {"mipp", "random", "magnitude-l1", "snip", "thinet", "tp-lamp"} <= names


def test_demo_writes_table_and_plot_and_resumes_without_recomputing(tmp_path, monkeypatch):
    config = demo.DemoConfig(model="mlp", data="synthetic", epochs=1, budgets=(0.5,),
                             methods=("mipp", "random", "magnitude-l1"), n_samples=300, data_options={"n": 400})
    result = demo.run_demo(tmp_path, config, progress=False)
    methods = sorted((r["method"], r["budget"] or 0) for r in result["rows"])
    assert methods == [("magnitude-l1", 0.5), ("mipp", 0), ("mipp", 0.5), ("random", 0.5)]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    table = (tmp_path / "results.md").read_text()
    assert "| MIPP (`mipp`) | 50% of units |" in table and "| MIPP, confidence mode (`mipp`) | confidence 0.95 |" in table
    assert "| L1 magnitude, global ranking (`magnitude-l1`) | 50% of units |" in table
    base = result["base"]
    assert f"{base['params']:,} parameters" in table and base["macs"] > 0
    for row in result["rows"]:  # what each row removed, in all three currencies, and what is left
        assert 0 < row["units_removed"] < 1 and 0 < row["params_removed"] < 1 and 0 < row["macs_removed"] < 1
        assert row["params"] < base["params"]
    # a rerun finds every row done: it must not select again
    monkeypatch.setattr(demo, "select_plan", lambda *a, **k: pytest.fail("finished work was redone"))
    again = demo.run_demo(tmp_path, config, progress=False)
    assert again["rows"] == result["rows"]



@pytest.mark.parametrize("library, command", [
    ("only 40 calibration samples: a few thousand recommended, e.g. n_samples=2000",
     "only 40 calibration samples: a few thousand recommended, e.g. --samples 2000"),
    ("method 'snip' needs a budget: pass budget=0.5 (and metric='units'|'params'|'macs')",
     "method 'snip' needs a budget: pass --budget 0.5 (and --metric units|params|macs)"),
    ("at most 80.0% of units can be removed; lower the budget or min_units",
     "at most 80.0% of units can be removed; lower the budget or --min-units"),
    ("confidence must be in [0.5, 1), got 0.3", "--confidence must be in [0.5, 1), got 0.3"),
    ("lr must be > 0, got -1.0", "--finetune-lr must be > 0, got -1.0"),
    ("recalibration needs n_batches >= 1", "recalibration needs --recalibration-batches >= 1"),
    ("use a new output folder, or --no-resume (fit(..., resume=False)) to start over",
     "use a new output folder, or --no-resume to start over"),
    ("turn it off with reconstruct=False", "turn it off with --no-reconstruct"),
    ("the budget 0.5 is unreachable with these samples", "the budget 0.5 is unreachable with these samples"),
])
def test_library_errors_are_reworded_in_flag_terms(library, command):
    from mipp.cli.common import in_flag_terms
    from mipp.cli.prune import PRUNE_FLAGS

    assert in_flag_terms(library, PRUNE_FLAGS) == command
    assert in_flag_terms(library, None) == library


def test_prune_errors_name_flags(capsys, trained):
    assert main(["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--method", "snip"]) == 2
    assert "pass --budget 0.5 (and --metric units|params|macs)" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--confidence", "0.2"]) == 2
    assert "--confidence must be in [0.5, 1)" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", str(trained / "model.pt"), *SYNTHETIC, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_threads_follow_the_flag_then_the_environment_then_the_machine(monkeypatch):
    import torch

    from mipp.cli import common

    assert 1 <= common.physical_cores() <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        assert common.configure_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert common.configure_threads(None) == 1  # the environment's choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(common, "physical_cores", lambda: 8)
        monkeypatch.setattr(common.os, "getloadavg", lambda: (5.5, 0.0, 0.0))
        assert common.configure_threads(None) == 3  # 8 cores, 5 busy
        monkeypatch.setattr(common.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
        assert common.default_threads() == common.MAX_DEFAULT_THREADS
        monkeypatch.setattr(common.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
        assert common.default_threads() == 1
    finally:
        torch.set_num_threads(before)
