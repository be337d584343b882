"""`mipp report`: tables (Markdown and CSV) and figures (PNG) from one or more result stores.

    OUT/results.md     per model and data set: accuracy (mean ± std over seeds) per method and target, MIPP against
                       each baseline, and the figures; then selection cost, the planted network, skipped runs
    OUT/tables/*.csv   runs (one row per run), summary (per model, data, regime, method, target), winloss and
                       winloss_levels, cost, planted
    OUT/figures/*.png  accuracy vs sparsity, layer collapse per 5% bin, per-layer kept fraction / network's kept
                       fraction, accuracy vs fine-tuning budget, selection cost

Stages: "pruned" is the accuracy right after pruning, "ft<b>" after b epochs of fine-tuning (regime "trained") or of
training the net pruned at initialisation (regime "init").

MIPP against a baseline, at equal units and at equal MACs: per model, data set, regime and stage, a method's curve
is (mean fraction removed, mean test accuracy) over its targets, means over seeds.  At every point of MIPP's curve
whose fraction removed lies within the range of the baseline's curve, widened by SLACK on each side, the baseline's
accuracy is linearly interpolated (held at its end value within the slack; never extrapolated further); MIPP wins when
it is higher by more than `tie` (accuracy as a fraction), loses when lower by more, and ties otherwise.  The axis is
the fraction of units removed (equal units) or of MACs removed (equal MACs).  Methods meet a target within 0.5%, so
when the targets count units, equal units compares the same targets, and equal MACs compares across targets.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from mipp.checkpoint import atomic_write_text
from mipp.experiments.store import ResultStore

AXES = ("units", "macs")
_METRIC_WORDS = {"units": "units", "params": "params", "macs": "MACs"}
SLACK = 0.01  # a level up to 1% of the network outside a baseline's range still compares with its end point


# ---------------------------------------------------------------------------------------------- rows


def load(dirs) -> tuple[list[dict], list[dict], list[tuple[str, dict]]]:
    """(finished runs, skipped and failed runs, (store, sweep log line) pairs) from the stores in `dirs`."""
    done, other, sweeps = [], [], []
    for folder in dirs:
        store = ResultStore(folder)
        if not store.runs_dir.is_dir():
            raise FileNotFoundError(f"{folder} holds no runs/ folder: pass the --out folder of a `mipp sweep`")
        for record in store.records():
            (done if record["status"] == "done" else other).append(record)
        sweeps += [(str(folder), line) for line in store.sweeps()]
    return done, other, sweeps


def stage_names(records) -> list[str]:
    budgets = sorted({int(b) for r in records for b in r["finetune"] if int(b) > 0})
    return ["pruned"] + [f"ft{b}" for b in budgets]


def accuracy(record: dict, stage: str, key: str = "test_accuracy") -> float:
    entry = record["pruned"] if stage == "pruned" else record["finetune"].get(stage[2:])
    return math.nan if entry is None else entry[key]


def run_rows(records, stages) -> list[dict]:
    rows = []
    for r in records:
        row = {k: r[k] for k in ("run_id", "model", "data", "regime", "method", "method_name", "metric", "target",
                                       "seed")}
        row.update({f"{m}_removed": r["removed"][m] for m in ("units", "params", "macs")})
        row["base_accuracy"] = r["base"]["test_accuracy"]
        for stage in stages:
            row[f"acc_{stage}"] = accuracy(r, stage)
            row[f"train_acc_{stage}"] = accuracy(r, stage, "train_accuracy")
        row.update(collapse=r["collapse"]["any"], collapse_guard=r["collapse"]["guard"],
                   selection_seconds=r["selection"]["seconds"], peak_rss_mb=r["selection"]["peak_rss_mb"],
                   latency_ms_1=r.get("latency_ms", {}).get("1"), latency_ms_64=r.get("latency_ms", {}).get("64"))
        rows.append(row)
    return rows


def present(entries, stages) -> list[str]:
    """The stages with at least one accuracy among `entries` (budgets may differ between regimes)."""
    return [s for s in stages if any(not math.isnan(e[f"acc_{s}"]) for e in entries)]


def _key(row) -> tuple:
    return row["model"], row["data"], row["regime"], row["method"], row["metric"], row["target"]


def _target_order(target) -> float:
    return 2.0 if target is None else target


def summarize(rows, stages) -> list[dict]:
    """Mean and std over seeds per (model, data, regime, method, target)."""
    groups = defaultdict(list)
    for row in rows:
        groups[_key(row)].append(row)
    out = []
    for key in sorted(groups, key=lambda k: k[:5] + (_target_order(k[5]),)):
        members = groups[key]
        entry = dict(zip(("model", "data", "regime", "method", "metric", "target"), key), n=len(members),
                     method_name=members[0]["method_name"])
        for column in ["units_removed", "params_removed", "macs_removed"] + [f"acc_{s}" for s in stages]:
            values = np.array([m[column] for m in members], dtype=float)
            values = values[~np.isnan(values)]
            entry[column] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        entry["collapse_share"] = float(np.mean([m["collapse"] for m in members]))
        entry["selection_seconds"] = float(np.median([m["selection_seconds"] for m in members]))
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------- win / loss


def win_loss(summary, stages, reference: str = "mipp", tie: float = 0.002) -> tuple[list[dict], list[dict]]:
    """(one row per compared level, counts per model/data/regime/baseline/axis/stage); see the module docstring."""
    curves = defaultdict(dict)  # (model, data, regime) -> method -> rows
    for entry in summary:
        curves[entry["model"], entry["data"], entry["regime"]].setdefault(entry["method"], []).append(entry)
    levels, counts = [], []
    for (model, data, regime), methods in sorted(curves.items()):
        if reference not in methods:
            continue
        baselines = sorted(m for m, e in methods.items() if e[0]["method_name"] != "mipp")
        for baseline in baselines:
            for axis in AXES:
                for stage in stages:
                    ref_x, ref_y = _curve(methods[reference], axis, stage)
                    base_x, base_y = _curve(methods[baseline], axis, stage)
                    if not len(ref_x):
                        continue  # no budget of this length in this regime
                    tally, differences = {"win": 0, "tie": 0, "loss": 0}, []
                    for x, y in zip(ref_x, ref_y):
                        if not len(base_x) or not base_x[0] - SLACK <= x <= base_x[-1] + SLACK:
                            continue
                        other = float(np.interp(x, base_x, base_y))
                        outcome = "win" if y - other > tie else "loss" if other - y > tie else "tie"
                        tally[outcome] += 1
                        differences.append(y - other)
                        levels.append({"model": model, "data": data, "regime": regime, "baseline": baseline,
                                       "axis": axis, "stage": stage, "level": x, "reference_accuracy": y,
                                       "baseline_accuracy": other, "difference": y - other, "outcome": outcome})
                    counts.append({"model": model, "data": data, "regime": regime, "baseline": baseline,
                                   "axis": axis, "stage": stage, **tally,
                                   "mean_difference": float(np.mean(differences)) if differences else math.nan})
    return levels, counts


def _curve(entries, axis: str, stage: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((e[f"{axis}_removed"], e[f"acc_{stage}"]) for e in entries
                    if not math.isnan(e[f"acc_{stage}"]))
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


# ----------------------------------------------------------------------------------------------- tables


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pct(mean: float, std: float = math.nan) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def column_name(metric: str, target) -> str:
    """A target's column: "70%" of units, "70% MACs" of another metric."""
    return target_name(target) + ("" if metric == "units" or target is None else f" {_METRIC_WORDS[metric]}")


