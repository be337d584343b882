"""The experiment harness: a tiny sweep (synthetic data, small MLP, MIPP and random, two targets, two seeds, both
regimes, fine-tuning 0 and 1 epoch) runs, is skipped when rerun, and gives the same records when interrupted (between
runs, inside base training, inside a run) and resumed; the report writes its tables and figures; paired intervals
on known numbers; the deform wrapper."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_SWEEP as TINY, TINY_SWEEP_RUNS as N_RUNS

from mipp.data import ArrayDataset, deformed
from mipp.experiments import figures, report, statistics, tables
from mipp.experiments.config import SweepConfig, expand
from mipp.experiments.record import WITHOUT_RECONSTRUCTION, RunRecord
from mipp.experiments.runner import Runner, run_sweep
from mipp.experiments.store import ResultStore, stable_view





@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    counts = run_sweep(SweepConfig(**TINY), out, progress=False)
    return out, counts


def by_id(out) -> dict:
    return {r.run_id: r for r in ResultStore(out).records()}


def test_sweep_runs_everything_and_records_every_metric(full_sweep):
    out, counts = full_sweep
    assert counts == {"out": str(out), "runs": N_RUNS, "already": 0, "done": N_RUNS, "skipped": 0, "failed": 0,
                      "elsewhere": 0}
    records = by_id(out)
    assert len(records) == N_RUNS
    for r in records.values():
        assert r.status == "done" and set(r.finetune) == {"0", "1"}
        assert abs(r.removed["units"] - r.target) < 0.03
        assert set(r.units_kept) == set(r.layers) == set(r.kept_fraction)
        assert 0 <= r.pruned["test_accuracy"] <= 1 and 0 <= r.pruned["train_accuracy"] <= 1
        assert r.selection["seconds"] > 0 and r.selection["peak_rss_mb"] is not None
        assert set(r.collapse) >= {"guard", "untrainable", "any"}
        assert r.config["seed"] == r.seed and "torch" in r.versions
    trained = [r for r in records.values() if r.regime == "trained"]
    assert {r.base["dir"] for r in trained} == {p.name for p in (out / "base").iterdir()}  # one per seed
    assert all(r.base["test_accuracy"] > 0.6 for r in trained)


def test_rerun_skips_every_finished_run(full_sweep, monkeypatch):
    out, _ = full_sweep

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr("mipp.api.select_plan", fail)
    monkeypatch.setattr(Runner, "_finetune", fail)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    counts = run_sweep(SweepConfig(**TINY), out, progress=False)
    assert counts["already"] == N_RUNS and counts["done"] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}


class Stop(Exception):
    pass


def test_interrupted_sweep_resumes_to_the_same_results(full_sweep, tmp_path, monkeypatch):
    from mipp.train import _Trainer

    config = SweepConfig(**TINY)
    seen = []

    def stop_after_three(record):  # 1) between runs
        seen.append(record.run_id)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(config, tmp_path, progress=False, on_record=stop_after_three)
    assert len(ResultStore(tmp_path).records()) == 3

    original_epoch = _Trainer.train_epoch

    def interrupt_base_training(self):  # 2) inside the base model's training, after its first epoch
        if self.path is not None and self.path.name == "train-state.pt" and self.epoch == 1:
            raise KeyboardInterrupt
        original_epoch(self)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(_Trainer, "train_epoch", interrupt_base_training)
        run_sweep(config, tmp_path, progress=False)
    base_dir = next((tmp_path / "base").iterdir())
    assert (base_dir / "train-state.pt").exists() and not (base_dir / "model.pt").exists()

    def interrupt_finetuning(*args, **kwargs):  # 3) inside a run, after its pruning stage was saved
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Runner, "_finetune", interrupt_finetuning)
        run_sweep(config, tmp_path, progress=False)
    assert "partial" in {r.status for r in ResultStore(tmp_path).records()}

    counts = run_sweep(config, tmp_path, progress=False)
    assert counts["done"] + counts["already"] == N_RUNS and counts["failed"] == 0
    resumed, uninterrupted = by_id(tmp_path), by_id(full_sweep[0])
    assert resumed.keys() == uninterrupted.keys()
    for run_id, record in uninterrupted.items():
        assert stable_view(resumed[run_id]) == stable_view(record), run_id


def test_new_budget_extends_finished_runs_without_selecting_again(full_sweep, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(full_sweep[0], tmp_path / "store")
    monkeypatch.setattr("mipp.api.select_plan", lambda *a, **k: pytest.fail("selection was redone"))
    config = SweepConfig(**{**TINY, "seeds": [0], "regimes": ["trained"], "methods": ["random"],
                            "finetune_epochs": [0, 1, 2]})
    counts = run_sweep(config, tmp_path / "store", progress=False)
    assert counts["done"] == 2
    for record in ResultStore(tmp_path / "store").records():
        if record.regime == "trained" and record.method == "random" and record.seed == 0:
            assert set(record.finetune) == {"0", "1", "2"}


def test_inapplicable_methods_are_skipped_with_a_reason(tmp_path):
    config = SweepConfig(**{**TINY, "methods": ["snip", "taylor", {"name": "random", "targets": [None]}],
                            "targets": [0.5], "seeds": [0], "finetune_epochs": [0]})
    counts = run_sweep(config, tmp_path, progress=False)
    assert (counts["done"], counts["skipped"]) == (2, 4)
    status = {(r.method, r.regime): (r.status, r.reason) for r in ResultStore(tmp_path).records()}
    assert status["snip", "init"][0] == status["taylor", "trained"][0] == "done"
    assert "init regime only" in status["snip", "trained"][1]
    assert "trained regime only" in status["taylor", "init"][1]
    assert "needs a target" in status["random", "init"][1]


def test_a_method_entry_can_name_the_regimes_it_runs_in():
    config = SweepConfig(**{**TINY, "methods": [{"name": "tp-l1", "regimes": ["trained"]}, "random"],
                            "targets": [0.5], "seeds": [0]})
    runs = expand(config)
    assert sorted((r.method["label"], r.regime) for r in runs) == [
        ("random", "init"), ("random", "trained"), ("tp-l1", "trained")]
    everywhere = expand(SweepConfig(**{**TINY, "methods": ["tp-l1"], "targets": [0.5], "seeds": [0]}))
    trained = [r for r in everywhere if r.regime == "trained"]
    assert [r.run_id for r in runs if r.method["label"] == "tp-l1"] == [r.run_id for r in trained]  # same ids
    with pytest.raises(ValueError, match="unknown regime"):
        expand(SweepConfig(**{**TINY, "methods": [{"name": "random", "regimes": ["pretrained"]}]}))


def test_run_ids_are_stable_and_ignore_budgets_paths_and_device():
    runs = expand(SweepConfig(**TINY))
    assert len(runs) == N_RUNS and len({r.run_id for r in runs}) == N_RUNS
    other = expand(SweepConfig(**{**TINY, "finetune_epochs": [0, 5], "device": "cpu", "data_root": "/x"}))
    assert [r.run_id for r in runs] == [r.run_id for r in other]
    assert runs[0].run_id != expand(SweepConfig(**{**TINY, "n_samples": 300}))[0].run_id
    with pytest.raises(ValueError, match="unknown sweep config key"):
        SweepConfig.from_dict({"modells": ["mlp"]})
    with pytest.raises(ValueError, match="unknown pruning method"):
        expand(SweepConfig(**{**TINY, "methods": ["nope"]}))


def test_figure_legend_names_methods_drawn_in_one_panel_only():
    """Trained-only baselines (Taylor, ThiNet) appear only in the lower panels: the legend must still name them."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(2, 2, squeeze=False)
    axes[0][0].plot([0, 1], [0, 1], label="synflow")
    axes[0][1].plot([0, 1], [0, 1], label="mipp")
    axes[1][1].plot([0, 1], [1, 0], label="taylor")
    axes[1][0].plot([0, 1], [1, 0], label="mipp")
    assert list(figures.figure_legend_entries(axes)) == ["synflow", "mipp", "taylor"]
    figures.legend(fig, axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["synflow", "mipp", "taylor"]
    plt.close(fig)


def test_report_writes_tables_and_figures(full_sweep, tmp_path):
    from mipp.cli import main

    out = tmp_path / "docs"
    for stale in (out / "figures" / "accuracy_gone_store.png", out / "tables" / "winloss.csv"):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("from an earlier report")
    assert main(["report", "--runs", str(full_sweep[0]), "--out", str(out), "--json"]) == 0
    assert (out / "results.md").exists()
    assert not (out / "figures" / "accuracy_gone_store.png").exists() and not (out / "tables" / "winloss.csv").exists()
    for name in ("accuracy", "collapse", "layers", "finetune"):
        assert (out / "figures" / f"{name}_mlp_synthetic.png").stat().st_size > 5000
    assert (out / "figures" / "selection_cost.png").exists()
    rows = (out / "tables" / "runs.csv").read_text().splitlines()
    assert len(rows) == N_RUNS + 1 and "acc_ft1" in rows[0]
    summary = (out / "tables" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2 * 2 * 2  # regimes x methods x targets, each over 2 seeds
    with open(out / "tables" / "summary.csv") as handle:
        assert all(row["n"] == "2" for row in csv.DictReader(handle))
    text = (out / "results.md").read_text()
    assert "## mlp on synthetic" in text and "| mipp |" in text and "| random |" in text
    assert "MIPP against each baseline" in text and "mipp sweep --config" in text
    with open(out / "tables" / "paired.csv") as handle:
        pairs = list(csv.DictReader(handle))
    # regimes x stages (right after pruning, after 1 epoch), MIPP against its one baseline, 2 seeds each, at 30%
    # only: 60% of the 36 units is 21.6, so both methods remove 22 (61.1%), more than a point past the target
    assert len(pairs) == 2 * 2 and {(p["baseline"], p["kind"], p["n"], p["target"]) for p in pairs} == {
        ("random", "baseline", "2", "0.3")}
    assert "## Missed targets" in text
    with open(out / "tables" / "bases.csv") as handle:  # the two trained bases (seeds 0 and 1), 3 epochs each
        bases = list(csv.DictReader(handle))
    assert [(b["base"], b["epochs"], b["seeds"], b["training_images"]) for b in bases] == [
        ("mlp-synthetic", "3", "2", "")]
    assert float(bases[0]["train_loss_3_before"]) > 0 and "## Base models" in text
    with open(out / "tables" / "compute.csv") as handle:
        (compute,) = list(csv.DictReader(handle))
    assert (compute["runs"], compute["bases"]) == (str(N_RUNS), "2") and float(compute["hours"]) > 0
    assert float(compute["hours"]) == pytest.approx(float(compute["run_hours"]) + float(compute["base_hours"]))
    assert "interpolated" not in text.replace("nothing is interpolated", "")


def test_sweep_flags_override_the_config_file(tmp_path):
    from mipp.cli import build_parser
    from mipp.cli.experiments import sweep_config

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({**TINY, "comment": "a test"}))
    args = build_parser().parse_args(["sweep", "--config", str(path), "--out", str(tmp_path), "--seeds", "3",
                                      "--width", "0.5", "--deform", "--targets", "0.5,none", "--epochs", "2"])
    config = sweep_config(args)
    assert config.seeds == [3] and config.models[0]["width"] == 0.5 and config.data[0]["deform"] is True
    assert config.train == {"epochs": 2, "batch_size": 32} and config.methods == ["mipp", "random"]
    runs = expand(config)
    assert {r.target for r in runs} == {0.5, None} and runs[0].labels["data"] == "synthetic+deform"


def fake_record(method, target, seed, units, macs, acc, **fields):
    return RunRecord.from_dict({
        "format": "mipp-run/1", "run_id": f"{method}-{target}-{seed}", "status": "done", "model": "m", "data": "d",
        "method": method, "method_name": method, "regime": "trained", "target": target, "metric": "units",
        "seed": seed, "removed": {"units": units, "params": macs, "macs": macs}, "base": {"test_accuracy": 0.9},
        "pruned": {"test_accuracy": acc, "train_accuracy": acc},
        "finetune": {"0": {"test_accuracy": acc, "train_accuracy": acc}},
        "collapse": {"any": False, "guard": False}, "selection": {"seconds": 1.0, "peak_rss_mb": 1.0},
        "layers": ["a"], "kept_fraction": {"a": 1 - units}, "versions": {}, **fields})


def test_summary_gives_each_accuracy_its_interval_over_seeds(tmp_path):
    from scipy import stats

    store = ResultStore(tmp_path)
    for seed, accuracy in enumerate((0.78, 0.82, 0.80)):
        store.put(fake_record("mipp", 0.5, seed, 0.5, 0.4, accuracy))
    store.put(fake_record("random", 0.5, 0, 0.5, 0.4, 0.7))  # one seed: no interval
    done, _, _ = report.load([tmp_path])
    summary = {e["method"]: e for e in statistics.summarize(statistics.run_rows(done, ["pruned"]), ["pruned"])}
    half = stats.t.ppf(0.975, 2) * 0.02 / 3 ** 0.5
    assert summary["mipp"]["acc_pruned_ci"] == pytest.approx(half) and math.isnan(summary["random"]["acc_pruned_ci"])
    interval = f"[{80 - 100 * half:.1f}, {80 + 100 * half:.1f}]"
    assert tables.accuracy_cell(summary["mipp"], "pruned") == f"80.0 ± 2.0 {interval}"
    assert tables.accuracy_cell(summary["random"], "pruned") == "70.0"


def test_paired_differences_over_seeds_give_intervals_and_verdicts(tmp_path):
    """MIPP minus each baseline, paired by seed at the same directly run target, with a Student-t interval; runs
    that miss their target by more than a point are left out and listed."""
    from scipy import stats

    store = ResultStore(tmp_path)
    lead = {0: 0.02, 1: 0.03, 2: 0.04}  # MIPP ahead of random by 2, 3 and 4 points: interval 3 +- 2.48, ahead
    for seed in range(3):
        store.put(fake_record("mipp", 0.5, seed, 0.5, 0.4, 0.80 + lead[seed]))
        store.put(fake_record("random", 0.5, seed, 0.5, 0.6, 0.80))
        store.put(fake_record("magnitude", 0.5, seed, 0.5, 0.6, 0.80 + lead[seed] + (0.01, -0.01, 0.0)[seed]))
    store.put(fake_record("mipp", 0.5, 3, 0.5, 0.4, 0.9))
    store.put(fake_record("random", 0.5, 3, 0.52, 0.6, 0.1))  # 2 points past its target: not compared
    done, _, _ = report.load([tmp_path])
    rows = statistics.run_rows(done, ["pruned"])
    pairs = {p["baseline"]: p for p in statistics.paired_differences(rows, ["pruned"])}
    half = stats.t.ppf(0.975, 2) * 0.01 / 3 ** 0.5
    assert pairs["random"]["n"] == 3 and pairs["random"]["missed"] == 1
    assert pairs["random"]["difference"] == pytest.approx(0.03)
    assert pairs["random"]["ci_low"] == pytest.approx(0.03 - half) and pairs["random"]["verdict"] == "ahead"
    assert pairs["magnitude"]["verdict"] == "even" and pairs["magnitude"]["n"] == 3
    assert [(m["method"], m["seed"]) for m in statistics.missed_targets(rows)] == [("random", 3)]
    section = tables.paired_section(list(pairs.values()), ["pruned"])
    assert f"| random | +3.0 [{100 * (0.03 - half):+.1f}, {100 * (0.03 + half):+.1f}] ahead |" in section
    assert "| magnitude | +0.0 [-2.5, +2.5] even |" in section


def test_findings_count_the_verdicts_name_every_loss_and_replace_the_readme_block(tmp_path):
    from mipp.experiments.findings import END, START, block_of, findings, replace_block

    pair = dict(model="m", data="d", regime="trained", metric="macs", reference="mipp", n=3, stage="pruned",
                reference_accuracy=0.8, baseline_accuracy=0.7, difference=0.1, ci_low=0.05, ci_high=0.15,
                verdict="ahead", kind="baseline")
    pairs = [{**pair, "baseline": "random", "target": 0.5},
             {**pair, "baseline": "random", "target": 0.9, "reference_accuracy": 0.6, "baseline_accuracy": 0.62,
              "difference": -0.02, "ci_low": -0.03, "ci_high": -0.01, "verdict": "behind"},
             {**pair, "baseline": "tp-l1", "target": 0.5, "difference": -0.01, "ci_low": -0.05, "verdict": "even"},
             {**pair, "baseline": "tp-l1", "target": 0.9, "reference_accuracy": 0.6, "difference": 0.01,
              "verdict": "even"},
             {**pair, "baseline": "tp-l1", "target": 0.9, "stage": "ft1", "reference_accuracy": 0.7,
              "difference": 0.01, "verdict": "even"},
             # one seed has no interval: counted apart, not as "not distinguishable"
             {**pair, "baseline": "random", "target": 0.9, "stage": "ft1", "reference_accuracy": 0.7, "n": 1,
              "difference": 0.01, "verdict": "n<2"},
             # a MIPP variant is an ablation, and another variant's pairs stay out of the headline
             {**pair, "baseline": "mipp-greedy", "target": 0.5, "kind": "ablation"},
             {**pair, "baseline": "random", "target": 0.5, "reference": "mipp-mean", "verdict": "behind"}]
    text = findings(pairs, [])
    assert text.startswith(START) and text.rstrip().endswith(END)
    # model / data | regime | targets | seeds | stage | MIPP | baselines | ahead | not distinguishable | behind | lower
    assert "| m / d | trained | 50 / 90% MACs | 3 | right after pruning | 80.0 / 60.0 | 2 | 1 | 2 | 1 | 2 |" in text
    assert "| m / d | trained | 90% MACs | 3 | after 1 epoch(s) | 70.0 | 2 | 0 | 1 (+1 over one seed) | 0 | 0 |" in text
    assert "- right after pruning: MIPP ahead in 1 of 4, behind in 1, not distinguishable in 2." in text
    assert ("- after 1 epoch(s): MIPP ahead in 0 of 2, behind in 0, not distinguishable in 1, over one seed only (no "
            "interval yet) 1." in text)
    assert ("- m / d, trained, 90% of MACs, right after pruning: random -2.0 [-3.0, -1.0] (MIPP 60.0%, random 62.0%)"
            in text)
    assert "- m / d, trained, MACs, right after pruning: tp-l1 at 50% -1.0" in text
    assert "| m / d | trained | 50% MACs | right after pruning | mipp-greedy | +10.0 [+5.0, +15.0] ahead |" in text
    assert "mipp-mean" not in text.split("Ablations")[0].split("|---|")[-1]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{START}\nold numbers\n{END}\n\nafter\n")
    replace_block(readme, text)
    assert block_of(readme) == text and readme.read_text().startswith("intro\n\n")
    assert readme.read_text().endswith(f"{END}\n\nafter\n")
    readme.write_text("no block\n")
    with pytest.raises(ValueError, match="has no findings block"):
        replace_block(readme, text)


def test_findings_compare_nets_pruned_at_initialisation_after_training_only_and_show_reached_costs():
    from mipp.experiments.findings import findings

    pair = dict(model="m", data="d", metric="macs", reference="mipp", n=3, target=0.5, reference_accuracy=0.8,
                baseline_accuracy=0.7, difference=0.1, ci_low=0.05, ci_high=0.15, verdict="ahead", kind="baseline",
                baseline="random")
    text = findings([{**pair, "regime": "init", "stage": "pruned", "reference_accuracy": 0.11},
                     {**pair, "regime": "init", "stage": "ft5"},
                     {**pair, "regime": "trained", "stage": "pruned", "kind": "ablation",
                      "baseline": "mipp-uniform (at its cost)", "removed": 0.513}], [])
    assert "| m / d | init | 50% MACs | 3 | after 5 epoch(s) | 80.0 | 1 | 1 | 0 | 0 | 0 |" in text
    assert "| right after pruning | 11.0 |" not in text  # an untrained net: every method at chance
    assert "| 50% MACs (reached 51.3) | right after pruning | mipp-uniform (at its cost) | +10.0" in text


def test_layer_collapse_is_counted_per_target_for_mipp_against_the_baselines(tmp_path):
    from mipp.experiments.findings import findings

    store = ResultStore(tmp_path)
    for seed in range(2):
        for method, target, guard in (("mipp", 0.5, False), ("mipp", 0.9, seed == 0), ("random", 0.5, True),
                                      ("random", 0.9, False), ("tp-l1", 0.5, False), ("tp-l1", 0.9, True),
                                      ("mipp-mean", 0.9, True)):
            store.put(fake_record(method, target, seed, target, target, 0.8, method_name=method.split("-")[0]
                                  if method.startswith("mipp") else method,
                                  collapse={"any": guard, "guard": guard}))
    done, _, _ = report.load([tmp_path])
    summary = statistics.summarize(statistics.run_rows(done, ["pruned"]), ["pruned"])
    text = findings([], [], [], summary)
    # MIPP collapsed in 0 of 2 runs at 50% (random in both: more often) and 1 of 2 at 90% (random never, tp-l1
    # always); its own variant mipp-mean is not a baseline
    assert "| m / d | trained | 50 / 90% units | 0/2, 1/2 | 0, 1 | 1, 1 |" in text
    section = tables.model_section("m", "d", 0.9, summary, ["pruned"], {})
    assert "**trained, runs with layer collapse**" in section and "| random | 2/2 | 0/2 |" in section


def test_removing_90_percent_of_lenet5_macs_leaves_one_first_layer_channel_whatever_the_method():
    """The findings say so of every method's collapse at 90% of LeNet-5's MACs: two channels in its first layer
    and one unit in every other layer remove less than 90%."""
    from mipp.api import make_context
    from mipp.models.registry import build_model

    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28)  # Fashion-MNIST's shape
    ctx = make_context(model, torch.randn(4, 1, 28, 28), n_samples=4)
    first = next(g for g in ctx.units.groups if g.key == "features.0")
    assert first.size == 6
    kept = {g.key: [0] for g in ctx.units.groups} | {first.key: [0, 1]}
    assert ctx.cost.fractions_removed(kept)["macs"] < 0.9


