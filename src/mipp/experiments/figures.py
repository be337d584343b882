"""The report's figures (matplotlib, PNG): accuracy vs sparsity, layer collapse per 5% bin, per-layer kept fraction
over the network's, accuracy vs fine-tuning budget, selection cost."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from mipp.experiments.statistics import present
from mipp.experiments.tables import target_name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def looks_of(methods) -> dict:
    """Line style per method: MIPP bold black, the others a colour and a marker each (many methods share a plot)."""
    import matplotlib

    cmap, markers = matplotlib.colormaps["tab20"], "os^vD<>ph*Xd"
    looks = {}
    for i, method in enumerate(sorted(methods)):
        looks[method] = {"color": cmap(i % 20), "marker": markers[i % len(markers)], "markersize": 3, "linewidth": 1.2}
        if method.startswith("mipp"):
            looks[method].update(linewidth=2.5, zorder=3, markersize=4)
            if method == "mipp":
                looks[method]["color"] = "black"
    return looks


def plot_accuracy(summary, stages, base, path: Path, axis: str = "units") -> None:
    """Rows: regimes; columns: right after pruning and after the regime's largest budget; x: the fraction of `axis`
    (units or MACs) removed. Bands: ± one std."""
    plt = pyplot()
    regimes = sorted({e["regime"] for e in summary})
    looks = looks_of({e["method"] for e in summary})
    fig, axes = plt.subplots(len(regimes), 2, figsize=(11, 3.8 * len(regimes)), squeeze=False, sharex=True)
    for i, regime in enumerate(regimes):
        mine = present([e for e in summary if e["regime"] == regime], stages)
        for j, stage in enumerate([mine[0], mine[-1]]):
            ax = axes[i][j]
            for method in sorted({e["method"] for e in summary}):
                pts = sorted((e[f"{axis}_removed"], e[f"acc_{stage}"], e[f"acc_{stage}_std"]) for e in summary
                             if e["regime"] == regime and e["method"] == method and not math.isnan(e[f"acc_{stage}"]))
                if not pts:
                    continue
                x, y, s = (100 * np.array(v) for v in zip(*pts))
                ax.plot(x, y, label=method, **looks[method])
                s = np.nan_to_num(s)
                ax.fill_between(x, y - s, y + s, color=looks[method]["color"], alpha=0.12, linewidth=0)
            if regime == "trained" and base:
                ax.axhline(100 * base, color="grey", linestyle="--", linewidth=1, label="unpruned")
            ax.set_title(f"{regime}: {'right after pruning' if stage == 'pruned' else f'after {stage[2:]} epoch(s)'}")
            ax.set_ylabel("test accuracy (%)")
            ax.set_xlabel(f"{'MACs' if axis == 'macs' else axis} removed (%)")
    legend(fig, axes)
    save(fig, path)


def plot_collapse(rows, path: Path) -> None:
    """Share of runs with layer collapse per 5% bin of units removed, per method and regime."""
    plt = pyplot()
    regimes = sorted({r["regime"] for r in rows})
    looks = looks_of({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for method in sorted({r["method"] for r in rows}):
            bins = defaultdict(list)
            for r in rows:
                if r["regime"] == regime and r["method"] == method:
                    bins[min(19, int(100 * r["units_removed"] + 1e-9) // 5)].append(r["collapse"])
            if bins:
                keys = sorted(bins)
                ax.plot([5 * k + 2.5 for k in keys], [100 * np.mean(bins[k]) for k in keys], label=method,
                        **looks[method])
        ax.set_title(f"{regime}: runs with layer collapse")
        ax.set_xlabel("units removed (%, 5% bins)")
        ax.set_ylabel("share of runs (%)")
        ax.set_ylim(-3, 103)
    legend(fig, axes)
    save(fig, path)


def plot_layers(records, target: float, path: Path) -> dict:
    """Per-layer kept fraction divided by the network's kept fraction, at the target nearest `target`."""
    plt = pyplot()
    regimes = sorted({r.regime for r in records})
    looks = looks_of({r.method for r in records})
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 3.8), squeeze=False)
    chosen = {}
    for ax, regime in zip(axes[0], regimes):
        mine = [r for r in records if r.regime == regime and r.target is not None]
        if not mine:
            continue
        metrics = [r.metric for r in mine]
        metric = max(sorted(set(metrics)), key=metrics.count)  # the sweep's main metric
        mine = [r for r in mine if r.metric == metric]
        chosen[regime] = (metric, min({r.target for r in mine}, key=lambda t: (abs(t - target), t)))
        layers = mine[0].layers
        for method in sorted({r.method for r in mine}):
            runs = [r for r in mine if r.method == method and r.target == chosen[regime][1]]
            ratios = [[r.kept_fraction[k] / (1 - r.removed["units"]) for k in layers] for r in runs]
            if ratios:
                ax.plot(range(len(layers)), np.mean(ratios, 0), label=method, **looks[method])
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=6, ha="right")
        ax.set_title(f"{regime}, {target_name(chosen[regime][1])} of {metric} removed")
        ax.set_ylabel("kept fraction / network's")
    legend(fig, axes)
    save(fig, path)
    return chosen


