"""The numbers of the report: run rows, means over seeds, MIPP against each baseline paired over seeds at directly
run targets, selection cost, planted-truth recovery and the deformed-data comparison. Nothing is interpolated: a
comparison is made only between runs made at the same target (or, for a matched target, at the sparsity the
referenced run reached).

Stages: "pruned" is the accuracy right after pruning, "norec" the same without reconstruction (sweeps that
reconstruct record both, so the choice of units is also judged on its own), "ft<b>" after b epochs of fine-tuning
(regime "trained") or of training the net pruned at initialisation (regime "init").
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np


def stage_names(records) -> list[str]:
    budgets = sorted({b for r in records for b in r.budgets()})
    norec = ["norec"] if any(not math.isnan(r.accuracy("norec")) for r in records) else []
    return ["pruned"] + norec + [f"ft{b}" for b in budgets]


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key of a stage name: right after pruning, without the re-fit, then fine-tuning budgets in order."""
    return (0, 0) if stage == "pruned" else (1, 0) if stage == "norec" else (2, int(stage[2:]))


def run_rows(records, stages) -> list[dict]:
    """One row per run: its labels, fractions removed, accuracies per stage, collapse, cost."""
    rows = []
    for r in records:
        row = {"run_id": r.run_id, "model": r.model, "data": r.data, "regime": r.regime, "method": r.method,
               "method_name": r.method_name, "metric": r.metric, "target": r.target, "seed": r.seed,
               "matched": r.matched["label"] if r.matched else None,
               "matched_run": r.matched["run_id"] if r.matched else None}
        row.update({f"{m}_removed": r.removed[m] for m in ("units", "params", "macs")})
        row["base_accuracy"] = r.base["test_accuracy"]
        for stage in stages:
            row[f"acc_{stage}"] = r.accuracy(stage)
            row[f"train_acc_{stage}"] = r.accuracy(stage, "train_accuracy")
        latency = r.latency_ms or {}
        row.update(collapse=r.collapse["any"], collapse_guard=r.collapse["guard"],
                   selection_seconds=r.selection["seconds"], peak_rss_mb=r.selection["peak_rss_mb"],
                   latency_ms_1=latency.get("1"), latency_ms_64=latency.get("64"))
        rows.append(row)
    return rows


def present(entries, stages) -> list[str]:
    """The stages with at least one accuracy among `entries` (budgets may differ between regimes)."""
    return [s for s in stages if any(not math.isnan(e[f"acc_{s}"]) for e in entries)]


def target_order(target) -> float:
    """Sort key of a target: fractions in order, then "auto" (None)."""
    return 2.0 if target is None else target


def summarize(rows, stages, confidence: float = 0.95) -> list[dict]:
    """Mean and std over seeds per (model, data, regime, method, target); for each accuracy also the half-width of
    its `confidence` interval (Student t over the seeds; "acc_<stage>_ci")."""
    from scipy import stats  # imported on first use (scipy takes ~1 s)

    groups = defaultdict(list)
    for row in rows:
        groups[row["model"], row["data"], row["regime"], row["method"], row["metric"], row["target"]].append(row)
    out = []
    for key in sorted(groups, key=lambda k: k[:5] + (target_order(k[5]),)):
        members = groups[key]
        entry = dict(zip(("model", "data", "regime", "method", "metric", "target"), key), n=len(members),
                     method_name=members[0]["method_name"])
        for column in ["units_removed", "params_removed", "macs_removed"] + [f"acc_{s}" for s in stages]:
            values = np.array([m[column] for m in members], dtype=float)
            values = values[~np.isnan(values)]
            entry[column] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            if column.startswith("acc_"):
                entry[f"{column}_ci"] = (float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) *
                                               entry[f"{column}_std"] / math.sqrt(len(values)))
                                         if len(values) > 1 else math.nan)
        entry["collapse_share"] = float(np.mean([m["collapse"] for m in members]))
        entry["selection_seconds"] = float(np.median([m["selection_seconds"] for m in members]))
        out.append(entry)
    return out