def test_the_default_mipp_is_paired_with_its_variants_as_ablations_and_no_variant_is_a_baseline(tmp_path):
    store = ResultStore(tmp_path)
    for seed in range(2):
        for method, name, accuracy in (("mipp", "mipp", 0.8), ("mipp-mean", "mipp", 0.75),
                                       ("mipp-widths-random", "mipp-widths", 0.7), ("random", "random", 0.6)):
            store.put(fake_record(method, 0.5, seed, 0.5, 0.5, accuracy + 0.01 * seed, method_name=name))
    done, _, _ = report.load([tmp_path])
    pairs = statistics.paired_differences(statistics.run_rows(done, ["pruned"]), ["pruned"])
    found = {(p["reference"], p["baseline"], p["kind"]): round(p["difference"], 6) for p in pairs}
    assert found == {("mipp", "random", "baseline"): 0.2, ("mipp", "mipp-mean", "ablation"): 0.05,
                     ("mipp", "mipp-widths-random", "ablation"): 0.1, ("mipp-mean", "random", "baseline"): 0.15}


def test_an_ablation_that_misses_its_target_is_compared_with_mipp_at_the_cost_it_reached(tmp_path):
    """mipp-uniform keeps one share of every layer and can miss a target; MIPP run at the very cost each of its
    runs reached ("mipp@mipp-uniform", a matched run) is paired with it instead of the direct run."""
    store = ResultStore(tmp_path)
    for seed in range(3):
        store.put(fake_record("mipp", 0.5, seed, 0.5, 0.5, 0.80 + 0.01 * seed))
        store.put(fake_record("mipp-uniform", 0.5, seed, 0.53, 0.5, 0.70, method_name="mipp-uniform"))
        store.put(fake_record("mipp-greedy", 0.5, seed, 0.5, 0.5, 0.79 + 0.01 * seed, method_name="mipp"))
        reached = 0.53 + (0.02 if seed == 2 else 0.0)  # seed 2's run missed the uniform one's cost: left out
        store.put(fake_record("mipp@mipp-uniform", reached, seed, reached, 0.5, 0.75 + 0.01 * seed,
                              method_name="mipp", run_id=f"at-{seed}",
                              matched={"label": "mipp-uniform", "run_id": f"mipp-uniform-0.5-{seed}"}))
    done, _, _ = report.load([tmp_path])
    every_row = statistics.run_rows(done, ["pruned"])
    rows = [r for r in every_row if not r["matched"]]
    direct = statistics.paired_differences(rows, ["pruned"])
    assert {p["baseline"] for p in direct if p["kind"] == "ablation"} == {"mipp-greedy"}  # uniform missed 50%
    pairs = {p["baseline"]: p for p in statistics.at_reached_cost(every_row, direct, ["pruned"])}
    at = pairs["mipp-uniform (at its cost)"]
    assert (at["kind"], at["reference"], at["target"], at["n"], at["missed"]) == ("ablation", "mipp", 0.5, 2, 1)
    assert at["difference"] == pytest.approx(0.055) and at["reference_accuracy"] == pytest.approx(0.755)
    assert at["removed"] == pytest.approx(0.53)  # what the ablation's runs reached
    assert pairs["mipp-greedy"]["difference"] == pytest.approx(0.01)
    assert statistics.matched_differences(every_row, ["pruned"]) == []  # not a baseline at MIPP's chosen sparsity
    # where the ablation did reach its target, the pair at its cost replaces the direct one
    for seed in range(3):
        store.put(fake_record("mipp-uniform", 0.5, seed, 0.5, 0.5, 0.70, method_name="mipp-uniform"))
        store.put(fake_record("mipp@mipp-uniform", 0.5, seed, 0.5, 0.5, 0.76, method_name="mipp",
                              run_id=f"at-{seed}", matched={"label": "mipp-uniform",
                                                            "run_id": f"mipp-uniform-0.5-{seed}"}))
    done, _, _ = report.load([tmp_path])
    every_row = statistics.run_rows(done, ["pruned"])
    direct = statistics.paired_differences([r for r in every_row if not r["matched"]], ["pruned"])
    assert "mipp-uniform" in {p["baseline"] for p in direct}
    pairs = statistics.at_reached_cost(every_row, direct, ["pruned"])
    assert sorted(p["baseline"] for p in pairs if p["kind"] == "ablation") == ["mipp-greedy",
                                                                               "mipp-uniform (at its cost)"]
    assert next(p for p in pairs if p["baseline"].startswith("mipp-uniform"))["difference"] == pytest.approx(0.06)