def plot_finetune(summary, stages, targets: dict, path: Path) -> None:
    """Accuracy after each fine-tuning budget (0 = right after pruning) at the chosen target per regime."""
    plt = pyplot()
    regimes = sorted(targets)
    looks = looks_of({e["method"] for e in summary})
    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(5.5 * max(1, len(regimes)), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        mine = [s for s in present([e for e in summary if e["regime"] == regime], stages) if s != "norec"]
        epochs = [0 if s == "pruned" else int(s[2:]) for s in mine]
        for e in summary:
            if e["regime"] == regime and (e["metric"], e["target"]) == targets[regime]:
                y = np.array([100 * e[f"acc_{s}"] for s in mine])
                s = np.nan_to_num(np.array([100 * e[f"acc_{s}_std"] for s in mine]))
                ax.errorbar(epochs, y, yerr=s, capsize=2, label=e["method"], **looks[e["method"]])
        ax.set_title(f"{regime}, {target_name(targets[regime][1])} of {targets[regime][0]} removed")
        ax.set_xlabel("fine-tuning epochs (0: right after pruning)")
        ax.set_ylabel("test accuracy (%)")
    legend(fig, axes)
    save(fig, path)


def plot_cost(cost, path: Path) -> None:
    plt = pyplot()
    groups = sorted({(c["model"], c["data"]) for c in cost})
    methods = sorted({c["method"] for c in cost}, key=lambda m: (not m.startswith("mipp"), m))
    table = {(c["model"], c["data"], c["method"]): c["median_seconds"] for c in cost}
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.5 * len(methods) + 2)), 4))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        values = [table.get(group + (m,), np.nan) for m in methods]
        ax.bar(np.arange(len(methods)) + i * width, values, width, label=f"{group[0]} / {group[1]}")
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("selection time, median (s)")
    ax.legend(fontsize=7)
    save(fig, path)


def figure_legend_entries(axes) -> dict:
    """Label -> handle over every panel, first seen first: a method drawn in one regime only (Taylor after
    training, SynFlow at initialisation) must still be named."""
    entries = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return entries


def legend(fig, axes) -> None:
    """One legend for the whole figure, to the right of the panels."""
    entries = figure_legend_entries(axes)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 if len(entries) <= 16 else 2)


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legend outside the panels in the image
    pyplot().close(fig)


def plot_model(summary, rows, records, stages, base, layer_target: float, folder: Path, slug: str) -> dict:
    """The figures of one model on one data set, into `folder`; returns kind -> file name (as results.md links
    them)."""
    names = {"accuracy": f"accuracy_{slug}.png", "accuracy at equal MACs": f"accuracy_macs_{slug}.png",
             "collapse": f"collapse_{slug}.png", "layers": f"layers_{slug}.png", "finetune": f"finetune_{slug}.png"}
    plot_accuracy(summary, stages, base, folder / names["accuracy"])
    plot_accuracy(summary, stages, base, folder / names["accuracy at equal MACs"], axis="macs")
    plot_collapse(rows, folder / names["collapse"])
    chosen = plot_layers(records, layer_target, folder / names["layers"])
    plot_finetune(summary, stages, chosen, folder / names["finetune"])
    return names