def target_name(target) -> str:
    return "auto" if target is None else f"{100 * target:g}%"


def pivot(entries, cell) -> str:
    """Methods (rows) x targets (columns) of one model, data set and regime."""
    targets = sorted({(e["metric"], e["target"]) for e in entries},
                     key=lambda mt: (mt[1] is None, mt[0] != "units", mt[0], _target_order(mt[1])))
    methods = sorted({e["method"] for e in entries}, key=lambda m: (not m.startswith("mipp"), m))
    table = {(e["method"], (e["metric"], e["target"])): e for e in entries}
    rows = [[m] + [cell(table[m, t]) if (m, t) in table else "" for t in targets] for m in methods]
    return markdown(["method"] + [column_name(*mt) for mt in targets], rows)


def count_table(counts, stages) -> str:
    cells = defaultdict(dict)
    for c in counts:
        cells[c["regime"], c["baseline"]][c["axis"], c["stage"]] = _tally(c)
    stages = [s for s in stages if any(c["stage"] == s for c in counts)]
    header = ["regime", "baseline"] + [f"{axis} {stage}" for axis in AXES for stage in stages]
    rows = [[regime, baseline] + [cell.get((a, s), "") for a in AXES for s in stages]
            for (regime, baseline), cell in sorted(cells.items())]
    return markdown(header, rows)


