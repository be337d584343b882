"""The README's main job: train LeNet-5 on Fashion-MNIST, prune it with MIPP and baselines, fine-tune, compare.

Every finished row is appended to OUT/rows.jsonl at once, so an interrupted demo resumes where it stopped without
redoing finished work. The table (OUT/results.md) and the figure (OUT/accuracy.png) are written at the end.
"""
from __future__ import annotations

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
from mipp.measure import count_params
from mipp.methods import method_names
from mipp.models import build_model
from mipp.surgery import apply_plan
from mipp.train import TrainConfig, evaluate, fit

log = logging.getLogger(__name__)
TP_PREFIX = "tp-"  # the Torch-Pruning criteria; the demo shows the best of them at each budget


@dataclass
class DemoConfig:
    model: str = "lenet5"
    data: str = "fashion-mnist"
    data_root: str | None = None
    data_options: dict = field(default_factory=dict)  # e.g. {"n": 400} for the synthetic set
    epochs: int = 5
    budgets: tuple[float, ...] = (0.5, 0.7, 0.85)
    methods: tuple[str, ...] = ("mipp", "random", "magnitude-l1")
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    n_samples: int = 2000
    confidence: float = 0.95  # MIPP's own operating point, shown as an extra row
    torch_pruning: bool = True  # also run every Torch-Pruning criterion and show the best one
    seed: int = 0
    limit: int | None = None
    device: str = "auto"


def run_demo(out: str | Path, config: DemoConfig | None = None, *, progress: bool = True) -> dict:
    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = load_dataset(config.data, "train", root=config.data_root, limit=config.limit, seed=config.seed,
                             **config.data_options)
    test_set = load_dataset(config.data, "test", root=config.data_root, seed=config.seed, **config.data_options)
    model, base = _trained_model(out, config, train_set, test_set, progress)
    rows = _load_rows(out / "rows.jsonl")
    for method, budget in _jobs(config):
        if (method, budget) in rows:
            continue
        try:
            row = _prune_and_finetune(model, method, budget, config, train_set, test_set, progress)
        except ValueError as err:  # a criterion that does not apply to this model (e.g. BN-scale without BN)
            if not method.startswith(TP_PREFIX):
                raise
            log.warning("skipping %s: %s", method, err)
            row = {"method": method, "budget": budget, "skipped": str(err)}
        rows[(method, budget)] = row
        with open(out / "rows.jsonl", "a") as handle:  # one finished row at a time: nothing lost on interrupt
            handle.write(json.dumps(row) + "\n")
    done = [r for r in rows.values() if "skipped" not in r]
    skipped = sorted({r["method"] for r in rows.values() if "skipped" in r})
    result = {"base": base, "rows": _with_best_tp(done), "skipped": skipped, "config": asdict(config)}
    atomic_write_text(out / "results.md", render_table(result))
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    plot_results(result, out / "accuracy.png")
    result["files"] = [str(out / name) for name in ("results.md", "results.json", "accuracy.png")]
    return result


def _jobs(config: DemoConfig):
    methods = list(config.methods)
    if config.torch_pruning:
        methods += [m for m in method_names() if m.startswith(TP_PREFIX)]
    yield "mipp", None  # confidence mode: MIPP decides the sparsity itself
    for budget in config.budgets:
        for method in methods:
            yield method, budget


def _trained_model(out, config, train_set, test_set, progress):
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
    fit(model, train_set, train_config, checkpoint_path=out / "base-train.pt", progress=progress)
    metrics = evaluate(model, test_set)
    metrics.update(train_seconds=time.perf_counter() - started, params=count_params(model))
    save_model(path, model.cpu(), metrics=metrics)
    return model.cpu(), metrics


def _prune_and_finetune(model, method, budget, config, train_set, test_set, progress) -> dict:
    options = {"confidence": config.confidence} if method == "mipp" else {}
    started = time.perf_counter()
    plan = select_plan(model, train_set, method=method, budget=budget, n_samples=config.n_samples,
                       seed=config.seed, **options)
    selection_seconds = time.perf_counter() - started
    pruned = apply_plan(copy.deepcopy(model), plan)  # traced again: the copy is another model (timed apart)
    after_pruning = evaluate(pruned, test_set)["accuracy"]
    row = {
        "method": method, "budget": budget, "units_removed": plan.stats["units_removed"],
        "params_removed": plan.stats["params_removed"], "macs_removed": plan.stats["macs_removed"],
        "acc_pruned": after_pruning, "selection_seconds": selection_seconds, "guard_hits": plan.guard_hits,
    }
    row["acc_finetuned"] = _finetune(pruned, config, train_set, test_set, progress)
    return row


def _finetune(model, config, train_set, test_set, progress) -> float:
    tune = TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed + 1,
                       device=config.device, checkpoint_every=0)
    fit(model, train_set, tune, progress=progress)
    return evaluate(model, test_set)["accuracy"]


def _with_best_tp(rows: list[dict]) -> list[dict]:
    """Keep, per budget, only the Torch-Pruning criterion with the best accuracy after fine-tuning (chosen on the
    test set, which favours the baseline: the comparison errs against MIPP, not for it)."""
    best = {}
    for row in rows:
        if row["method"].startswith(TP_PREFIX):
            if row["budget"] not in best or row["acc_finetuned"] > best[row["budget"]]["acc_finetuned"]:
                best[row["budget"]] = row
    return [r for r in rows if not r["method"].startswith(TP_PREFIX)] + list(best.values())


def _load_rows(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["method"], row["budget"])] = row
    return rows


def render_table(result: dict) -> str:
    base = result["base"]
    lines = [
        f"Base model: test accuracy {100 * base['accuracy']:.2f}%, {base['params']:,} parameters.",
        "",
        "| method | budget | units removed | params removed | MACs removed | acc. after pruning | acc. after fine-tuning | selection s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["budget"] or 0, r["method"])):
        budget = "confidence" if row["budget"] is None else f"{100 * row['budget']:.0f}% units"
        tuned = row.get("acc_finetuned")
        lines.append(
            f"| {row['method']} | {budget} | {100 * row['units_removed']:.1f}% | {100 * row['params_removed']:.1f}% "
            f"| {100 * row['macs_removed']:.1f}% | {100 * row['acc_pruned']:.2f}% | "
            f"{'-' if tuned is None else f'{100 * tuned:.2f}%'} | {row['selection_seconds']:.2f} |")
    lines.append("")
    lines.append("tp-*: the best Torch-Pruning criterion at that budget (by accuracy after fine-tuning)."
                 + (f" Not applicable to this model: {', '.join(result['skipped'])}." if result.get("skipped") else ""))
    return "\n".join(lines) + "\n"


def plot_results(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "acc_pruned", "right after pruning"), (axes[1], "acc_finetuned", "after fine-tuning")):
        by_method = {}
        for row in result["rows"]:
            if row.get(key) is not None:
                by_method.setdefault(row["method"], []).append((row["units_removed"], row[key]))
        for method, points in sorted(by_method.items()):
            points.sort()
            ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker="o", label=method)
        ax.axhline(100 * result["base"]["accuracy"], color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.set_title(title)
        ax.set_xlabel("units removed (%)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
