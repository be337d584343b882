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
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

Handler = Callable[[argparse.Namespace], dict]
Renderer = Callable[[dict], str]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Exception types that mean "the user gave bad input": reported in one line, exit status 2.  mipp's data and
# checkpoint errors subclass the first two.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


# The library's argument names and the flags that set them, for the commands whose every setting is a flag: an
# error raised by the library is reworded at the CLI boundary (n_samples=2000 -> --samples 2000).  Names with an
# underscore are replaced wherever they stand; plain words (lr, budget) only as ``name=value`` or ``name must``.
FLAGS = {
    "n_samples": "--samples", "min_units": "--min-units", "budget": "--budget", "metric": "--metric",
    "confidence": "--confidence", "estimator": "--estimator", "pool": "--pool", "features": "--features",
    "positions": "--positions", "batch_size": "--batch-size",
    "lr": "--lr", "epochs": "--epochs", "weight_decay": "--weight-decay", "label_smoothing": "--label-smoothing",
    "warmup_epochs": "--warmup-epochs", "checkpoint_every": "--checkpoint-every", "num_workers": "--num-workers",
    "limit": "--limit", "width": "--width", "seed": "--seed", "device": "--device",
    "recalibration_batches": "--recalibration-batches", "n_batches": "--recalibration-batches",
    "data_root": "--data-root",
}


def flag_names(*names: str, **renamed: str) -> dict:
    """The part of FLAGS a command has (``names``), plus arguments its flags name otherwise (lr="--finetune-lr")."""
    return {**{name: FLAGS[name] for name in names}, **renamed}


SWITCHES = {"reconstruct=False": "--no-reconstruct", "recalibrate=False": "--no-recalibrate",
            "resume=False": "--no-resume"}


def add_command(subparsers, name: str, handler: Handler, *, help: str, render: Optional[Renderer] = None,
                flags: Optional[dict] = None) -> argparse.ArgumentParser:
    """Create subcommand ``name`` with the shared flags; ``render`` turns its result into the human summary.

    ``flags``: library argument -> flag, to reword the library's errors in this command's terms (see FLAGS);
    None leaves them as they are (e.g. for a command whose settings come from a config file)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout instead of the human-readable summary")
    parser.set_defaults(handler=handler, render=render or render_key_values, flags=flags)
    return parser


def in_flag_terms(message: str, flags: Optional[dict]) -> str:
    """``message`` with the library's argument names replaced by the command's flags (``flags``: see FLAGS)."""
    if not flags:
        return message
    message = re.sub(r"\s*\(\w+\(\.\.\., [^()]*\)\)", "", message)  # "(fit(..., resume=False))": an API hint
    for switch, flag in SWITCHES.items():
        message = re.sub(rf"\b{re.escape(switch)}", flag, message)

    def assignment(match: re.Match) -> str:
        values = match.group(2).replace("'", "").replace('"', "")
        return f"{flags[match.group(1)]} {values}"

    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    value = r"('[^']*'(?:\|'[^']*')*|\"[^\"]*\"|[\w.+-]+)"
    message = re.sub(rf"(?<![\w-])({names})={value}", assignment, message)
    message = re.sub(rf"(?<![\w-])({names})(?= must\b)", lambda m: flags[m.group(1)], message)
    underscored = "|".join(sorted((re.escape(n) for n in flags if "_" in n), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({underscored})\b", lambda m: flags[m.group(1)], message)


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


MAX_DEFAULT_THREADS = 4  # past this, the small models here gain little from more torch threads


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for this command (see :func:`default_threads`)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS if set, else the physical cores not busy "
                             f"with other work, at most {MAX_DEFAULT_THREADS})")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once; the CPU count where unknown)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as handle:
            blocks = handle.read().split("\n\n")
    except OSError:
        return usable
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return max(1, min(usable, len(cores) or usable))


def default_threads() -> int:
    """min(physical cores, 4), less the cores other work keeps busy (1-minute load average), at least 1.

    Why: torch's default (one thread per logical CPU) thrashes on a shared or busy machine; a LeNet-5 epoch here
    went from 4 s to 300 s with threads competing against other processes."""
    cores = physical_cores()
    busy = math.floor(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(MAX_DEFAULT_THREADS, cores, cores - busy))


def configure_threads(requested: Optional[int]) -> int:
    """Set torch's CPU threads: ``requested`` (--threads), else OMP_NUM_THREADS as torch read it, else
    :func:`default_threads`; returns the number used."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()  # torch took it from the environment at import
    else:
        threads = default_threads()
    torch.set_num_threads(threads)
    logging.getLogger("mipp").debug("torch CPU threads: %d", threads)
    return threads


def setup_logging() -> None:
    """Send mipp's log messages, bare, to stderr (once)."""
    logger = logging.getLogger("mipp")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Commands that run as one job over several processes under torchrun (mipp.distributed); the others refuse.
DISTRIBUTED_COMMANDS = ("train", "eval", "prune")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def torchrun_world() -> int:
    """The number of processes torchrun started (0 when this process was not started by torchrun). Read from the
    environment, without importing torch."""
    if not all(os.environ.get(name, "").strip() for name in TORCHRUN_VARIABLES):
        return 0
    return int(os.environ["WORLD_SIZE"])


@contextlib.contextmanager
def _process_group(args: argparse.Namespace):
    """Under torchrun, join the process group for the command (rank 0 alone shows progress and prints the result);
    yields whether this process prints. A command that cannot share its work refuses several processes."""
    world = torchrun_world()
    if not world:
        yield True
        return
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS:
        raise ValueError(f"`mipp {args.command}` does not run under torchrun (it started {world} processes); run it "
                         f"as one process (python -m mipp {args.command} ...). Under torchrun: "
                         f"{', '.join(DISTRIBUTED_COMMANDS)}")
    from mipp import distributed
    from mipp.progress import quiet

    with distributed.process_group(getattr(args, "device", "auto")):
        if distributed.is_main():
            yield True
            return
        logger = logging.getLogger("mipp")
        level = logger.level
        logger.setLevel(logging.WARNING)  # rank 0 tells the story; the others only warn
        try:
            with quiet():
                yield False
        finally:
            logger.setLevel(level)


def run_handler(args: argparse.Namespace) -> int:
    """Run the parsed command's handler and print its result; returns the exit status (0, 2 or 130).

    Under torchrun each process runs the handler (the handlers share the work through mipp.distributed) and rank
    0 alone prints the result."""
    stdout = sys.stdout
    prints = True
    try:
        with contextlib.redirect_stdout(sys.stderr):  # only the result itself goes to stdout
            with _process_group(args) as prints:
                result = args.handler(args)
    except BAD_INPUT_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = in_flag_terms(message, getattr(args, "flags", None))
        print(f"mipp {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mipp {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not prints:
        return 0
    if args.json:
        print(json.dumps(result), file=stdout)
    else:
        print(args.render(result), file=stdout)
    return 0