def deformed_rows(rows, stages, confidence: float = 0.95) -> list[dict]:
    """Accuracy on deformed data minus accuracy on the same data undeformed, per model, regime, method, metric and
    target, paired by seed (the same initialisation and schedule; the bases differ in the data they trained on),
    right after pruning and after the regime's last budget: both means, the change, its `confidence` interval and
    the verdict of `_paired` ("ahead": better on deformed data, "behind": worse). The paper's Fig. 5: pruning at
    initialisation should suffer, pruning after training should not."""
    clean = {(r["model"], r["data"], r["regime"], r["method"], r["metric"], r["target"], r["seed"]): r
             for r in rows}
    groups = defaultdict(list)
    for r in rows:
        twin = clean.get((r["model"], r["data"][: -len("+deform")], r["regime"], r["method"], r["metric"],
                          r["target"], r["seed"])) if r["data"].endswith("+deform") else None
        if twin is not None:
            groups[r["model"], r["data"], r["regime"], r["method"], r["metric"], r["target"]].append((r, twin))
    out = []
    for key in sorted(groups, key=lambda k: k[:5] + (target_order(k[5]),)):
        pairs = groups[key]
        mine = present([row for pair in pairs for row in pair], stages)
        row = dict(zip(("model", "data", "regime", "method", "metric", "target"), key), n=len(pairs))
        for stage in dict.fromkeys((mine[0], mine[-1])):
            found = _paired(pairs, stage, confidence)
            row[stage] = {"clean": found["baseline_accuracy"], "deformed": found["reference_accuracy"],
                          "change": found["difference"], "ci_low": found["ci_low"], "ci_high": found["ci_high"],
                          "verdict": found["verdict"]} if found else None
        row["stages"] = (mine[0], mine[-1])
        out.append(row)
    return out


def base_rows(bases) -> list[dict]:
    """The trained base models, per store, model and data (over their seeds): epochs, test accuracy (mean, std,
    range), and from the training history the last epoch's train accuracy and loss beside the loss three epochs
    earlier, or of the first epoch of a shorter schedule (how flat the end of the schedule is)."""
    groups = defaultdict(list)
    for store, name, metrics in bases:
        label = re.sub(r"-s\d+-[0-9a-f]{10}$", "", name)
        identity = metrics.get("identity", {})
        limit = (identity.get("data") or {}).get("limit")
        groups[store, label, identity.get("epochs"), limit].append(metrics)
    out = []
    for (store, label, epochs, limit), members in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        test = np.array([m["test_accuracy"] for m in members])
        history = [m.get("history") or [] for m in members]
        last = [h[-1] for h in history if h]
        earlier = [h[max(0, len(h) - 4)] for h in history if h]  # three epochs before the last, or the first
        out.append({"store": store, "base": label, "training_images": limit, "epochs": epochs, "seeds": len(members),
                    "test_accuracy": float(test.mean()),
                    "test_accuracy_std": float(test.std(ddof=1)) if len(test) > 1 else math.nan,
                    "test_accuracy_min": float(test.min()), "test_accuracy_max": float(test.max()),
                    "train_accuracy_last": float(np.mean([h["train_accuracy"] for h in last])) if last else math.nan,
                    "train_loss_last": float(np.mean([h["train_loss"] for h in last])) if last else math.nan,
                    "train_loss_3_before": (float(np.mean([h["train_loss"] for h in earlier])) if earlier
                                            else math.nan),
                    "train_minutes": float(np.mean([m.get("train_seconds", math.nan) for m in members])) / 60})
    return out


def compute_rows(stores) -> list[dict]:
    """CPU time behind each store, from its records and base models: per (store, finished records, base.json list),
    the hours of its runs (selection, repair, evaluation and every fine-tuning, as each record timed them) and of
    training its base models. Each process ran one thread, so these are CPU-hours of one core."""
    out = []
    for store, records, bases in stores:
        run_seconds = 0.0
        for r in records:
            timings = r.timings or {}
            run_seconds += sum(timings.get(k) or 0.0 for k in ("selection_seconds", "repair_seconds",
                                                                 "evaluate_seconds"))
            run_seconds += sum((timings.get("finetune_seconds") or {}).values())
        base_seconds = sum(m.get("train_seconds") or 0.0 for m in bases)
        out.append({"store": store, "runs": len(records), "run_hours": run_seconds / 3600, "bases": len(bases),
                    "base_hours": base_seconds / 3600, "hours": (run_seconds + base_seconds) / 3600})
    return out


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
    """Per method and target: how often and how far the runs on a planted network recovered its truth."""
    groups = defaultdict(list)
    for r in records:
        if r.planted is not None:
            groups[r.method, r.target].append(r)
    return [{"method": m, "target": t, "n": len(v), "exact_share": float(np.mean([r.planted["exact"] for r in v])),
             "dead_removed": float(np.mean([r.planted["dead_removed"] for r in v])),
             "relations_resolved": float(np.mean([r.planted["relations_resolved"] for r in v])),
             "unique_kept": float(np.mean([r.planted["unique_kept"] for r in v])),
             "units_removed": float(np.mean([r.removed["units"] for r in v]))}
            for (m, t), v in sorted(groups.items(), key=lambda kv: (kv[0][0], target_order(kv[0][1])))]


