"""`mipp prune`, `mipp methods` and `mipp demo`: the pruning subcommands (plumbing lives in mipp.cli.common)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mipp.cli.common import (add_command, add_data_arguments, add_threads_argument, check_model_fits_data, configure_threads,
                             data_call, flag_names, parse_key_values)
from mipp.reconstruct import DEFAULT_MODE, RECONSTRUCT_MODES

PRUNE_FLAGS = flag_names("n_samples", "min_units", "budget", "metric", "confidence", "estimator", "pool", "features",
                         "positions", "limit",
                         "seed", "device", "data_root", "recalibration_batches", "n_batches",
                         lr="--finetune-lr", epochs="--finetune-epochs", batch_size="--finetune-batch-size",
                         num_workers="--num-workers")
DEMO_FLAGS = flag_names("epochs", "limit", "seed", "device", "data_root", "n_samples", budget="--budgets")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1), e.g. 0.5")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of batches, e.g. 16")
    return value


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    from mipp.methods import BUDGET_METRICS
    from mipp.recalibrate import RECALIBRATION_BATCHES

    parser = add_command(subparsers, "prune", prune_command, render=render_prune, flags=PRUNE_FLAGS,
                         help="prune a saved model; writes the pruned model, its Plan and a per-layer summary")
    parser.add_argument("--checkpoint", required=True, help="model file written by `mipp train` (OUT/model.pt)")
    add_data_arguments(parser)
    parser.add_argument("--method", default="mipp", help="pruning method (default mipp; see `mipp methods`)")
    parser.add_argument("--budget", type=_fraction, default=None,
                        help="fraction to remove, e.g. 0.7; without it MIPP decides by --confidence")
    parser.add_argument("--metric", choices=BUDGET_METRICS, default="units", help="what --budget counts")
    parser.add_argument("--confidence", type=float, default=0.95, help="MIPP's significance level x (default 0.95)")
    parser.add_argument("--estimator", default="gaussian", help="MIPP's MI estimator: gaussian, ksg or proxy")
    parser.add_argument("--pool", type=int, default=None,
                        help="MIPP with --features mean: pool conv channels to a KxK grid instead of the mean")
    parser.add_argument("--features", choices=("auto", "patches", "mean"), default="auto",
                        help="MIPP's features of a conv channel: k x k patches at sampled positions, or the spatial "
                             "mean (cheaper); auto (default): with the gaussian estimator, patches for each group "
                             "whose readers have at most 2048 features and as many sampled rows, the mean for the "
                             "rest")
    parser.add_argument("--positions", type=int, default=None,
                        help="MIPP with patches: output positions sampled per image (default 16)")
    parser.add_argument("--min-units", type=float, default=1,
                        help="collapse guard: units every layer keeps (>= 1), or a fraction of its width (< 1)")
    parser.add_argument("--samples", type=int, default=2000, help="calibration samples (default 2000)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra option of the method, e.g. rounds=5 for imp or p=2 for magnitude (repeatable)")
    parser.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                        help="re-fit the readers of removed units to the original outputs (default on)")
    parser.add_argument("--reconstruct-mode", choices=RECONSTRUCT_MODES, default=DEFAULT_MODE,
                        help="'independent': every reader from the original network's inputs (one pass); "
                             "'sequential': one reader after the other from the pruned network's own inputs, so that "
                             f"errors of earlier layers are compensated (a pass per reader; default {DEFAULT_MODE})")
    parser.add_argument("--recalibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="re-estimate batch-norm statistics after pruning (default on)")
    parser.add_argument("--recalibration-batches", type=_positive, default=RECALIBRATION_BATCHES,
                        help=f"calibration batches of 128 for --recalibrate (default {RECALIBRATION_BATCHES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the pruned model (default 0)")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-batch-size", type=int, default=None,
                        help="fine-tuning batch size, over all processes under torchrun (default 128)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers for fine-tuning on data read from files (default 0)")
    parser.add_argument("--finetune-checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="save the fine-tuning state to OUT/finetune-state.pt every STEPS steps and at each epoch "
                             "end, and resume from it when the same command is rerun (it prunes again, to the same "
                             "model, first); default 0: no state file")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>-<method>)")
    add_threads_argument(parser)
    return parser


def prune_command(args: argparse.Namespace) -> dict:
    from mipp import data, distributed
    from mipp.api import prune
    from mipp.checkpoint import load_model, save_model
    from mipp.io import atomic_write_json, atomic_write_text
    from mipp.measure import count_params
    from mipp.train import TrainConfig, evaluate, fit, resolve_device

    started = time.perf_counter()
    configure_threads(args.threads)
    options = parse_key_values(args.data_option)
    data_name = data.canonical_name(args.data)
    device = resolve_device(args.device)
    model, record = load_model(args.checkpoint)
    if record.get("plan") is not None:
        raise ValueError(f"{args.checkpoint} is already pruned; prune the original model (its Plan would not "
                         "match the pruned widths)")
    info = data_call(data.dataset_info, data_name, root=args.data_root, **options)
    check_model_fits_data(record["model_config"], info, data_name)
    splits = {s: data_call(data.load_dataset, data_name, s, root=args.data_root, limit=args.limit, seed=0, **options)
              for s in ("train", "test")}
    method_options = parse_key_values(args.method_option)
    if args.method == "mipp":
        method_options = {"confidence": args.confidence, "estimator": args.estimator, "pool": args.pool,
                          "features": args.features, **method_options}
        if args.positions is not None:
            method_options["positions"] = args.positions
    min_units = int(args.min_units) if args.min_units >= 1 else args.min_units
    reconstruct = args.reconstruct and args.reconstruct_mode
    pruned, plan = prune(model, splits["train"], method=args.method, budget=args.budget, metric=args.metric,
                         min_units=min_units, n_samples=args.samples, seed=args.seed, reconstruct=reconstruct,
                         recalibrate=args.recalibrate, recalibration_batches=args.recalibration_batches,
                         device=device, **method_options)
    before, after = evaluate(model, splits["test"], device=device), evaluate(pruned, splits["test"], device=device)
    result = {"method": args.method, "budget": args.budget, "metric": args.metric,
              "reconstruct": reconstruct, "recalibrate": args.recalibrate,
              "recalibration_batches": args.recalibration_batches,
              "accuracy_before": before["accuracy"], "accuracy_pruned": after["accuracy"],
              "params_before": count_params(model), "params_after": count_params(pruned),
              **{k: v for k, v in plan.stats.items()}, "guard_hits": plan.guard_hits}
    out = Path(args.out or f"{Path(args.checkpoint).parent}-{args.method}")
    if args.finetune_epochs:
        sizes = {} if args.finetune_batch_size is None else {"batch_size": args.finetune_batch_size}
        tune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed, device=args.device,
                           checkpoint_every=0, num_workers=args.num_workers, **sizes)
        resumable = args.finetune_checkpoint_every > 0
        if resumable:
            tune.checkpoint_every = args.finetune_checkpoint_every
        identity = {"checkpoint": str(args.checkpoint), "data": data_name, "data_options": options,
                    "limit": args.limit, "plan": plan.kept}
        tuned = fit(pruned, splits["train"], tune, description=f"fine-tuning the pruned {args.method} model",
                    checkpoint_path=out / "finetune-state.pt" if resumable else None, identity=identity)
        if tuned["resumed_from"] is not None:
            result["finetune_resumed_from"] = tuned["resumed_from"]
        result["accuracy_finetuned"] = evaluate(pruned, splits["test"], device=device)["accuracy"]
    writes = distributed.is_main()  # under torchrun every rank holds the same pruned model; rank 0 writes it
    if writes:
        save_model(out / "model.pt", pruned.cpu(), plan=plan.to_dict(), metrics=result)
        plan.save(out / "plan.json")
        atomic_write_text(out / "summary.txt", plan.summary() + "\n")
    result.update(out=str(out), model_path=str(out / "model.pt"), plan_path=str(out / "plan.json"),
                  summary=plan.summary(), wall_seconds=time.perf_counter() - started)
    if distributed.world_size() > 1:
        result["processes"] = distributed.world_size()
    if writes:
        atomic_write_json(out / "metrics.json", result)
    return result


def render_prune(result: dict) -> str:
    lines = [result["summary"], "",
             f"{result['method']}: {100 * result['units_removed']:.1f}% of units, "
             f"{100 * result['params_removed']:.1f}% of parameters, {100 * result['macs_removed']:.1f}% of MACs removed",
             f"test accuracy {100 * result['accuracy_before']:.2f}% -> {100 * result['accuracy_pruned']:.2f}% "
             "right after pruning"]
    if "accuracy_finetuned" in result:
        lines.append(f"after fine-tuning: {100 * result['accuracy_finetuned']:.2f}%")
    lines.append(f"pruned model: {result['model_path']}\nplan: {result['plan_path']}")
    return "\n".join(lines)


def add_methods_parser(subparsers) -> argparse.ArgumentParser:
    return add_command(subparsers, "methods", methods_command, render=render_methods,
                       help="list the pruning methods, their regimes and sources")


def methods_command(args: argparse.Namespace) -> dict:
    from mipp.methods import get_method, method_names

    return {"methods": [{"name": n, "regimes": list(get_method(n).regimes), "summary": get_method(n).summary}
                        for n in method_names()]}


def render_methods(result: dict) -> str:
    return "\n".join(f"{m['name']:<22} {'/'.join(m['regimes']):<13} {m['summary']}" for m in result["methods"])


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    from mipp.demo import DemoConfig

    defaults = DemoConfig()
    parser = add_command(subparsers, "demo", demo_command, render=render_demo, flags=DEMO_FLAGS,
                         help="train LeNet-5 on Fashion-MNIST, prune with MIPP and baselines, fine-tune, compare")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); reruns resume")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"training epochs of the base model (default {defaults.epochs})")
    parser.add_argument("--budgets", default=",".join(map(str, defaults.budgets)),
                        help="fractions of units to remove (default %(default)s)")
    parser.add_argument("--methods", default=",".join(defaults.methods),
                        help="methods to compare (default %(default)s; see `mipp methods`)")
    parser.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    parser.add_argument("--samples", type=int, default=defaults.n_samples,
                        help=f"calibration samples (default {defaults.n_samples})")
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--limit", type=int, default=None, help="train on a subset (quick look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    add_threads_argument(parser)
    return parser


def demo_command(args: argparse.Namespace) -> dict:
    from mipp.demo import DemoConfig, run_demo
    from mipp.methods import get_method

    configure_threads(args.threads)
    budgets = tuple(_fraction(b) for b in args.budgets.split(","))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for method in methods:
        get_method(method)  # an unknown name fails here, before the base model is trained
    config = DemoConfig(epochs=args.epochs, budgets=budgets, methods=methods, finetune_epochs=args.finetune_epochs,
                        n_samples=args.samples, data_root=args.data_root, limit=args.limit, seed=args.seed,
                        device=args.device)
    return run_demo(args.out, config)


def render_demo(result: dict) -> str:
    from mipp.demo import render_table

    return render_table(result) + "\nfiles: " + ", ".join(result["files"])
