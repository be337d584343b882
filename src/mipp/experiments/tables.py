"""The report's tables: CSV files, and the Markdown of results.md section by section."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from mipp.experiments.statistics import present, target_order

METRIC_WORDS = {"units": "units", "params": "params", "macs": "MACs"}


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
    return target_name(target) + ("" if metric == "units" or target is None else f" {METRIC_WORDS[metric]}")


def target_name(target) -> str:
    return "auto" if target is None else f"{100 * target:g}%"


def stage_words(stage: str) -> str:
    if stage == "norec":
        return "right after pruning, without reconstruction"
    return "right after pruning" if stage == "pruned" else f"after {stage[2:]} epoch(s)"


def pivot(entries, cell) -> str:
    """Methods (rows) x targets (columns) of one model, data set and regime."""
    targets = sorted({(e["metric"], e["target"]) for e in entries},
                     key=lambda mt: (mt[1] is None, mt[0] != "units", mt[0], target_order(mt[1])))
    methods = sorted({e["method"] for e in entries}, key=lambda m: (not m.startswith("mipp"), m))
    table = {(e["method"], (e["metric"], e["target"])): e for e in entries}
    rows = [[m] + [cell(table[m, t]) if (m, t) in table else "" for t in targets] for m in methods]
    return markdown(["method"] + [column_name(*mt) for mt in targets], rows)


def paired_cell(pair: dict) -> str:
    """"+1.2 [-0.3, +2.7] even": MIPP's mean lead in points over the paired seeds, its interval, the verdict."""
    if pair["n"] < 2:
        return f"{100 * pair['difference']:+.1f} (1 seed)"
    return (f"{100 * pair['difference']:+.1f} [{100 * pair['ci_low']:+.1f}, {100 * pair['ci_high']:+.1f}] "
            f"{pair['verdict']}")


def _comparisons(pairs, stages):
    """Per (model, data, regime, metric, reference), in order: its pairs and the stages they have."""
    groups = defaultdict(list)
    for p in pairs:
        groups[p["model"], p["data"], p["regime"], p["metric"], p["reference"]].append(p)
    for key, members in sorted(groups.items()):
        yield key, members, [s for s in stages if any(p["stage"] == s for p in members)]


PAIRED_INTRO = ("\n## MIPP against each baseline at equal cost, paired over seeds\n\nEvery method run directly at "
                "each target (no interpolation); a cell is MIPP's accuracy minus the baseline's in points, mean over "
                "the seeds (both pruned the same base model), with its 95% confidence interval (Student t): "
                "**ahead** when the interval lies above 0, **behind** when below, **even** when it holds 0. Runs "
                "whose reached cost missed their target by more than 1 point are left out (see the list of missed "
                "targets).\n")
ABLATION_INTRO = ("\n## Ablations: MIPP against its own variants, paired over seeds\n\nMIPP with its shipped "
                  "defaults minus each variant run at the same targets on the same base models, as above: other "
                  "features (`mipp-mean`), greedy re-ranking instead of the fixed MI order (`mipp-greedy`), MIPP's "
                  "per-layer widths with the units inside each layer chosen at random or by L1 (`mipp-widths-*`), "
                  "the same share kept in every layer with MIPP's choice of units (`mipp-uniform`). A variant "
                  "marked \"(at its cost)\" is compared with MIPP run at the very cost each of its runs reached "
                  "(`mipp@mipp-uniform`): keeping one share of every layer can miss a target by 2 points on a "
                  "small net.\n")


def paired_section(pairs, stages, intro: str = PAIRED_INTRO, rows_are: str = "baseline") -> str:
    """Per model, data, regime, metric and MIPP variant: baselines (rows) x targets and stages (columns), each cell
    MIPP's lead paired over seeds with its 95% interval, and a count of the verdicts."""
    if not pairs:
        return ""
    md = [intro]
    for (model, data, regime, metric, reference), members, mine in _comparisons(pairs, stages):
        targets = sorted({p["target"] for p in members})
        cells = {(p["baseline"], p["target"], p["stage"]): p for p in members}
        columns = [(t, s) for s in mine for t in targets]
        rows = [[baseline] + [paired_cell(cells[baseline, t, s]) if (baseline, t, s) in cells else ""
                              for t, s in columns] for baseline in sorted({p["baseline"] for p in members})]
        verdicts = defaultdict(int)
        for p in members:
            verdicts[p["stage"], p["verdict"]] += 1
        counts = "; ".join(f"{stage_words(s)}: " + ", ".join(f"{verdicts[s, v]} {v}" for v in
                                                             ("ahead", "behind", "even", "n<2") if verdicts[s, v])
                           for s in mine)
        md.append(f"\n**{model} / {data}, {regime}, `{reference}` at equal {METRIC_WORDS[metric]}** ({counts})\n\n")
        md.append(markdown([rows_are] + [f"{target_name(t)} {METRIC_WORDS[metric]}, {stage_words(s)}"
                                         for t, s in columns], rows))
    return "".join(md)