def _tally(count: dict) -> str:
    """"w/t/l (+d)": wins, ties, losses and MIPP's mean lead in points over the compared levels."""
    text = f"{count['win']}/{count['tie']}/{count['loss']}"
    difference = count.get("mean_difference", math.nan)
    return text if math.isnan(difference) else f"{text} ({100 * difference:+.1f})"


def verdict(count: dict) -> str:
    """ahead | behind | even | none: MIPP against one baseline on one axis and stage, by its wins and losses."""
    if count["win"] + count["tie"] + count["loss"] == 0:
        return "none"
    return "ahead" if count["win"] > count["loss"] else "behind" if count["loss"] > count["win"] else "even"


def verdict_table(counts, stages) -> str:
    """One row per model, data, regime, axis and stage (right after pruning and the largest budget): the baselines
    MIPP is ahead of, behind, and even with, each with its mean lead in points and its wins/ties/losses."""
    groups = defaultdict(list)
    for c in counts:
        groups[c["model"], c["data"], c["regime"], c["axis"], c["stage"]].append(c)
    rows = []
    for (model, data, regime, axis, stage), members in sorted(groups.items(), key=lambda kv: (
            kv[0][:4], stages.index(kv[0][4]))):
        mine = sorted({c["stage"] for c in counts if (c["model"], c["data"], c["regime"]) == (model, data, regime)},
                      key=stages.index)
        if stage not in (mine[0], mine[-1]):
            continue
        by = defaultdict(list)
        for c in sorted(members, key=lambda c: -np.nan_to_num(c.get("mean_difference", math.nan))):
            by[verdict(c)].append(f"{c['baseline']} {_tally(c)}")
        rows.append([f"{model} / {data}", regime, "equal " + axis, _stage_words(stage)] +
                    [", ".join(by[v]) or "-" for v in ("ahead", "behind", "even")] + [str(len(by["none"]))])
    return markdown(["model / data", "regime", "axis", "stage", "MIPP ahead of", "MIPP behind", "even",
                     "not comparable"], rows)


def deformed_rows(summary, stages) -> list[dict]:
    """Accuracy on deformed data minus accuracy on the same data undeformed, per model, regime, method and target
    (the paper's Fig. 5: pruning at initialisation should suffer, pruning after training should not)."""
    clean = {(e["model"], e["data"], e["regime"], e["method"], e["metric"], e["target"]): e for e in summary}
    out = []
    for e in summary:
        if not e["data"].endswith("+deform"):
            continue
        other = clean.get((e["model"], e["data"][: -len("+deform")], e["regime"], e["method"], e["metric"],
                           e["target"]))
        if other is None:
            continue
        mine = present([e], stages)
        row = {k: e[k] for k in ("model", "data", "regime", "method", "metric", "target")}
        for stage in (mine[0], mine[-1]):
            row[f"clean_{stage}"], row[f"deformed_{stage}"] = other[f"acc_{stage}"], e[f"acc_{stage}"]
        row["stages"] = (mine[0], mine[-1])
        out.append(row)
    return out


def deformed_section(rows) -> str:
    """Per regime and method: mean accuracy change (deformed - clean, points) over the shared targets."""
    if not rows:
        return ""
    groups = defaultdict(list)
    for r in rows:
        groups[r["model"], r["regime"], r["method"]].append(r)
    table = []
    for (model, regime, method), members in sorted(groups.items()):
        first, last = members[0]["stages"]
        cells = []
        for stage in (first, last):
            clean = np.mean([m[f"clean_{stage}"] for m in members])
            deformed = np.mean([m[f"deformed_{stage}"] for m in members])
            cells.append(f"{100 * clean:.1f} -> {100 * deformed:.1f} ({100 * (deformed - clean):+.1f})")
        table.append([model, regime, method, len(members)] + cells)
    return ("\n## Deformed data\n\nMean test accuracy over the targets both studies share, clean -> deformed "
            "(change in points), right after pruning and after the largest budget of the regime.\n\n" +
            markdown(["model", "regime", "method", "targets", "right after pruning", "after fine-tuning"], table))


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _looks(methods) -> dict:
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
    plt = _pyplot()
    regimes = sorted({e["regime"] for e in summary})
    looks = _looks({e["method"] for e in summary})
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
    _legend(fig, axes)
    _save(fig, path)


