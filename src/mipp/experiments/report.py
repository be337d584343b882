"""`mipp report`: tables (Markdown and CSV) and figures (PNG) from one or more result stores.

    OUT/results.md     per model and data set: accuracy (mean ± std over seeds) per method and target, MIPP against
                       each baseline, and the figures; then selection cost, the planted network, skipped runs
    OUT/tables/*.csv   runs (one row per run), summary (per model, data, regime, method, target), paired (MIPP
                       against each baseline and each of its own variants, kind "baseline" / "ablation", at equal
                       targets), matched (at the sparsity MIPP chose), missed, bases (the trained base models), compute
                       (CPU-hours per store), cost, planted, deformed
    (with --latency FILE, a table of measured latency, from benchmarks/bench_latency.py, and OUT/tables/latency.csv)
    OUT/figures/*.png  accuracy vs sparsity, layer collapse per 5% bin, per-layer kept fraction / network's kept
                       fraction, accuracy vs fine-tuning budget, selection cost

This module only orchestrates: the numbers (and how MIPP is compared with each baseline) are in statistics.py, the
tables and the Markdown in tables.py, the figures in figures.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from mipp.io import atomic_write_text
from mipp.experiments import figures, findings, statistics, tables
from mipp.experiments.record import RunRecord
from mipp.experiments.store import ResultStore


def read_stores(dirs) -> list[tuple[str, str, list[RunRecord], list[dict], list[tuple[str, dict]]]]:
    """Each store in `dirs`, read once: (folder, name, its records, its sweep log lines, (base folder name,
    base.json) of its trained base models)."""
    out = []
    for folder in dirs:
        store = ResultStore(folder)
        if not store.runs_dir.is_dir():
            raise FileNotFoundError(f"{folder} holds no runs/ folder: pass the --out folder of a `mipp sweep`")
        out.append((str(folder), Path(folder).name, list(store.records()), store.sweeps(), store.bases()))
    return out


def load(dirs, stores=None) -> tuple[list, list, list[tuple[str, dict]]]:
    """(finished runs, skipped and failed runs, (store, sweep log line) pairs) from the stores in `dirs` (or from
    `stores`, what `read_stores` read)."""
    done, other, sweeps = [], [], []
    for folder, name, records, lines, _ in stores if stores is not None else read_stores(dirs):
        for record in records:
            (done if record.status == "done" else other).append((name, record))
        sweeps += [(folder, line) for line in lines]
    return _apart(done), _apart(other), sweeps


def _apart(found: list[tuple[str, RunRecord]]) -> list[RunRecord]:
    """Records of one model and data label from several stores were made on different base models (each store trains its
    own): they are reported apart, the label followed by the store's name, never pooled as if they were seeds of
    one experiment. A label found in one store only is left as it is."""
    stores: dict[tuple[str, str], set[str]] = {}
    for store, record in found:
        stores.setdefault((record.model, record.data), set()).add(store)
    return [dataclasses.replace(record, model=f"{record.model} [{store}]")
            if len(stores[(record.model, record.data)]) > 1 else record for store, record in found]


LATENCY_FORMAT = "mipp-latency/1"


def load_latency(path) -> dict:
    """The JSON result of benchmarks/bench_latency.py, checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latency result at {path}: run `python benchmarks/bench_latency.py --out {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); rerun benchmarks/bench_latency.py") from exc
    if not isinstance(data, dict) or data.get("format") != LATENCY_FORMAT:
        raise ValueError(f"{path} is not a latency result ({LATENCY_FORMAT}); pass the --out of "
                         "benchmarks/bench_latency.py")
    return data


def build_report(dirs, out, *, layer_target: float = 0.7, command: str | None = None, latency=None) -> dict:
    """Write OUT/results.md, OUT/tables/*.csv and OUT/figures/*.png from the stores in `dirs` (and, given
    `latency`, the path of a benchmarks/bench_latency.py result, a latency section)."""
    out = Path(out)
    latency_result = load_latency(latency) if latency is not None else None
    stores = read_stores(dirs)
    done, other, sweeps = load(dirs, stores)
    if not done:
        raise ValueError(f"no finished runs in {', '.join(map(str, dirs))}: run `mipp sweep` first")
    stages = statistics.stage_names(done)
    every_row = statistics.run_rows(done, stages)
    matched = statistics.matched_differences(every_row, stages)
    # runs at another run's sparsity have a target of their own per seed: compared in their own section only
    n_matched = sum(1 for r in done if r.matched)
    done = [r for r in done if not r.matched]
    rows = [r for r in every_row if not r["matched"]]
    summary = statistics.summarize(rows, stages)
    cost, planted = statistics.selection_cost(rows), statistics.planted_rows(done)
    bases = statistics.base_rows([(name, base, metrics) for _, name, _, _, found in stores for base, metrics in found])
    compute = statistics.compute_rows([(name, [r for r in records if r.status == "done"], [m for _, m in found])
                                       for _, name, records, _, found in stores])
    deformed = statistics.deformed_rows(rows, stages)
    pairs = statistics.at_reached_cost(every_row, statistics.paired_differences(rows, stages), stages)
    missed = statistics.missed_targets(rows)
    csvs = {"runs": every_row, "paired": pairs, "matched": matched, "missed": missed, "summary": summary,
            "cost": cost, "bases": bases, "compute": compute, "planted": planted,
            "deformed": tables.deformed_csv(deformed),
            "latency": latency_result["rows"] if latency_result else []}
    for name, table in csvs.items():
        if table:
            tables.write_csv(out / "tables" / f"{name}.csv", table)
    md = [tables.intro_section(len(done), n_matched, len(other), command), tables.commands_section(sweeps, done)]
    found = findings.findings(pairs, planted, matched, summary)
    atomic_write_text(out / "findings.md", found)
    md.append("\n## Findings\n\nWhat the README carries (from the paired comparisons below).\n\n" + found)
    md.append(tables.paired_section([p for p in pairs if p["kind"] == "baseline"], stages))
    md.append(tables.ablation_section([p for p in pairs if p["kind"] == "ablation"], stages))
    md.append(tables.matched_section(matched, stages))
    md.append(tables.missed_section(missed))
    md.append(tables.bases_section(bases))
    md.append(tables.compute_section(compute))
    names = []
    for model, data in sorted({(r["model"], r["data"]) for r in rows}):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}_{data}".replace("@", "w")).strip("_")
        part = [e for e in summary if (e["model"], e["data"]) == (model, data)]
        part_rows = [r for r in rows if (r["model"], r["data"]) == (model, data)]
        part_records = [r for r in done if (r.model, r.data) == (model, data)]
        base = statistics.mean_base_accuracy(part_records)
        mine = figures.plot_model(part, part_rows, part_records, stages, base, layer_target, out / "figures", slug)
        names += list(mine.values())
        md.append(tables.model_section(model, data, base, part, stages, mine))
    figures.plot_cost(cost, out / "figures" / "selection_cost.png")
    names.append("selection_cost.png")
    md.append(tables.cost_section(cost))
    if latency_result:
        md.append(tables.latency_section(latency_result, str(latency)))
    md += [tables.planted_section(planted), tables.deformed_section(deformed),
           tables.skipped_section(other)]
    atomic_write_text(out / "results.md", "".join(md))
    _remove_stale(out / "tables", "*.csv", {f"{n}.csv" for n, table in csvs.items() if table})
    _remove_stale(out / "figures", "*.png", set(names))
    return {"out": str(out), "report": str(out / "results.md"), "runs": len(done) + n_matched,
            "skipped_or_failed": len(other),
            "tables": sorted(f"tables/{n}.csv" for n, t in csvs.items() if t),
            "figures": [f"figures/{f}" for f in names]}


def _remove_stale(folder: Path, pattern: str, written: set[str]) -> None:
    """Tables and figures an earlier report wrote and this one did not (a store no longer reported, a section
    that has no rows now): left there, they would read as current."""
    for path in folder.glob(pattern):
        if path.name not in written:
            path.unlink()