def ablation_section(pairs, stages) -> str:
    return paired_section(pairs, stages, ABLATION_INTRO, "variant")


def matched_section(pairs, stages) -> str:
    """Per model, data, regime and reference (a run that chose its own sparsity, such as MIPP's confidence mode):
    the sparsity it reached, and each baseline run at that same sparsity, paired over seeds (stages as columns)."""
    if not pairs:
        return ""
    md = ["\n## Every baseline at the sparsity MIPP chose\n\nEach baseline run at the fraction of the metric that "
          "the reference run (same base model) removed, no interpolation; a cell is the reference's accuracy minus "
          "the baseline's in points, mean over the seeds, with its 95% interval and verdict as above. Pairs whose "
          "two runs removed more than 1 point apart are left out (counted in the last column).\n"]
    for (model, data, regime, metric, reference), members, mine in _comparisons(pairs, stages):
        cells = {(p["baseline"], p["stage"]): p for p in members}
        first = {p["baseline"]: p for p in members}
        md.append(f"\n**{model} / {data}, {regime}, `{reference}`: {100 * members[0]['removed']:.1f}% of "
                  f"{METRIC_WORDS[metric]} removed (mean over seeds)**\n\n")
        rows = [[baseline] + [paired_cell(cells[baseline, s]) if (baseline, s) in cells else "" for s in mine]
                + [first[baseline]["missed"]] for baseline in sorted(first)]
        md.append(markdown(["baseline"] + [stage_words(s) for s in mine] + ["pairs left out"], rows))
    return "".join(md)


def missed_section(missed) -> str:
    if not missed:
        return ""
    rows = [[r["model"], r["data"], r["regime"], r["method"], r["seed"], column_name(r["metric"], r["target"]),
             f"{100 * r['reached']:.1f}%"] for r in missed]
    return ("\n## Missed targets\n\nRuns whose reached cost is more than 1 point from their target; they are left "
            "out of the paired comparison at that target (an ablation that missed is compared with MIPP run at the "
            "cost it reached, where such runs exist: see the ablations).\n\n" +
            markdown(["model", "data", "regime", "method", "seed", "target", "reached"], rows))


def bases_section(bases) -> str:
    """The trained base models every trained-regime run of a store prunes, one row per store and model."""
    if not bases:
        return ""
    rows = [[b["store"], b["base"], "all" if b["training_images"] is None else f"{b['training_images']:,}",
             b["epochs"], b["seeds"], f"{pct(b['test_accuracy'], b['test_accuracy_std'])} "
             f"({pct(b['test_accuracy_min'])}-{pct(b['test_accuracy_max'])})", pct(b["train_accuracy_last"]),
             f"{b['train_loss_3_before']:.3f} -> {b['train_loss_last']:.3f}", f"{b['train_minutes']:.1f}"]
            for b in bases]
    return ("\n## Base models\n\nThe trained models the trained-regime runs prune, one per seed (cosine schedule "
            "to zero). Test accuracy: mean ± std over seeds (range); train accuracy and loss of the last epoch, the "
            "loss also three epochs earlier (or after the first epoch); training time per base.\n\n" +
            markdown(["store", "base", "training images", "epochs", "seeds", "test accuracy (%)",
                      "train accuracy, last epoch (%)", "train loss, 3 epochs before -> last", "minutes"], rows))