def plot_collapse(rows, path: Path) -> None:
    """Share of runs with layer collapse per 5% bin of units removed, per method and regime."""
    plt = _pyplot()
    regimes = sorted({r["regime"] for r in rows})
    looks = _looks({r["method"] for r in rows})
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
    _legend(fig, axes)
    _save(fig, path)


def plot_layers(records, target: float, path: Path) -> dict:
    """Per-layer kept fraction divided by the network's kept fraction, at the target nearest `target`."""
    plt = _pyplot()
    regimes = sorted({r["regime"] for r in records})
    looks = _looks({r["method"] for r in records})
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 3.8), squeeze=False)
    chosen = {}
    for ax, regime in zip(axes[0], regimes):
        mine = [r for r in records if r["regime"] == regime and r["target"] is not None]
        if not mine:
            continue
        metrics = [r["metric"] for r in mine]
        metric = max(sorted(set(metrics)), key=metrics.count)  # the sweep's main metric
        mine = [r for r in mine if r["metric"] == metric]
        chosen[regime] = (metric, min({r["target"] for r in mine}, key=lambda t: (abs(t - target), t)))
        layers = mine[0]["layers"]
        for method in sorted({r["method"] for r in mine}):
            runs = [r for r in mine if r["method"] == method and r["target"] == chosen[regime][1]]
            ratios = [[r["kept_fraction"][k] / (1 - r["removed"]["units"]) for k in layers] for r in runs]
            if ratios:
                ax.plot(range(len(layers)), np.mean(ratios, 0), label=method, **looks[method])
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=6, ha="right")
        ax.set_title(f"{regime}, {target_name(chosen[regime][1])} of {metric} removed")
        ax.set_ylabel("kept fraction / network's")
    _legend(fig, axes)
    _save(fig, path)
    return chosen


def plot_finetune(summary, stages, targets: dict, path: Path) -> None:
    """Accuracy after each fine-tuning budget (0 = right after pruning) at the chosen target per regime."""
    plt = _pyplot()
    regimes = sorted(targets)
    looks = _looks({e["method"] for e in summary})
    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(5.5 * max(1, len(regimes)), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        mine = present([e for e in summary if e["regime"] == regime], stages)
        epochs = [0 if s == "pruned" else int(s[2:]) for s in mine]
        for e in summary:
            if e["regime"] == regime and (e["metric"], e["target"]) == targets[regime]:
                y = np.array([100 * e[f"acc_{s}"] for s in mine])
                s = np.nan_to_num(np.array([100 * e[f"acc_{s}_std"] for s in mine]))
                ax.errorbar(epochs, y, yerr=s, capsize=2, label=e["method"], **looks[e["method"]])
        ax.set_title(f"{regime}, {target_name(targets[regime][1])} of {targets[regime][0]} removed")
        ax.set_xlabel("fine-tuning epochs (0: right after pruning)")
        ax.set_ylabel("test accuracy (%)")
    _legend(fig, axes)
    _save(fig, path)


def plot_cost(cost, path: Path) -> None:
    plt = _pyplot()
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
    _save(fig, path)


def figure_legend_entries(axes) -> dict:
    """Label -> handle over every panel, first seen first: a method drawn in one regime only (Taylor after
    training, SynFlow at initialisation) must still be named."""
    entries = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return entries


def _legend(fig, axes) -> None:
    """One legend for the whole figure, to the right of the panels."""
    entries = figure_legend_entries(axes)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 if len(entries) <= 16 else 2)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legend outside the panels in the image
    _pyplot().close(fig)


# ----------------------------------------------------------------------------------------------- report


def selection_cost(rows) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["model"], r["data"], r["method"]].append(r)
    return [{"model": k[0], "data": k[1], "method": k[2], "n": len(v),
             "median_seconds": float(np.median([r["selection_seconds"] for r in v])),
             "mean_seconds": float(np.mean([r["selection_seconds"] for r in v])),
             "max_peak_rss_mb": float(np.nanmax([r["peak_rss_mb"] or 0.0 for r in v]))}
            for k, v in sorted(groups.items())]


