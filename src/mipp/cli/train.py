"""`mipp train` and `mipp eval`: train a model from scratch (resumable) and evaluate a saved one."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mipp.cli.common import (add_command, add_data_arguments, add_threads_argument, check_model_fits_data, configure_threads,
                             data_call, flag_names, parse_key_values)

TRAIN_FLAGS = flag_names("lr", "epochs", "batch_size", "weight_decay", "label_smoothing", "warmup_epochs",
                         "checkpoint_every", "num_workers", "limit", "width", "seed", "device", "data_root")
EVAL_FLAGS = flag_names("batch_size", "limit", "device", "data_root")


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from mipp.train import AUGMENTATIONS, OPTIMIZERS, SCHEDULES

    parser = add_command(subparsers, "train", train_command, render=render_train, flags=TRAIN_FLAGS,
                         help="train a model from scratch (resumable: rerun the same command to continue)")
    parser.add_argument("--model", required=True, help="model name (see mipp.models.MODEL_NAMES)")
    add_data_arguments(parser)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the model (default 1.0)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra argument of the model, e.g. stem=imagenet for resnet18/34/50 (repeatable)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.05 sgd, 1e-3 adam)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default sgd (Nesterov, momentum 0.9)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default cosine)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default 5e-4")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up epochs (default 0)")
    parser.add_argument("--label-smoothing", type=float, default=None, help="default 0")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None, help="default none")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentation")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 200)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers for lazy data sets")
    parser.add_argument("--out", default=None, help="output folder (default runs/<model>-<data>-s<seed>)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    add_threads_argument(parser)
    return parser


def _train_config(args: argparse.Namespace):
    from mipp.train import TrainConfig

    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
             "schedule": args.schedule, "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
             "label_smoothing": args.label_smoothing, "augment": args.augment,
             "checkpoint_every": args.checkpoint_every, "num_workers": args.num_workers}
    return TrainConfig(seed=args.seed, device=args.device, **{k: v for k, v in flags.items() if v is not None})


def train_command(args: argparse.Namespace) -> dict:
    import torch

    from mipp import data, distributed
    from mipp.checkpoint import save_model
    from mipp.io import atomic_write_json
    from mipp.models import build_model
    from mipp.train import evaluate, fit

    started = time.perf_counter()
    configure_threads(args.threads)
    config = _train_config(args)
    options = parse_key_values(args.data_option)
    data_name = data.canonical_name(args.data)
    info = data_call(data.dataset_info, data_name, root=args.data_root, **options)
    torch.manual_seed(config.seed)
    model = build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        input_size=info.input_size, width=args.width, **parse_key_values(args.model_option))
    out = Path(args.out or f"runs/{args.model}-{data_name}-s{config.seed}")
    splits = {split: data_call(data.load_dataset, data_name, split, root=args.data_root, limit=args.limit, seed=0,
                                **options) for split in ("train", "test")}
    identity = {"data": data_name, "data_options": options, "limit": args.limit}
    result = fit(model, splits["train"], config, eval_set=splits["test"], checkpoint_path=out / "train-state.pt",
                 resume=not args.no_resume, identity=identity, description=f"training {args.model} on {data_name}")
    history = result["history"]
    final = ({"loss": history[-1]["eval_loss"], "accuracy": history[-1]["eval_accuracy"]} if history
             else evaluate(model, splits["test"]))
    summary = {
        "out": str(out), "model": args.model, "data": data_name, "epochs": config.epochs,
        "test_accuracy": final["accuracy"], "test_loss": final["loss"], "n_test": len(splits["test"]),
        "n_train": len(splits["train"]), "params": _param_count(model),
        "train_seconds": result["seconds"], "wall_seconds": time.perf_counter() - started,
        "resumed_from": result["resumed_from"],
        "model_path": str(out / "model.pt"), "metrics_path": str(out / "metrics.json"),
    }
    metrics = {**summary, "config": config.to_dict(), "model_config": model.mipp_config, "identity": identity,
               "history": history}
    if distributed.is_main():  # under torchrun every rank ends with the same weights; rank 0 writes them
        save_model(out / "model.pt", model, metrics=metrics)
        atomic_write_json(out / "metrics.json", metrics)
    return summary


def render_train(result: dict) -> str:
    resumed = result["resumed_from"]
    note = ""
    if resumed and resumed["epoch"] >= result["epochs"]:
        note = " (already trained: loaded from the checkpoint)"
    elif resumed:
        note = f" (resumed at epoch {resumed['epoch'] + 1}, step {resumed['step']})"
    return (f"{result['model']} on {result['data']}: test accuracy {100 * result['test_accuracy']:.2f}% "
            f"(loss {result['test_loss']:.4f}, n={result['n_test']}) after {result['epochs']} epochs{note}\n"
            f"training time {result['train_seconds']:.1f} s, wall time {result['wall_seconds']:.1f} s, "
            f"{result['params']:,} parameters\n"
            f"model: {result['model_path']}\nmetrics: {result['metrics_path']}")


# ----------------------------------------------------------------------------------------------- eval


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(subparsers, "eval", eval_command, render=render_eval, flags=EVAL_FLAGS,
                         help="evaluate a saved model (OUT/model.pt) on a data set")
    parser.add_argument("--checkpoint", required=True, help="model file written by `mipp train` (OUT/model.pt)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (default 512)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    add_threads_argument(parser)
    return parser


def eval_command(args: argparse.Namespace) -> dict:
    from mipp import data
    from mipp.checkpoint import load_model
    from mipp.train import evaluate, resolve_device

    configure_threads(args.threads)
    options = parse_key_values(args.data_option)
    data_name = data.canonical_name(args.data)
    device = resolve_device(args.device)
    model, record = load_model(args.checkpoint, device=device)
    info = data_call(data.dataset_info, data_name, root=args.data_root, **options)
    check_model_fits_data(record["model_config"], info, data_name)
    dataset = data_call(data.load_dataset, data_name, args.split, root=args.data_root, limit=args.limit, seed=0,
                         **options)
    scores = evaluate(model, dataset, batch_size=args.batch_size, device=device)
    return {"checkpoint": str(args.checkpoint), "data": data_name, "split": args.split, **scores,
            "params": _param_count(model), "pruned": record.get("plan") is not None}


def render_eval(result: dict) -> str:
    return (f"{result['checkpoint']} on {result['data']} ({result['split']}, n={result['n']}): "
            f"accuracy {100 * result['accuracy']:.2f}%, loss {result['loss']:.4f}, {result['params']:,} parameters")