def compute_section(compute) -> str:
    """CPU time per store and in all, as the records and base models timed it."""
    if not compute:
        return ""
    rows = [[c["store"], c["runs"], f"{c['run_hours']:.1f}", c["bases"], f"{c['base_hours']:.1f}",
             f"{c['hours']:.1f}"] for c in compute]
    rows.append(["all", sum(c["runs"] for c in compute), f"{sum(c['run_hours'] for c in compute):.1f}",
                 sum(c["bases"] for c in compute), f"{sum(c['base_hours'] for c in compute):.1f}",
                 f"{sum(c['hours'] for c in compute):.1f}"])
    return ("\n## Compute\n\nCPU-hours of one core (every sweep process ran one thread) behind the finished runs: "
            "selection, repair, evaluation and fine-tuning as each record timed them, and training the base "
            "models.\n\n" + markdown(["store", "finished runs", "run hours", "base models", "base hours",
                                      "hours"], rows))


# ---------------------------------------------------------------------------------- sections of results.md


def intro_section(n_done: int, n_matched: int, n_other: int, command: str | None) -> str:
    matched = f" and {n_matched} more made at the sparsity another run reached" if n_matched else ""
    return (f"# Results\n\nGenerated by `{command or 'mipp report'}` from {n_done} finished runs at fixed targets"
            f"{matched} ({n_other} skipped, failed or unfinished). Accuracy in %, mean ± std over seeds [95% "
            "confidence interval, Student t]; stages: right after pruning (with and without the re-fit of the kept "
            "weights, where the sweep re-fits), then after each "
            "fine-tuning budget (init: training the net pruned at initialisation). Every comparison is between "
            "runs made at the same target, or at the sparsity another run reached; nothing is interpolated.\n")


def commands_section(sweeps, done) -> str:
    """The sweep commands behind the runs (one per resolved config), and the git commits the runs were made at."""
    commits = sorted({r.versions.get("git") or "?" for r in done})
    lines = ["\n## Commands\n\nThe sweeps behind these numbers (each resolved config is saved in its store):\n"]
    seen = set()
    for folder, line in sweeps:
        command = f"mipp sweep --config {folder}/{line['config']} --out {folder}"
        if command not in seen:
            seen.add(command)
            lines.append(f"- `{command}`" + (f" (as run: `{' '.join(line['argv'])}`)" if line.get("argv") else ""))
    lines.append(f"\nmipp git commit(s) of the runs: {', '.join(commits)}.\n")
    return "\n".join(lines)


def model_section(model: str, data: str, base: float | None, summary, stages, figures: dict) -> str:
    """One model on one data set: accuracy and parameters/MACs removed per regime, its figures."""
    md = [f"\n## {model} on {data}\n\nUnpruned trained model: "
          f"{pct(base) if base is not None else '-'}% test accuracy (mean over seeds).\n"]
    for regime in sorted({e["regime"] for e in summary}):
        entries = [e for e in summary if e["regime"] == regime]
        for stage in present(entries, stages):
            md.append(f"\n**{regime}, accuracy {stage_words(stage)}**\n\n")
            md.append(pivot(entries, lambda e, s=stage: accuracy_cell(e, s)))
        md.append(f"\n**{regime}, parameters / MACs removed (%)**\n\n")
        md.append(pivot(entries, lambda e: f"{100 * e['params_removed']:.1f} / {100 * e['macs_removed']:.1f}"))
        md.append(f"\n**{regime}, runs with layer collapse** (a layer cut to its guard, or the net at chance after "
                  "its last budget)\n\n")
        md.append(pivot(entries, lambda e: f"{round(e['collapse_share'] * e['n'])}/{e['n']}"))
    md.append("\n" + "\n\n".join(f"![{kind}](figures/{name})" for kind, name in figures.items()) + "\n")
    return "".join(md)


def accuracy_cell(entry: dict, stage: str) -> str:
    """Mean ± std [95% interval]; where the method chose the sparsity itself (target "auto"), also the units it
    removed."""
    text = pct(entry[f"acc_{stage}"], entry[f"acc_{stage}_std"])
    half = entry.get(f"acc_{stage}_ci", math.nan)
    if not math.isnan(half):
        mean = entry[f"acc_{stage}"]
        text += f" [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
    if entry["target"] is None and text != "-":
        text += f" (at {100 * entry['units_removed']:.0f}% units)"
    return text


def cost_section(cost) -> str:
    return "\n## Selection cost\n\n" + markdown(
        ["model", "data", "method", "runs", "median s", "mean s", "peak MiB"],
        [[c["model"], c["data"], c["method"], c["n"], f"{c['median_seconds']:.3g}", f"{c['mean_seconds']:.3g}",
          f"{c['max_peak_rss_mb']:.1f}"] for c in cost]) + "\n![cost](figures/selection_cost.png)\n"