def mean_base_accuracy(records) -> float | None:
    """The unpruned trained model's test accuracy, mean over seeds (None without a trained run)."""
    per_seed = {r.seed: r.base["test_accuracy"] for r in records if r.regime == "trained"}
    return float(np.mean(list(per_seed.values()))) if per_seed else None


DEFAULT = "mipp"  # the label of MIPP's runs with its shipped defaults: the findings' reference


def is_mipp(method_name: str) -> bool:
    """MIPP itself or one of its ablations (mipp-widths, mipp-uniform): never a baseline of MIPP."""
    return method_name == "mipp" or method_name.startswith("mipp-")


MISS = 0.01  # a run whose reached cost is more than 1 point from its target is marked, never compared


def paired_differences(rows, stages, confidence: float = 0.95) -> list[dict]:
    """MIPP against each baseline at directly run, equal targets: per model, data, regime, metric, target and stage,
    the difference of test accuracy (MIPP - baseline) paired by seed (both runs pruned the same base model), its
    mean, standard deviation and `confidence` interval (Student t over the seeds), and a verdict from the
    interval: "ahead" (it lies above 0), "behind" (below 0), "even" (it holds 0), or "n<2" (one seed: no interval).
    Every MIPP variant (method_name "mipp" with a target) is a reference, paired with every baseline (kind
    "baseline"); the shipped default, labelled DEFAULT, is also paired with the other MIPP variants and ablations in
    its cell (kind "ablation": mipp-mean, mipp-greedy, mipp-widths-*, ...). Runs that miss their target by more
    than MISS are left out of the pairs and counted in `missed`. Nothing is interpolated."""
    groups = defaultdict(lambda: defaultdict(dict))  # cell -> method -> seed -> row
    names = {}
    for row in rows:
        if row["target"] is None:
            continue
        cell = (row["model"], row["data"], row["regime"], row["metric"], row["target"])
        groups[cell][row["method"]][row["seed"]] = row
        names[row["method"]] = row["method_name"]
    out = []
    for cell in sorted(groups, key=lambda c: c[:4] + (target_order(c[4]),)):
        methods = groups[cell]
        model, data, regime, metric, target = cell
        references = sorted(m for m in methods if names[m] == "mipp")
        baselines = sorted(m for m in methods if not is_mipp(names[m]))
        ablations = sorted(m for m in methods if is_mipp(names[m]) and m != DEFAULT)
        for reference in references:
            others = [(b, "baseline") for b in baselines]
            others += [(a, "ablation") for a in ablations] if reference == DEFAULT else []
            for baseline, kind in others:
                seeds = sorted(set(methods[reference]) & set(methods[baseline]))
                hit = [s for s in seeds if all(abs(methods[m][s][f"{metric}_removed"] - target) <= MISS
                                               for m in (reference, baseline))]
                for stage in stages:
                    found = _paired([(methods[reference][s], methods[baseline][s]) for s in hit], stage, confidence)
                    if found:
                        out.append({"model": model, "data": data, "regime": regime, "metric": metric,
                                    "target": target, "stage": stage, "reference": reference, "baseline": baseline,
                                    "kind": kind, **found, "missed": len(seeds) - len(hit)})
    return out