def test_targets_of_different_metrics_stay_apart_in_tables(tmp_path):
    store = ResultStore(tmp_path)
    store.put(fake_record("mipp", 0.5, 0, 0.5, 0.8, 0.6))
    store.put(fake_record("mipp", 0.5, 0, 0.3, 0.5, 0.8, metric="macs", run_id="macs"))
    store.put(fake_record("random", 0.5, 0, 0.5, 0.5, 0.7))
    done, _, _ = report.load([tmp_path])
    summary = statistics.summarize(statistics.run_rows(done, ["pruned"]), ["pruned"])
    assert sorted((e["method"], e["metric"]) for e in summary) == [("mipp", "macs"), ("mipp", "units"),
                                                                   ("random", "units")]
    table = tables.pivot([e for e in summary if e["method"] == "mipp"], lambda e: tables.pct(e["acc_pruned"]))
    assert "| method | 50% | 50% MACs |" in table and "| mipp | 60.0 | 80.0 |" in table


def test_deformed_section_pairs_each_run_with_its_clean_twin_by_seed(tmp_path):
    from scipy import stats

    store = ResultStore(tmp_path)
    for data, accuracy in (("d", 0.8), ("d+deform", 0.6)):
        for seed in (0, 1, 2):
            drop = 0.01 * seed if data == "d+deform" else 0.0  # changes of -20, -21 and -22 points
            store.put(fake_record("mipp", 0.5, seed, 0.5, 0.5, accuracy - drop, data=data,
                                  run_id=f"{data}-{seed}"))
    store.put(fake_record("random", 0.5, 0, 0.5, 0.5, 0.7, run_id="clean-only"))  # no deformed twin
    done, _, _ = report.load([tmp_path])
    rows = statistics.deformed_rows(statistics.run_rows(done, ["pruned"]), ["pruned"])
    assert len(rows) == 1 and rows[0]["method"] == "mipp" and rows[0]["n"] == 3
    cell = rows[0]["pruned"]
    half = stats.t.ppf(0.975, 2) * 0.01 / 3 ** 0.5
    assert cell["clean"] == pytest.approx(0.8) and cell["deformed"] == pytest.approx(0.59)
    assert cell["change"] == pytest.approx(-0.21) and cell["ci_high"] == pytest.approx(-0.21 + half)
    assert cell["verdict"] == "behind"
    assert f"80.0 -> 59.0 (-21.0 [{-21 - 100 * half:+.1f}, {-21 + 100 * half:+.1f}])" in tables.deformed_section(rows)
    assert tables.deformed_csv(rows)[0]["change_pruned"] == pytest.approx(-0.21)


