"""`mipp export`: write a saved (pruned) model as TorchScript and/or ONNX, each checked against the PyTorch model."""
from __future__ import annotations

import argparse
from pathlib import Path

from mipp.cli.common import add_command

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    from mipp.export import EXPORTERS, ONNX_OPSET, TOLERANCE

    parser = add_command(subparsers, "export", export_command, render=render_export,
                         help="export a saved model (pruned by `mipp prune`, or an original plus a Plan) to "
                              "TorchScript and/or ONNX, checking the outputs against PyTorch")
    parser.add_argument("--checkpoint", required=True,
                        help="model file written by `mipp prune` (OUT/model.pt, carries its Plan) or `mipp train`")
    parser.add_argument("--plan", default=None,
                        help="Plan JSON to apply to an unpruned checkpoint (its kept weights, not re-fitted); with a "
                             "pruned checkpoint it must be the Plan the checkpoint carries")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="what to write (default both: NAME.torchscript.pt and NAME.onnx)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--name", default=None, help="file name stem (default: the checkpoint's, e.g. model)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch size of the example input traced and checked (default 2; batch 1 is checked too)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="ONNX exporter: dynamo (torch.export, needs onnxscript), torchscript (legacy), or auto")
    parser.add_argument("--torchscript-method", choices=("trace", "script"), default="trace")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest output difference allowed, relative to max(1, max |output|) (default "
                             f"{TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    return parser


def export_command(args: argparse.Namespace) -> dict:
    import torch

    from mipp.checkpoint import load_model
    from mipp.export import export_onnx, export_torchscript
    from mipp.measure import count_params
    from mipp.plan import Plan
    from mipp.surgery import apply_plan

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, record = load_model(args.checkpoint)
    carried = record.get("plan")
    plan_source = "checkpoint" if carried is not None else None
    if args.plan is not None:
        plan = Plan.load(args.plan)
        if carried is None:
            apply_plan(model, plan)
            plan_source = "file"
        elif Plan.from_dict(carried).kept != plan.kept:
            raise ValueError(f"{args.checkpoint} is already pruned by another Plan than {args.plan}; drop --plan "
                             "(the checkpoint carries its own) or pass the original model")
    config = record["model_config"]
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(args.batch_size, config["in_channels"], config["input_size"], config["input_size"],
                          generator=generator)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    name = args.name or Path(args.checkpoint).stem
    results = []
    for fmt in dict.fromkeys(args.format):
        path = out / f"{name}{SUFFIXES[fmt]}"
        if fmt == "torchscript":
            result = export_torchscript(model, example, path, method=args.torchscript_method,
                                        tolerance=args.tolerance)
        else:
            result = export_onnx(model, example, path, opset=args.opset, exporter=args.exporter,
                                 tolerance=args.tolerance)
        results.append(result.to_dict())
    return {"checkpoint": str(args.checkpoint), "model": config["name"], "plan_source": plan_source,
            "params": count_params(model), "input_shape": list(example.shape[1:]), "exports": results}


def render_export(result: dict) -> str:
    pruned = {"checkpoint": "pruned (Plan from the checkpoint)", "file": "pruned by the given Plan (weights not "
              "re-fitted)", None: "unpruned"}[result["plan_source"]]
    lines = [f"{result['model']}, {pruned}: {result['params']:,} parameters, input {result['input_shape']}"]
    for e in result["exports"]:
        lines.append(f"{e['format']:<11} {e['path']}  ({e['exporter']}; max difference {e['max_difference']:.2g}, "
                     f"allowed {e['tolerance']:.2g}, batches {e['checked_batch_sizes']})")
    return "\n".join(lines)