def latency_section(latency: dict, source: str) -> str:
    """Measured forward-pass latency of pruned models against the originals (benchmarks/bench_latency.py)."""
    rows = [[r["model"], r["device"], r["batch"], target_name(r["target"]), pct(r["macs_removed"]),
             f"{r['latency_ms_original']:.3g}", f"{r['latency_ms_pruned']:.3g}", f"{r['speedup']:.2f}x",
             f"{r['macs_ratio']:.2f}x", f"{r['efficiency']:.2f}"] for r in latency["rows"]]
    load = latency.get("load_average_before") or [math.nan]
    return (f"\n## Latency\n\nFrom `{source}`: median forward-pass time of the original and of copies pruned by "
            f"{latency['method']} to each MACs target (untrained weights), {latency['threads']} CPU thread(s), "
            f"{latency['rounds']} interleaved rounds; load average {load[0]:.1f} on {latency.get('cpu_count')} "
            "cores. Speed-up: median of original / pruned time per round; MACs ratio: original / pruned MACs; "
            "efficiency: speed-up / MACs ratio.\n\n" + markdown(
                ["model", "device", "batch", "target", "MACs removed (%)", "original ms", "pruned ms", "speed-up",
                 "MACs ratio", "efficiency"], rows))


def planted_section(planted) -> str:
    if not planted:
        return ""
    return ("\n## Planted redundancy\n\nPer method and target: share of runs that recovered the planted truth "
            "exactly, dead units removed (of 2), relations resolved (one unit removed, of 3), unique units "
            "kept (of 2).\n\n" + markdown(
                ["method", "target", "runs", "exact (%)", "dead", "relations", "unique", "units removed (%)"],
                [[p["method"], target_name(p["target"]), p["n"], pct(p["exact_share"]),
                  f"{p['dead_removed']:.2f}", f"{p['relations_resolved']:.2f}", f"{p['unique_kept']:.2f}",
                  pct(p["units_removed"])]
                 for p in planted]))


def deformed_csv(rows) -> list[dict]:
    """The deformed-data rows flattened, one column per stage and quantity."""
    out = []
    for r in rows:
        flat = {k: v for k, v in r.items() if k not in ("stages",) and k not in r["stages"]}
        for stage in dict.fromkeys(r["stages"]):
            for name, value in (r[stage] or {}).items():
                flat[f"{name}_{stage}"] = value
        out.append(flat)
    return out


def _change(cell: dict | None) -> str:
    if cell is None:
        return "-"
    text = f"{100 * cell['clean']:.1f} -> {100 * cell['deformed']:.1f} ({100 * cell['change']:+.1f}"
    if cell["verdict"] == "n<2":
        return text + ", 1 seed)"
    return text + f" [{100 * cell['ci_low']:+.1f}, {100 * cell['ci_high']:+.1f}])"


def deformed_section(rows) -> str:
    """Per model, regime, method and target: clean -> deformed accuracy, the change and its interval (paired by
    seed), right after pruning and after the regime's last budget."""
    if not rows:
        return ""
    table = [[r["model"], r["regime"], r["method"], column_name(r["metric"], r["target"]), r["n"],
              _change(r[r["stages"][0]]), _change(r[r["stages"][1]])] for r in rows]
    return ("\n## Deformed data\n\nEach image of the data set goes through one of a fixed set of transformations, "
            "drawn at random with equal probability and kept through training, pruning and fine-tuning. Test "
            "accuracy clean -> deformed and the change in points with its 95% interval, paired by seed (the same "
            "initialisation and schedule), right after pruning and after the regime's last budget. The paper "
            "expects pruning at initialisation to suffer and pruning after training not to.\n\n" +
            markdown(["model", "regime", "method", "target", "seeds", "right after pruning",
                      "after fine-tuning"], table))


def skipped_section(other) -> str:
    """The runs not made (skipped or failed), counted by status, method, regime and reason."""
    if not other:
        return ""
    groups = defaultdict(int)
    for r in other:
        groups[r.status, r.method, r.regime, (r.reason or "")[:160]] += 1
    return "\n## Runs not made\n\n" + markdown(
        ["status", "method", "regime", "runs", "reason"],
        [[s, m, g, n, reason.replace("|", "/")] for (s, m, g, reason), n in sorted(groups.items())])