def test_deform_is_fixed_per_class_and_differs_between_classes():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 12, 12, generator=g)
    images = torch.cat([image, image, image, torch.rand(1, 1, 12, 12, generator=g)])
    data = ArrayDataset(images, torch.tensor([0, 0, 1, 1]), name="toy", split="train")
    warped = deformed(data, seed=3)
    assert torch.equal(warped.images, deformed(data, seed=3).images)  # deterministic
    assert torch.equal(warped.images[0], warped.images[1])  # one transformation per class
    assert not torch.allclose(warped.images[0], warped.images[2], atol=1e-3)  # another for another class
    assert not torch.allclose(warped.images[0], image[0], atol=1e-3)  # and it does change the image
    test_split = ArrayDataset(image, torch.tensor([1]), split="test")
    assert torch.equal(deformed(test_split, seed=3).images[0], warped.images[2])  # the same for every split
    assert not torch.equal(deformed(data, seed=4).images, warped.images)
    assert torch.equal(warped.labels, data.labels) and warped.name == "toy+deform"
    with pytest.raises(ValueError, match="in-memory"):
        deformed([(image[0], 0)], seed=0)


def test_deform_per_image_draws_from_a_fixed_set_independently_of_the_label():
    """The paper's study: each image gets one of a fixed set of transformations at random, with equal probability,
    fixed for the run; the choice does not depend on the label, so the deformation cannot give the label away."""
    from mipp.data.deform import transform

    image = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    n = 400
    labels = torch.arange(n) % 2
    data = ArrayDataset(image.expand(n, 1, 12, 12).clone(), labels, name="toy", split="train")
    warped = deformed(data, seed=3, per="image", transforms=4)
    assert torch.equal(warped.images, deformed(data, seed=3, per="image", transforms=4).images)  # fixed
    distinct = torch.unique(warped.images.flatten(1), dim=0)
    assert len(distinct) == 4  # the same image went through exactly the 4 transformations of the set
    for index in range(4):  # each transformation is used about equally often, and by both labels alike
        theta, order = transform(3, index, 12, 12)
        grid = torch.nn.functional.affine_grid(theta[None], [1, 1, 12, 12], align_corners=False)
        one = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                                              align_corners=False).flatten(2)[:, :, order].view(1, 12, 12)
        users = torch.nonzero((warped.images == one).flatten(1).all(1)).flatten()
        assert 60 <= len(users) <= 140 and set(labels[users].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="per must be one of"):
        deformed(data, per="batch")


