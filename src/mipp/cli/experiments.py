"""`mipp sweep` and `mipp report`: the experiment subcommands (plumbing lives in mipp.cli.common).

    mipp sweep --config configs/lenet5-fmnist-grid.json --out runs/lenet5      (rerun the same command to resume)
    mipp sweep --models mlp --data synthetic --methods mipp,random --targets 0.5,0.7 --seeds 0,1 --out runs/try
    mipp report --runs runs/lenet5 runs/planted --out docs/

Flags given with --config override the file's values; --width, --limit, --deform and --data-option apply to every
model or data entry.  A sweep runs on one CPU thread by default: its runs are small, and multi-threaded kernels on a
busy machine wait for descheduled threads (a LeNet-5 epoch took 7 s on one thread and 150 s on two here).  For
parallelism run the same command once per core: the processes share the runs of the --out they share, each taking
the next run nobody holds (`--shard I/N` splits them in fixed shares instead, for machines without a shared disk).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mipp.cli.common import add_command, configure_threads, parse_key_values


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    return [int(item) for item in _list(text)]


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N such as 0/2, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "sweep", sweep_command, render=render_sweep,
                         help="run a sweep of pruning experiments into a result store (resumable)")
    parser.add_argument("--config", default=None, help="sweep config (JSON, see configs/); flags override it")
    parser.add_argument("--out", required=True, help="result store folder; rerunning resumes it")
    parser.add_argument("--name", default=None, help="name of the sweep (default: from the config, else 'sweep')")
    parser.add_argument("--models", type=_list, default=None, help="comma-separated model names")
    parser.add_argument("--data", type=_list, default=None, help="comma-separated data set names")
    parser.add_argument("--methods", type=_list, default=None, help="comma-separated methods, or 'all'")
    parser.add_argument("--targets", type=_list, default=None,
                        help="fractions to remove, e.g. 0.5,0.7,0.9 ('none': the method decides, MIPP only)")
    parser.add_argument("--metric", choices=("units", "params", "macs"), default=None, help="what a target counts")
    parser.add_argument("--regimes", type=_list, default=None, help="init,trained (default both)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--finetune", type=_ints, default=None, help="fine-tuning budgets in epochs, e.g. 0,1,3")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of the base models (default 10)")
    parser.add_argument("--finetune-lr", type=float, default=None, help="learning rate of fine-tuning (default 0.01)")
    parser.add_argument("--width", type=float, default=None, help="width multiplier of every model")
    parser.add_argument("--limit", type=int, default=None, help="class-stratified subset of each data split")
    parser.add_argument("--deform", action="store_true", default=None,
                        help="the deformed-data study: each image goes through one of a fixed set of random "
                             "transformations, chosen at random and fixed for the run")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="data set option for every data entry (repeatable)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default 2000)")
    parser.add_argument("--min-units", type=float, default=None, help="collapse guard (default 1 unit per group)")
    parser.add_argument("--train-eval-n", type=int, default=None, help="examples for train accuracy (default 10000)")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurements")
    parser.add_argument("--reconstruct", action="store_true", default=None,
                        help="re-fit the readers of removed units after surgery, for every method")
    parser.add_argument("--recalibrate", action="store_true", default=None,
                        help="re-estimate batch-norm statistics after surgery, for every method")
    parser.add_argument("--data-root", default=None, help="folder holding the data files")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: run more processes on the same --out instead)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="run only shard I of N (0-based), a fixed share; processes on one --out share its "
                             "runs without it")
    parser.add_argument("--dry-run", action="store_true", help="only count the runs and how many are finished")
    return parser


def sweep_config(args: argparse.Namespace):
    from mipp.experiments.config import SweepConfig

    config = SweepConfig.load(args.config) if args.config else SweepConfig()
    simple = {"name": args.name, "models": args.models, "data": args.data, "methods": args.methods,
              "targets": args.targets, "metric": args.metric, "regimes": args.regimes, "seeds": args.seeds,
              "finetune_epochs": args.finetune, "n_samples": args.samples, "train_eval_n": args.train_eval_n,
              "data_root": args.data_root, "device": args.device}
    for key, value in simple.items():
        if value is not None:
            setattr(config, key, value)
    if args.min_units is not None:
        config.min_units = int(args.min_units) if args.min_units >= 1 else args.min_units
    if args.epochs is not None:
        config.train = {**config.train, "epochs": args.epochs}
    if args.finetune_lr is not None:
        config.finetune = {**config.finetune, "lr": args.finetune_lr}
    if args.no_latency:
        config.latency = False
    for flag in ("reconstruct", "recalibrate"):
        if getattr(args, flag):
            setattr(config, flag, True)
    if args.width is not None:
        config.models = [{**({"name": m} if isinstance(m, str) else m), "width": args.width} for m in config.models]
    options = parse_key_values(args.data_option)
    if args.limit is not None or args.deform or options:
        entries = []
        for entry in config.data:
            entry = {"name": entry} if isinstance(entry, str) else dict(entry)
            if args.limit is not None:
                entry["limit"] = args.limit
            if args.deform:
                entry["deform"] = entry.get("deform") or True
            entry["options"] = {**entry.get("options", {}), **options}
            entries.append(entry)
        config.data = entries
    return config


def sweep_command(args: argparse.Namespace) -> dict:
    from mipp.experiments.config import expand
    from mipp.experiments.runner import run_sweep, shard_runs
    from mipp.experiments.store import ResultStore, is_finished

    config = sweep_config(args)
    configure_threads(args.threads)
    if args.dry_run:
        runs = shard_runs(expand(config), *args.shard)
        store = ResultStore(args.out)
        finished = sum(is_finished(store.get(r.run_id), r.finetune_epochs, args.retry_failed) for r in runs)
        return {"out": args.out, "runs": len(runs), "already": finished, "to_do": len(runs) - finished,
                "dry_run": True}
    argv = ["mipp"] + sys.argv[1:] if Path(sys.argv[0]).name in ("mipp", "__main__.py") else None
    return run_sweep(config, args.out, retry_failed=args.retry_failed, argv=argv, shard=args.shard)


def render_sweep(result: dict) -> str:
    if result.get("dry_run"):
        return f"{result['runs']} runs: {result['already']} finished, {result['to_do']} to do ({result['out']})"
    text = (f"{result['runs']} runs: {result['already']} already finished, {result['done']} done now, "
            f"{result['skipped']} skipped, {result['failed']} failed -> {result['out']}/runs")
    if result.get("elsewhere"):
        text += f"\n{result['elsewhere']} runs are still running in other processes on the same --out"
    if result["failed"]:
        text += "\nfailed runs keep their traceback in their record; fix the cause and rerun with --retry-failed"
    return text


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "report", report_command, render=render_report,
                         help="tables (Markdown, CSV) and figures (PNG) from one or more sweeps' result stores")
    parser.add_argument("--runs", nargs="+", required=True, help="result store folders (the --out of mipp sweep)")
    parser.add_argument("--out", required=True, help="where results.md, tables/ and figures/ go (e.g. docs/)")
    parser.add_argument("--layer-target", type=float, default=0.7,
                        help="target of the per-layer and fine-tuning figures (nearest one run; default 0.7)")
    parser.add_argument("--latency", default=None,
                        help="add the latency table of a benchmarks/bench_latency.py result (its JSON --out)")
    parser.add_argument("--readme", default=None,
                        help="also replace the findings block of this Markdown file (e.g. README.md) with the "
                             "new OUT/findings.md")
    return parser


def report_command(args: argparse.Namespace) -> dict:
    from mipp.experiments.report import build_report

    command = f"mipp report --runs {' '.join(args.runs)} --out {args.out}"
    if args.layer_target != 0.7:
        command += f" --layer-target {args.layer_target}"
    if args.latency is not None:
        command += f" --latency {args.latency}"
    result = build_report(args.runs, args.out, layer_target=args.layer_target, command=command,
                          latency=args.latency)
    if args.readme is not None:
        from mipp.experiments.findings import replace_block

        result["readme"] = replace_block(args.readme, (Path(args.out) / "findings.md").read_text())
    return result


def render_report(result: dict) -> str:
    return (f"{result['runs']} runs ({result['skipped_or_failed']} skipped or failed) -> {result['report']}\n"
            f"tables: {', '.join(result['tables'])}\nfigures: {', '.join(result['figures'])}")