def planted_rows(records) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        if "planted" in r:
            groups[r["method"], r["target"]].append(r)
    return [{"method": m, "target": t, "n": len(v), "exact_share": float(np.mean([r["planted"]["exact"] for r in v])),
             "dead_removed": float(np.mean([r["planted"]["dead_removed"] for r in v])),
             "relations_resolved": float(np.mean([r["planted"]["relations_resolved"] for r in v])),
             "unique_kept": float(np.mean([r["planted"]["unique_kept"] for r in v])),
             "units_removed": float(np.mean([r["removed"]["units"] for r in v]))}
            for (m, t), v in sorted(groups.items(), key=lambda kv: (kv[0][0], _target_order(kv[0][1])))]


def build_report(dirs, out, *, reference: str = "mipp", layer_target: float = 0.7, tie: float = 0.002,
                 command: str | None = None) -> dict:
    """Write OUT/results.md, OUT/tables/*.csv and OUT/figures/*.png from the stores in `dirs`."""
    out = Path(out)
    done, other, sweeps = load(dirs)
    if not done:
        raise ValueError(f"no finished runs in {', '.join(map(str, dirs))}: run `mipp sweep` first")
    stages = stage_names(done)
    rows = run_rows(done, stages)
    summary = summarize(rows, stages)
    levels, counts = win_loss(summary, stages, reference, tie)
    cost, planted, deformed = selection_cost(rows), planted_rows(done), deformed_rows(summary, stages)
    tables = {"runs": rows, "summary": summary, "winloss": counts, "winloss_levels": levels, "cost": cost,
              "planted": planted, "deformed": [{k: v for k, v in r.items() if k != "stages"} for r in deformed]}
    for name, table in tables.items():
        if table:
            write_csv(out / "tables" / f"{name}.csv", table)
    md = [f"# Results\n\nGenerated by `{command or 'mipp report'}` from {len(done)} finished runs "
          f"({len(other)} skipped, failed or unfinished). Accuracy in %, mean ± std over seeds; stages: right after "
          "pruning, then after each fine-tuning budget (init: training the net pruned at initialisation). "
          f"Win/tie/loss: MIPP (`{reference}`) against each baseline, tie within {100 * tie:g} points (see "
          "mipp.experiments.report).\n", _commands(sweeps, done)]
    if counts:
        md.append("\n## Where MIPP wins and where it loses\n\nPer model, regime and axis, right after pruning and "
                  "after the largest fine-tuning budget: the baselines MIPP is ahead of (more wins than losses over "
                  "the compared sparsity levels), behind, or even with; each with wins/ties/losses and MIPP's mean "
                  "lead in accuracy points. Not comparable: baselines whose range of units or MACs removed does not "
                  "reach any of MIPP's levels.\n\n" + verdict_table(counts, stages))
    figures = []
    for model, data in sorted({(r["model"], r["data"]) for r in rows}):
        slug = f"{model}_{data}".replace("/", "_").replace("@", "w").replace("+", "_")
        part = [e for e in summary if (e["model"], e["data"]) == (model, data)]
        part_rows = [r for r in rows if (r["model"], r["data"]) == (model, data)]
        part_records = [r for r in done if (r["model"], r["data"]) == (model, data)]
        per_seed = {r["seed"]: r["base"]["test_accuracy"] for r in part_records if r["regime"] == "trained"}
        base = float(np.mean(list(per_seed.values()))) if per_seed else None
        md.append(f"\n## {model} on {data}\n\nUnpruned trained model: "
                  f"{pct(base) if base is not None else '-'}% test accuracy (mean over seeds).\n")
        for regime in sorted({e["regime"] for e in part}):
            entries = [e for e in part if e["regime"] == regime]
            for stage in present(entries, stages):
                md.append(f"\n**{regime}, accuracy {_stage_words(stage)}**\n\n")
                md.append(pivot(entries, lambda e, s=stage: _accuracy_cell(e, s)))
            md.append(f"\n**{regime}, parameters / MACs removed (%)**\n\n")
            md.append(pivot(entries, lambda e: f"{100 * e['params_removed']:.1f} / {100 * e['macs_removed']:.1f}"))
        mine = [c for c in counts if (c["model"], c["data"]) == (model, data)]
        if mine:
            md.append("\n**MIPP against each baseline: wins/ties/losses at equal units and at equal MACs**\n\n")
            md.append(count_table(mine, stages))
        names = {"accuracy": f"accuracy_{slug}.png", "accuracy at equal MACs": f"accuracy_macs_{slug}.png",
                 "collapse": f"collapse_{slug}.png",
                 "layers": f"layers_{slug}.png", "finetune": f"finetune_{slug}.png"}
        plot_accuracy(part, stages, base, out / "figures" / names["accuracy"])
        plot_accuracy(part, stages, base, out / "figures" / names["accuracy at equal MACs"], axis="macs")
        plot_collapse(part_rows, out / "figures" / names["collapse"])
        chosen = plot_layers(part_records, layer_target, out / "figures" / names["layers"])
        plot_finetune(part, stages, chosen, out / "figures" / names["finetune"])
        figures += list(names.values())
        md.append("\n" + "\n\n".join(f"![{kind}](figures/{name})" for kind, name in names.items()) + "\n")
    plot_cost(cost, out / "figures" / "selection_cost.png")
    figures.append("selection_cost.png")
    md.append("\n## Selection cost\n\n" + markdown(
        ["model", "data", "method", "runs", "median s", "mean s", "peak MiB"],
        [[c["model"], c["data"], c["method"], c["n"], f"{c['median_seconds']:.3g}", f"{c['mean_seconds']:.3g}",
          f"{c['max_peak_rss_mb']:.1f}"] for c in cost]) + "\n![cost](figures/selection_cost.png)\n")
    if planted:
        md.append("\n## Planted redundancy\n\nPer method and target: share of runs that recovered the planted truth "
                  "exactly, dead units removed (of 2), relations resolved (one unit removed, of 3), unique units "
                  "kept (of 2).\n\n" + markdown(
                      ["method", "target", "runs", "exact (%)", "dead", "relations", "unique", "units removed (%)"],
                      [[p["method"], target_name(p["target"]), p["n"], pct(p["exact_share"]),
                        f"{p['dead_removed']:.2f}", f"{p['relations_resolved']:.2f}", f"{p['unique_kept']:.2f}",
                        pct(p["units_removed"])]
                       for p in planted]))
    md.append(deformed_section(deformed))
    md.append(_skipped(other))
    atomic_write_text(out / "results.md", "".join(md))
    return {"out": str(out), "report": str(out / "results.md"), "runs": len(done), "skipped_or_failed": len(other),
            "tables": sorted(f"tables/{n}.csv" for n, t in tables.items() if t),
            "figures": [f"figures/{f}" for f in figures]}