def test_shards_split_the_runs_and_never_share_a_base_model():
    from mipp.experiments.runner import shard_runs

    runs = expand(SweepConfig(**{**TINY, "seeds": [0, 1, 2]}))
    shards = [shard_runs(runs, i, 2) for i in range(2)]
    assert sorted(r.run_id for s in shards for r in s) == sorted(r.run_id for r in runs)
    owners = [{json.dumps(r.base_identity(), sort_keys=True) for r in s if r.regime == "trained"} for s in shards]
    assert owners[0] and owners[1] and not owners[0] & owners[1]


# the planted network has units its confidence mode removes (the tiny MLP keeps every unit)
MATCHED = dict(name="matched", models=["planted"], data=["planted"], regimes=["trained"], finetune_epochs=[0],
               seeds=[0, 1], latency=False,
               methods=[{"name": "mipp", "label": "mipp-x0.9", "options": {"confidence": 0.9}, "targets": [None]},
                        {"name": "random", "targets": ["as:mipp-x0.9"]},
                        {"name": "magnitude-l1", "targets": [{"as": "mipp-x0.9"}]}])


def test_matched_targets_remove_what_the_run_they_match_removed(tmp_path):
    runs = expand(SweepConfig(**MATCHED))
    references = {r.seed: r.run_id for r in runs if r.method["label"] == "mipp-x0.9"}
    matched = [r for r in runs if r.method["label"] != "mipp-x0.9"]
    assert all(r.target == {"as": "mipp-x0.9", "run": references[r.seed]} for r in matched)
    assert all(runs.index(r) > runs.index(next(m for m in runs if m.run_id == references[r.seed])) for r in matched)
    for index in range(2):  # a matched run goes to the shard of the run it matches
        from mipp.experiments.runner import shard_runs

        mine = shard_runs(runs, index, 2)
        assert {r.target["run"] for r in mine if isinstance(r.target, dict)} <= {r.run_id for r in mine}
    counts = run_sweep(SweepConfig(**MATCHED), tmp_path, progress=False)
    assert counts["done"] == 6, counts
    records = {(r.method, r.seed): r for r in ResultStore(tmp_path).records()}
    for seed in (0, 1):
        chose = records["mipp-x0.9", seed]
        assert chose.target is None and 0 < chose.removed["units"] < 1
        for label in ("random", "magnitude-l1"):
            record = records[label, seed]
            assert record.matched == {"label": "mipp-x0.9", "run_id": chose.run_id}
            assert record.target == chose.removed["units"]
            assert abs(record.removed["units"] - chose.removed["units"]) <= 0.03
    built = report.build_report([tmp_path], tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert "## Every baseline at the sparsity MIPP chose" in text and "`mipp-x0.9`" in text
    # the intro counts the matched runs apart from the runs at fixed targets, and the total counts both
    assert "from 2 finished runs at fixed targets and 4 more made at the sparsity another run reached" in text
    assert built["runs"] == 6
    pairs = statistics.matched_differences(
        statistics.run_rows(ResultStore(tmp_path).records(), ["pruned"]), ["pruned"])
    assert {(p["reference"], p["baseline"], p["n"]) for p in pairs} == {("mipp-x0.9", "random", 2),
                                                                        ("mipp-x0.9", "magnitude-l1", 2)}


def test_a_matched_target_of_a_label_with_several_targets_gives_one_run_per_run_of_that_label():
    config = SweepConfig(**{**MATCHED, "targets": [0.3, 0.6], "methods": [
        "mipp-uniform", {"name": "mipp", "label": "mipp@mipp-uniform", "targets": ["as:mipp-uniform"]}]})
    runs = expand(config)
    uniform = [r for r in runs if r.method["label"] == "mipp-uniform"]
    matched = [r for r in runs if r.method["label"] == "mipp@mipp-uniform"]
    assert len(uniform) == len(matched) == 4  # 2 seeds x 2 targets
    for run in matched:
        reference = next(r for r in uniform if r.run_id == run.target["run"])
        assert reference.seed == run.seed and runs.index(reference) < runs.index(run)
    assert len({r.run_id for r in matched}) == 4


def test_matched_targets_name_a_label_with_one_target_per_seed():
    with pytest.raises(ValueError, match="names no method label"):
        expand(SweepConfig(**{**MATCHED, "methods": ["mipp", {"name": "random", "targets": ["as:mipp-x0.9"]}]}))
    with pytest.raises(ValueError, match="targets of its own"):  # matching a matched run
        expand(SweepConfig(**{**MATCHED, "methods": MATCHED["methods"] + [
            {"name": "random", "label": "again", "targets": ["as:magnitude-l1"]}]}))
    with pytest.raises(ValueError, match="matched target"):
        expand(SweepConfig(**{**MATCHED, "methods": ["mipp", {"name": "random", "targets": [{"as": 3}]}]}))


def test_committed_result_stores_are_not_git_ignored():
    """Run records under results/<store>/runs are committed; an ignore rule for runs/ once swallowed them all."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs git and a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/some-store/runs/0123abcd.json"], cwd=root)
    assert ignored.returncode == 1, "results/*/runs/*.json is git-ignored: run records would never be committed"
    top_level = subprocess.run(["git", "check-ignore", "-q", "runs/demo/model.pt"], cwd=root)
    assert top_level.returncode == 0


ROOT = Path(__file__).resolve().parents[1]


def run_ids(pattern: str) -> set[str]:
    return {r.run_id for path in sorted(ROOT.glob(pattern)) for r in expand(SweepConfig.load(path))}


def test_committed_configs_give_the_run_ids_of_the_committed_records():
    """Run ids are hashes of a run's identity: the configs must still name exactly the records under results/ (the
    protocol's, configs/protocol/, runs over several sessions: its records are some of the runs it names)."""
    committed = {path.stem for path in ROOT.glob("results/*/runs/*.json")}
    if not committed:
        pytest.skip("no committed result stores in this checkout")
    finished = run_ids("configs/*.json")
    assert finished <= committed, "a config names runs that no record holds"
    assert committed - finished <= run_ids("configs/protocol/*.json"), "records that no config names"


def test_committed_records_load_and_serialise_to_the_same_text():
    """RunRecord's JSON is the run-record format: done, skipped and planted records round-trip byte for byte."""
    paths = sorted(ROOT.glob("results/*/runs/*.json"))
    if not paths:
        pytest.skip("no committed result stores in this checkout")
    statuses, planted = set(), 0
    for path in paths[::25] + sorted(ROOT.glob("results/planted/runs/*.json"))[:3]:
        text = path.read_text()
        record = RunRecord.from_dict(json.loads(text))
        assert json.dumps(record.to_dict(), indent=2) + "\n" == text, path
        statuses.add(record.status)
        planted += record.planted is not None
    # a protocol store that runs over several sessions may hold a cut (partial) or failed run
    assert {"done", "skipped"} <= statuses <= {"done", "skipped", "partial", "failed"} and planted >= 3


def test_run_record_checks_its_fields():
    with pytest.raises(ValueError, match="unknown run record field"):
        RunRecord.from_dict({"run_id": "x", "status": "done", "colapse": {}})
    with pytest.raises(ValueError, match="is not 'mipp-run/1'"):
        RunRecord.from_dict({"format": "mipp-run/0", "run_id": "x", "status": "done"})
    record = RunRecord(run_id="x", status="skipped", reason="why")
    assert list(record.to_dict()) == ["format", "run_id", "status", "reason", "model", "data", "method",
                                      "method_name", "regime", "target", "metric", "seed", "config", "versions"]


PLANTED = dict(name="planted", models=["planted"], data=["planted"], methods=["random"], targets=[0.25],
               seeds=[1], regimes=["init", "trained"], finetune_epochs=[0], latency=False)


def test_planted_network_runs_as_given_on_its_own_data(tmp_path):
    from mipp.models.planted import TRUTH, planted_examples, planted_network

    counts = run_sweep(SweepConfig(**PLANTED), tmp_path, progress=False)
    assert (counts["done"], counts["skipped"]) == (1, 1)
    records = {r.regime: r for r in ResultStore(tmp_path).records()}
    assert "pruned as given (trained regime) only" in records["init"].reason
    trained = records["trained"]
    assert trained.base["test_accuracy"] == 1.0 and trained.base["dir"].startswith("planted-planted-s1")
    assert not (tmp_path / "base").exists()  # never trained
    assert set(trained.planted) == {"dead_removed", "relations_resolved", "unique_kept", "exact"}
    assert trained.planted == TRUTH.recovery(trained.plan["kept"])
    inputs, labels, classes = planted_examples(1, "test")
    assert inputs.shape == (1000, 1, 1, 10) and len(classes) == 4
    assert torch.equal(labels, planted_network(1)(inputs).argmax(1))


def test_planted_network_and_its_data_go_together():
    for models, data in ((["planted"], ["synthetic"]), (["mlp"], ["planted"])):
        with pytest.raises(ValueError, match="runs on its own data and nothing else"):
            expand(SweepConfig(**{**PLANTED, "models": models, "data": data}))


def test_committed_report_regenerates_from_the_committed_records(tmp_path, monkeypatch):
    """docs/results.md and docs/tables/*.csv are made from the run records under results/ and nothing else."""
    stores = sorted(str(path) for path in ROOT.glob("results/*") if (path / "runs").is_dir())
    if not stores or not (ROOT / "docs" / "results.md").exists():
        pytest.skip("no committed result stores or report in this checkout")
    relative = [str(Path(s).relative_to(ROOT)) for s in stores]
    monkeypatch.chdir(ROOT)  # the report names the stores as given, relative to the repository
    report.build_report(relative, tmp_path, command=f"mipp report --runs {' '.join(relative)} --out docs")
    assert (tmp_path / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text()
    assert (tmp_path / "findings.md").read_text() == (ROOT / "docs" / "findings.md").read_text()
    for committed in sorted((ROOT / "docs" / "tables").glob("*.csv")):
        assert (tmp_path / "tables" / committed.name).read_text() == committed.read_text(), committed.name


def test_repaired_sweep_reconstructs_every_method_apart_from_plain_runs(full_sweep, tmp_path):
    """--reconstruct/--recalibrate: new run ids and a "+rec+bn" model label; plain runs keep their ids; the
    repaired net right after pruning is the one fine-tuning starts from (rebuilt identically on resume)."""
    plain = set(by_id(full_sweep[0]))
    config = SweepConfig(**{**TINY, "regimes": ["trained"], "seeds": [0], "finetune_epochs": [0],
                            "reconstruct": True, "recalibrate": True})
    runs = expand(config)
    assert all(r.labels["model"] == "mlp+rec+bn" for r in runs) and not {r.run_id for r in runs} & plain
    assert {r.run_id for r in expand(SweepConfig(**TINY))} == plain
    counts = run_sweep(config, tmp_path, progress=False)
    assert counts["done"] == len(runs)
    records = list(by_id(tmp_path).values())
    assert all(r.model == "mlp+rec+bn" and r.timings["repair_seconds"] > 0 for r in records)
    runner, record = Runner(ResultStore(tmp_path), latency=False), records[0]
    spec = next(r for r in runs if r.run_id == record.run_id)
    splits = runner.splits(spec)
    base, _ = runner.base(spec, splits)
    from mipp.experiments.runner import pruned_copy
    from mipp.plan import Plan

    again = runner.scores(pruned_copy(spec, splits, base, Plan.from_dict(record.plan)), splits)
    without = record.pruned.pop(WITHOUT_RECONSTRUCTION)
    assert again == record.pruned and record.finetune["0"] == record.pruned
    # the same units without the re-fit are recorded too, and reported as their own stage
    plain_copy = pruned_copy(spec, splits, base, Plan.from_dict(record.plan), reconstruct=False)
    assert runner.scores(plain_copy, splits) == without
    record.pruned[WITHOUT_RECONSTRUCTION] = without
    assert record.accuracy("norec") == without["test_accuracy"]
    assert "norec" in statistics.stage_names(records)


def test_sequential_reconstruction_is_a_sweep_setting_of_its_own():
    """"reconstruct": "sequential" labels the model "+seq" and gives runs ids apart from the independent re-fit's
    (so both can sit in one store); a value that is no mode is refused when the config loads."""
    independent = expand(SweepConfig(**{**TINY, "reconstruct": True, "recalibrate": True}))
    sequential = expand(SweepConfig(**{**TINY, "reconstruct": "sequential", "recalibrate": True}))
    assert all(r.labels["model"] == "mlp+seq+bn" for r in sequential)
    assert not {r.run_id for r in sequential} & {r.run_id for r in independent}
    with pytest.raises(ValueError, match="reconstruct must be"):
        SweepConfig.from_dict({**TINY, "reconstruct": "both"})


def test_one_model_label_from_two_stores_is_reported_apart():
    """Each store trains its own base models: runs of one model label from two stores are never pooled as seeds."""
    import dataclasses

    from mipp.experiments.report import _apart
    from mipp.experiments.store import ResultStore

    real = next(iter(ResultStore(Path(__file__).resolve().parents[1] / "results" / "planted").records()))
    a = dataclasses.replace(real, model="lenet5+rec+bn", data="fashion-mnist")
    c = dataclasses.replace(real, model="vgg11", data="fashion-mnist")
    out = _apart([("store-one", a), ("store-two", a), ("store-one", c)])
    assert [r.model for r in out] == ["lenet5+rec+bn [store-one]", "lenet5+rec+bn [store-two]", "vgg11"]
