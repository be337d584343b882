"""Claims: which of several processes sharing one result store runs which run, and trains which base model.

Processes that run the same sweep into one store take its runs as they come, so N processes (one per core, or per
machine on a shared file system) share the work evenly without being told how to split it. Before a run a process
takes an exclusive, non-blocking lock (`flock`) on the run's lock file and leaves the run to its holder if another
process has it; a base model is trained under a lock of its own, and the runs that need it wait (`Busy`) until it is
saved. The operating system drops a lock when its process ends, however it ends, so a killed process never leaves
a run claimed: its partial record and checkpoints resume in whichever process claims the run next. Lock files are
left in place (empty, git-ignored `*.lock`): removing one while another process opens it would let two processes
hold "the" lock. Where `fcntl` does not exist (Windows) every claim succeeds: run one process per store there.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class Busy(Exception):
    """What a run needs (its base model, or the run whose cost it matches) is being made by another process: try
    the run again later."""


@contextlib.contextmanager
def claim(path: str | Path) -> Iterator[bool]:
    """Hold the lock file `path` for the duration of the block if no other process holds it: yields True when it
    is ours, False when another process (or another open of the same file in this process) has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        held = fcntl is None or _try_lock(handle)
        try:
            yield held
        finally:
            if held and fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