def _accuracy_cell(entry: dict, stage: str) -> str:
    """Mean ± std; where the method chose the sparsity itself (target "auto"), also the units it removed."""
    text = pct(entry[f"acc_{stage}"], entry[f"acc_{stage}_std"])
    if entry["target"] is None and text != "-":
        text += f" (at {100 * entry['units_removed']:.0f}% units)"
    return text


def _stage_words(stage: str) -> str:
    return "right after pruning" if stage == "pruned" else f"after {stage[2:]} epoch(s)"


def _commands(sweeps, done) -> str:
    commits = sorted({r["versions"].get("git") or "?" for r in done})
    lines = ["\n## Commands\n\nThe sweeps behind these numbers (each resolved config is saved in its store):\n"]
    seen = set()
    for folder, line in sweeps:
        command = f"mipp sweep --config {folder}/{line['config']} --out {folder}"
        if command not in seen:
            seen.add(command)
            lines.append(f"- `{command}`" + (f" (as run: `{' '.join(line['argv'])}`)" if line.get("argv") else ""))
    lines.append(f"\nmipp git commit(s) of the runs: {', '.join(commits)}.\n")
    return "\n".join(lines)


def _skipped(other) -> str:
    if not other:
        return ""
    groups = defaultdict(int)
    for r in other:
        groups[r["status"], r["method"], r["regime"], (r.get("reason") or "")[:160]] += 1
    return "\n## Runs not made\n\n" + markdown(
        ["status", "method", "regime", "runs", "reason"],
        [[s, m, g, n, reason.replace("|", "/")] for (s, m, g, reason), n in sorted(groups.items())])
