"""The lowest layer: durable files, versions, stable hashes and derived seeds, shared by every other module.

Every file mipp writes goes through :func:`atomic_open`: a temporary file in the same folder, flushed and fsync'ed,
then ``os.replace``'d over the target.  A writer that dies mid-way leaves the previous file intact, never a partial
one.  :func:`stable_hash` names things by content (run ids, base models, configs) and :func:`derived_seed` gives
unrelated, reproducible random streams from a seed and labels.  Nothing here imports the rest of mipp.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from mipp.version import __version__

# The process's umask (read by setting and restoring it), for the permissions of new files.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on a clean exit make it ``path`` in one step (flush, fsync, replace).

    If the body raises (or the process dies), ``path`` keeps its old content; the temporary file is removed then
    (or, after a kill, by the next successful write to ``path``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by writers that were killed
        with contextlib.suppress(OSError):
            stale.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`atomic_open`."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON through :func:`atomic_open`."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- versions


def versions() -> dict:
    """What made a file: mipp, torch and python versions (recorded in Plans and model files)."""
    return {"mipp": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


_RUN_VERSIONS: dict = {}


def run_versions() -> dict:
    """:func:`versions` plus numpy, torch-pruning and the git commit of the mipp checkout (with a dirty flag), for
    experiment records; computed once per process."""
    if not _RUN_VERSIONS:
        import numpy
        import torch_pruning

        _RUN_VERSIONS.update(versions(), numpy=numpy.__version__,
                             torch_pruning=getattr(torch_pruning, "__version__", None), git=_git_commit())
    return dict(_RUN_VERSIONS)


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        git = ["git", "-C", str(repo)]
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------ hashes and seeds


def stable_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys): equal content, equal name."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from parts with a stable repr (ints, strings); distinct parts give unrelated streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
