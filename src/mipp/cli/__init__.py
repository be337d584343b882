"""The ``mipp`` command: one subcommand per job, each a parser builder plus a handler returning a JSON-able dict.

    common.py       shared flags and plumbing: add_command (--json), data flags, KEY=VALUE options, errors
    train.py        `mipp train`, `mipp eval`
    prune.py        `mipp prune`, `mipp methods`, `mipp demo`
    experiments.py  `mipp sweep`, `mipp report`
    export.py       `mipp export`

Adding a subcommand: write ``add_<name>_parser(subparsers)`` in its family's module, calling
:func:`mipp.cli.common.add_command` (which adds ``--json`` and registers the handler) and then its own arguments,
and list it in ``COMMANDS``.  Handlers import torch, data and training inside themselves, so ``mipp --help`` stays
fast.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

from mipp.version import __version__
from mipp.cli.common import run_handler, setup_logging
from mipp.cli.experiments import add_report_parser, add_sweep_parser
from mipp.cli.export import add_export_parser
from mipp.cli.prune import add_demo_parser, add_methods_parser, add_prune_parser
from mipp.cli.train import add_eval_parser, add_train_parser

# Parser builders, in the order `mipp --help` lists them.
COMMANDS: list[Callable] = [
    add_train_parser,
    add_eval_parser,
    add_prune_parser,
    add_export_parser,
    add_methods_parser,
    add_demo_parser,
    add_sweep_parser,
    add_report_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipp", description="Mutual-information-preserving structured pruning.")
    parser.add_argument("--version", action="version", version=f"mipp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for builder in COMMANDS:
        builder(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``mipp`` command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_handler(args)


__all__ = ["COMMANDS", "build_parser", "main"]
