"""The README's main job: train LeNet-5 on Fashion-MNIST, prune it with MIPP and baselines, fine-tune, compare.

The baselines are named for what they do: random units; the L1 magnitude of each unit's weights ranked globally
over the whole network (which cuts whole layers to one unit at these budgets: a known weakness of global
magnitude ranking, not a bug), and the same L1 magnitude normalised per layer as Torch-Pruning does (its
MagnitudeImportance: group mean, then per-group mean normalisation); and Torch-Pruning's Hessian criterion (OBD,
the strongest baseline after fine-tuning in the committed LeNet-5 records). MIPP runs at each budget and once in
its own confidence mode, where it decides the sparsity itself (marked apart in the figure).

Every finished row is appended to OUT/rows.jsonl at once, so an interrupted demo resumes where it stopped without
redoing finished work. The table (OUT/results.md, OUT/results.json) and the figure (OUT/accuracy.png: accuracy
against units, parameters and MACs removed, right after pruning and after fine-tuning) are written at the end.
Progress: one labelled line per job, and bars (terminal) or periodic lines (elsewhere) inside each job.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mipp.api import select_plan
from mipp.checkpoint import load_model, save_model
from mipp.data import dataset_info, load_dataset
from mipp.io import atomic_write_text
from mipp.measure import count_macs, count_params
from mipp.models import build_model
from mipp.progress import Progress, format_seconds, quiet
from mipp.surgery import apply_plan
from mipp.train import TrainConfig, evaluate, fit
from mipp.units import example_input_for

log = logging.getLogger(__name__)

# What each method of the demo is, in the table and the figure.
LABELS = {
    "mipp": "MIPP",
    "random": "random units",
    "magnitude-l1": "L1 magnitude, global ranking",
    "tp-l1": "L1 magnitude, per-layer normalised (Torch-Pruning)",
    "tp-hessian": "Hessian / OBD (Torch-Pruning)",
}
CONFIDENCE_LABEL = "MIPP, confidence mode"


@dataclass
class DemoConfig:
    model: str = "lenet5"
    data: str = "fashion-mnist"
    data_root: str | None = None
    data_options: dict = field(default_factory=dict)  # e.g. {"n": 400} for the synthetic set
    epochs: int = 5
    budgets: tuple[float, ...] = (0.5, 0.7, 0.85)  # fractions of units removed
    methods: tuple[str, ...] = ("mipp", "random", "magnitude-l1", "tp-l1", "tp-hessian")
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    n_samples: int = 2000
    confidence: float = 0.95  # MIPP's own operating point, shown as an extra row
    seed: int = 0
    limit: int | None = None
    device: str = "auto"


def label(method: str) -> str:
    return LABELS.get(method, method)


def job_name(method: str, budget: float | None) -> str:
    if budget is None:
        return f"{CONFIDENCE_LABEL} (x = confidence)"
    return f"{label(method)} at {100 * budget:.0f}% of units"


def run_demo(out: str | Path, config: DemoConfig | None = None, *, progress: bool = True) -> dict:
    """Run (or resume) the demo into folder ``out``; returns the result (also written as results.json)."""
    config = config or DemoConfig()
    with (contextlib.nullcontext() if progress else quiet()):
        return _run(Path(out), config)


def _run(out: Path, config: DemoConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_set = load_dataset(config.data, "train", root=config.data_root, limit=config.limit, seed=config.seed,
                             **config.data_options)
    test_set = load_dataset(config.data, "test", root=config.data_root, seed=config.seed, **config.data_options)
    jobs = list(_jobs(config))
    saved = _load_rows(out / "rows.jsonl")
    rows = {job: saved[job] for job in jobs if job in saved}
    trained = (out / "base.pt").exists()
    with Progress(1 + len(jobs), "demo", "job", initial=len(rows) + trained) as bar:
        bar.status(f"training the base {config.model}")
        model, base = _trained_model(out, config, train_set, test_set)
        if "macs" not in base:  # a base model saved by an earlier version of the demo
            base.update(_size(model))
        if not trained:
            bar.update(1)
        for method, budget in jobs:
            if (method, budget) in rows:
                continue
            bar.status(job_name(method, budget))
            row = _prune_and_finetune(model, method, budget, config, train_set, test_set)
            rows[(method, budget)] = row
            with open(out / "rows.jsonl", "a") as handle:  # one finished row at a time: nothing lost on interrupt
                handle.write(json.dumps(row) + "\n")
            bar.update(1, note=f"{job_name(method, budget)}: {_row_line(row)}")
    result = {"base": base, "rows": list(rows.values()), "config": asdict(config),
              "labels": {m: label(m) for m in config.methods}, "seconds": time.perf_counter() - started}
    atomic_write_text(out / "results.md", render_table(result))
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    plot_results(result, out / "accuracy.png")
    result["files"] = [str(out / name) for name in ("results.md", "results.json", "accuracy.png")]
    return result


def _jobs(config: DemoConfig):
    if "mipp" in config.methods:
        yield "mipp", None  # confidence mode: MIPP decides the sparsity itself
    for budget in config.budgets:
        for method in config.methods:
            yield method, budget


def _size(model) -> dict:
    """Parameters, and MACs per image."""
    return {"params": count_params(model), "macs": count_macs(model, example_input_for(model, None))}


def _trained_model(out: Path, config: DemoConfig, train_set, test_set):
    path = out / "base.pt"
    if path.exists():
        model, record = load_model(path)
        return model, record["metrics"]
    info = dataset_info(config.data, root=config.data_root, **config.data_options)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        input_size=info.input_size)
    train_config = TrainConfig(epochs=config.epochs, seed=config.seed, device=config.device)
    started = time.perf_counter()
    fit(model, train_set, train_config, checkpoint_path=out / "base-train.pt",
        description=f"training the base {config.model}")
    metrics = evaluate(model, test_set)
    model = model.cpu()
    metrics.update(train_seconds=time.perf_counter() - started, **_size(model))
    save_model(path, model, metrics=metrics)
    return model, metrics


def _prune_and_finetune(model, method, budget, config, train_set, test_set) -> dict:
    options = {"confidence": config.confidence} if method == "mipp" else {}
    started = time.perf_counter()
    plan = select_plan(model, train_set, method=method, budget=budget, n_samples=config.n_samples,
                       seed=config.seed, **options)
    selection_seconds = time.perf_counter() - started
    pruned = apply_plan(copy.deepcopy(model), plan)  # traced again: the copy is another model (timed apart)
    after_pruning = evaluate(pruned, test_set)["accuracy"]
    row = {
        "method": method, "budget": budget, "label": CONFIDENCE_LABEL if budget is None else label(method),
        "units_removed": plan.stats["units_removed"], "params_removed": plan.stats["params_removed"],
        "macs_removed": plan.stats["macs_removed"], "units_kept": plan.units_kept, "units_total": plan.units_total,
        "params": count_params(pruned), "acc_pruned": after_pruning, "selection_seconds": selection_seconds,
        "guard_hits": plan.guard_hits,
    }
    started = time.perf_counter()
    row["acc_finetuned"] = _finetune(pruned, config, train_set, test_set)
    row["finetune_seconds"] = time.perf_counter() - started
    return row


def _finetune(model, config, train_set, test_set) -> float:
    tune = TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed + 1,
                       device=config.device, checkpoint_every=0)
    fit(model, train_set, tune, description="fine-tuning")
    return evaluate(model, test_set)["accuracy"]


def _row_line(row: dict) -> str:
    return (f"{100 * row['units_removed']:.1f}% of units, {100 * row['params_removed']:.1f}% of parameters, "
            f"{100 * row['macs_removed']:.1f}% of MACs removed; accuracy {100 * row['acc_pruned']:.1f}% -> "
            f"{100 * row['acc_finetuned']:.1f}% after fine-tuning ({format_seconds(row['selection_seconds'])} "
            f"selection, {format_seconds(row.get('finetune_seconds', 0))} fine-tuning)")


def _load_rows(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["method"], row["budget"])] = row
    return rows


def render_table(result: dict) -> str:
    """The Markdown table: what each method removed (units, parameters, MACs) and the accuracy it kept."""
    base = result["base"]
    units_total = next((r["units_total"] for r in result["rows"] if "units_total" in r), None)
    size = f"{base['params']:,} parameters"
    if base.get("macs"):
        size += f", {base['macs'] / 1e6:.2f} M MACs per image"
    if units_total:
        size += f", {units_total} prunable units"
    lines = [
        f"Base model: test accuracy {100 * base['accuracy']:.2f}%, {size}.",
        "",
        "| method | budget | units removed | params removed | MACs removed | params left | layers cut to the "
        "minimum | acc. after pruning | acc. after fine-tuning | selection s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["budget"] or 0, r["method"] != "mipp", r["method"])):
        budget = f"{100 * row['budget']:.0f}% of units" if row["budget"] is not None else \
            f"confidence {result['config'].get('confidence', 0.95)}"
        tuned = row.get("acc_finetuned")
        params = f"{row['params']:,}" if "params" in row else "-"
        lines.append(
            f"| {row.get('label', label(row['method']))} (`{row['method']}`) | {budget} "
            f"| {100 * row['units_removed']:.1f}% | {100 * row['params_removed']:.1f}% "
            f"| {100 * row['macs_removed']:.1f}% | {params} | {', '.join(row.get('guard_hits') or []) or '-'} "
            f"| {100 * row['acc_pruned']:.2f}% "
            f"| {'-' if tuned is None else f'{100 * tuned:.2f}%'} | {row['selection_seconds']:.2f} |")
    lines += ["", "Budgets count units; the same unit budget removes very different shares of parameters and MACs "
              "depending on which layers a method prunes. \"Layers cut to the minimum\": the layers a method would "
              "have emptied or narrowed further, left at one unit by the collapse guard (a net whose last hidden "
              "layer is cut to one unit stays near chance even after fine-tuning)."]
    return "\n".join(lines) + "\n"


AXES = (("units_removed", "units removed (%)"), ("params_removed", "parameters removed (%)"),
        ("macs_removed", "MACs removed (%)"))
STAGES = (("acc_pruned", "right after pruning"), ("acc_finetuned", "after fine-tuning"))


def plot_results(result: dict, path: Path) -> None:
    """Accuracy against units, parameters and MACs removed (columns), right after pruning and after fine-tuning
    (rows); one line per method over the budgets, MIPP's confidence-mode point as a separate star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8), sharey="row")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for row_index, (stage, stage_title) in enumerate(STAGES):
        for col, (axis, axis_title) in enumerate(AXES):
            ax = axes[row_index][col]
            for index, method in enumerate(methods):
                points = sorted((r[axis], r[stage]) for r in result["rows"]
                                if r["method"] == method and r["budget"] is not None and r.get(stage) is not None)
                if points:
                    ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker="o",
                            color=colours[index % len(colours)], label=label(method))
            for r in result["rows"]:
                if r["budget"] is None and r.get(stage) is not None:
                    ax.plot([100 * r[axis]], [100 * r[stage]], marker="*", markersize=15, linestyle="none",
                            color="black", label=CONFIDENCE_LABEL)
            ax.axhline(100 * result["base"]["accuracy"], color="grey", linestyle="--", linewidth=1,
                       label="unpruned")
            ax.set_title(f"{stage_title}, by {axis_title.split(' removed')[0]}", fontsize=10)
            ax.set_xlabel(axis_title)
            ax.grid(alpha=0.3)
        axes[row_index][0].set_ylabel("test accuracy (%)")
    for ax in axes.flat:
        ax.set_xlim(0, 100)
    handles, names = axes[1][2].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"{result['config']['model']} on {result['config']['data']}: budgets in units; "
                 f"fine-tuning {result['config']['finetune_epochs']} epoch(s)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