def at_reached_cost(rows, pairs, stages, confidence: float = 0.95) -> list[dict]:
    """`pairs` (from `paired_differences`) with MIPP's default compared to an ablation at the very cost the
    ablation reached, where such runs exist: a matched run labelled "DEFAULT@LABEL" (e.g. `mipp@mipp-uniform`,
    targets ["as:mipp-uniform"]) runs MIPP's shipped default at the fraction each LABEL run removed. Such a pair
    (kind "ablation", the LABEL run's target, baseline "LABEL (at its cost)", `removed` the mean fraction the LABEL
    runs removed) replaces the direct one of its cell:
    an ablation that keeps the same share of every layer can miss a MACs target on a small net by 2 points, and
    would otherwise not be compared at all. Pairs whose two runs removed fractions more than MISS apart are left
    out and counted in `missed`."""
    by_id = {r["run_id"]: r for r in rows}
    groups = defaultdict(list)  # (model, data, regime, metric, target, ablation) -> [(default row, ablation row)]
    missed = defaultdict(int)
    for row in rows:
        ablation = by_id.get(row["matched_run"]) if row["matched"] else None
        if ablation is None or ablation["target"] is None or row["method"] != f"{DEFAULT}@{row['matched']}":
            continue
        cell = (row["model"], row["data"], row["regime"], row["metric"], ablation["target"], row["matched"])
        if abs(row[f"{row['metric']}_removed"] - ablation[f"{row['metric']}_removed"]) > MISS:
            missed[cell] += 1
        else:
            groups[cell].append((row, ablation))
    found = []
    for cell in sorted(set(groups) | set(missed), key=lambda c: c[:4] + (target_order(c[4]), c[5])):
        model, data, regime, metric, target, ablation = cell
        for stage in stages:
            paired = _paired(groups[cell], stage, confidence)
            if paired:
                found.append({"model": model, "data": data, "regime": regime, "metric": metric, "target": target,
                              "stage": stage, "reference": DEFAULT, "baseline": f"{ablation} (at its cost)",
                              "kind": "ablation", **paired, "missed": missed[cell],
                              "removed": float(np.mean([a[f"{metric}_removed"] for _, a in groups[cell]]))})
    replaced = {cell for cell in groups if groups[cell]}
    kept = [p for p in pairs if p["kind"] != "ablation" or p["reference"] != DEFAULT or
            (p["model"], p["data"], p["regime"], p["metric"], p["target"], p["baseline"]) not in replaced]
    return kept + found


def _paired(row_pairs, stage: str, confidence: float) -> dict | None:
    """The paired difference of test accuracy at `stage` over (reference row, baseline row) pairs of one seed each:
    n, both means, the difference's mean, standard deviation and Student-t interval, and the verdict."""
    from scipy import stats  # imported on first use (scipy takes ~1 s)

    pairs = [(a[f"acc_{stage}"], b[f"acc_{stage}"]) for a, b in row_pairs]
    pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return None
    diff = np.array([a - b for a, b in pairs])
    n = len(diff)
    std = float(diff.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    mean = float(diff.mean())
    verdict = "n<2" if n < 2 else "ahead" if mean - half > 0 else "behind" if mean + half < 0 else "even"
    return {"n": n, "reference_accuracy": float(np.mean([a for a, _ in pairs])),
            "baseline_accuracy": float(np.mean([b for _, b in pairs])), "difference": mean, "difference_std": std,
            "ci_low": mean - half, "ci_high": mean + half, "verdict": verdict}


def matched_differences(rows, stages, confidence: float = 0.95) -> list[dict]:
    """Each baseline run at the sparsity another run chose (a matched target, e.g. MIPP's confidence mode) against
    that run, paired by seed as in `paired_differences`: per model, data, regime, metric, reference label, baseline
    and stage, with the reference's mean fraction of the metric removed; a pair whose two runs removed fractions more
    than MISS apart is left out and counted in `missed`. Only references that chose their own sparsity (no target):
    runs matched to a run with a target are MIPP at an ablation's reached cost (see `at_reached_cost`)."""
    references = {r["run_id"]: r for r in rows}
    groups = defaultdict(lambda: defaultdict(list))  # (model, data, regime, metric, label) -> baseline -> pairs
    missed = defaultdict(int)
    for row in rows:
        if not row["matched"]:
            continue
        reference = references.get(row["matched_run"])
        if reference is None or reference["target"] is not None:
            continue
        cell = (row["model"], row["data"], row["regime"], row["metric"], row["matched"])
        metric = row["metric"]
        if abs(row[f"{metric}_removed"] - reference[f"{metric}_removed"]) > MISS:
            missed[cell, row["method"]] += 1
            continue
        groups[cell][row["method"]].append((reference, row))
    out = []
    for cell in sorted(groups):
        model, data, regime, metric, label = cell
        for baseline, pairs in sorted(groups[cell].items()):
            removed = float(np.mean([reference[f"{metric}_removed"] for reference, _ in pairs]))
            for stage in stages:
                found = _paired(pairs, stage, confidence)
                if found:
                    out.append({"model": model, "data": data, "regime": regime, "metric": metric, "reference": label,
                                "removed": removed, "stage": stage, "baseline": baseline, **found,
                                "missed": missed[cell, baseline]})
    return out


def missed_targets(rows) -> list[dict]:
    """Runs whose reached cost (fraction of their metric removed) is more than MISS from their target."""
    return [{k: r[k] for k in ("model", "data", "regime", "method", "metric", "target", "seed")} |
            {"reached": r[f"{r['metric']}_removed"]}
            for r in rows if r["target"] is not None and abs(r[f"{r['metric']}_removed"] - r["target"]) > MISS]
