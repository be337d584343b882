"""What every ``mipp`` subcommand shares: the ``--json`` flag, the data flags, ``KEY=VALUE`` options, and how a
handler's result or bad-input error reaches the terminal.

A handler takes the parsed arguments and returns a dict; :func:`run_handler` prints it as one JSON object
(``--json``) or through the command's ``render`` function.  Bad input (ValueError, FileNotFoundError, mipp's data
and checkpoint errors) ends with a one-line message on stderr and exit status 2; logs and progress bars always go
to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence

Handler = Callable[[argparse.Namespace], dict]
Renderer = Callable[[dict], str]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Exception types that mean "the user gave bad input": reported in one line, exit status 2.  mipp's data and
# checkpoint errors subclass the first two.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def add_command(subparsers, name: str, handler: Handler, *, help: str,
                render: Optional[Renderer] = None) -> argparse.ArgumentParser:
    """Create subcommand ``name`` with the shared flags; ``render`` turns its result into the human summary."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout instead of the human-readable summary")
    parser.set_defaults(handler=handler, render=render or render_key_values)
    return parser


def render_key_values(result: dict) -> str:
    """Default human summary: one ``key: value`` line per scalar entry."""
    return "\n".join(f"{key}: {value}" for key, value in result.items() if not isinstance(value, (dict, list)))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name a data set: ``--data``, ``--data-root``, ``--limit`` and repeatable ``--data-option``."""
    parser.add_argument("--data", required=True, help="data set name (see mipp.data.DATASET_NAMES)")
    parser.add_argument("--data-root", default=None, help="folder holding the data files (else the default/env)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use a fixed class-stratified subset of at most N examples of each split")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra data set option, e.g. noise=2.0 for synthetic (repeatable)")


def parse_key_values(pairs: Sequence[str]) -> dict:
    """``KEY=VALUE`` strings -> dict; values are read as JSON where they parse (numbers, true, null), else text."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--data-option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def data_call(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a mipp.data function; an unknown data option (a TypeError there) is bad input, not a bug."""
    try:
        return function(*args, **kwargs)
    except TypeError as exc:
        if "does not take option" not in str(exc):
            raise
        raise ValueError(str(exc)) from exc


def check_model_fits_data(model_config: dict, info, data_name: str) -> None:
    """Refuse a data set whose channels, input size or classes differ from those the saved model was built for."""
    for field in ("in_channels", "input_size", "num_classes"):
        built, needed = model_config.get(field), getattr(info, field)
        if built is not None and built != needed:
            raise ValueError(f"the model was built for {field}={built} but {data_name} has {field}={needed}; "
                             "evaluate it on the data set it was trained for")


def setup_logging() -> None:
    """Send mipp's log messages, bare, to stderr (once)."""
    logger = logging.getLogger("mipp")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run_handler(args: argparse.Namespace) -> int:
    """Run the parsed command's handler and print its result; returns the exit status (0, 2 or 130)."""
    stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # only the result itself goes to stdout
            result = args.handler(args)
    except BAD_INPUT_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"mipp {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mipp {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(result), file=stdout)
    else:
        print(args.render(result), file=stdout)
    return 0
