"""Progress of long steps: a tqdm bar with an ETA on a terminal, periodic one-line reports everywhere else.

Every long step (training, capture, a selection's sweep, a sweep of experiments, the demo) opens a
:class:`Progress`.  They nest: the demo opens one over its jobs, the fine-tuning of a job one over its batches, and
a report names the whole chain, so a log says which job, which method and budget, and how far:

    demo 6/31, ETA 3m10s [tp-l1 at 70% of units] > fine-tuning 120/469 batch (26%), 9s, ETA 26s

On a terminal (stderr is a tty) each level is a tqdm bar, shown only for steps longer than ``BAR_DELAY_SECONDS``.
Elsewhere (a log file, CI, ``make demo | tee``) a line goes to the ``mipp.progress`` logger at most every
``interval`` seconds (default 30, or ``MIPP_PROGRESS_SECONDS``), and the outermost step adds one at each 10% of
its work (at most one every ``MIN_GAP_SECONDS``), so that a quick step prints nothing at all.  The CLI sends that
logger to stderr; a library user sees the lines once logging is configured for ``mipp``.  :func:`quiet` silences
everything inside it (the library's ``progress=False`` switches use it).

Layer 0: imports nothing from mipp; tqdm is imported only when a bar is drawn.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import statistics
import sys
import time
import weakref
from typing import Iterable, Iterator, Optional, TypeVar

log = logging.getLogger("mipp.progress")

INTERVAL_SECONDS = 30.0  # non-terminal: at most one periodic line per this many seconds
STEP_FRACTION = 0.1  # ... plus one at each 10% of the outermost step
MIN_GAP_SECONDS = 2.0  # ... but never two within this gap: a quick step stays silent
RECENT_UPDATES = 50  # the ETA uses the median time per unit of work of this many last updates
BAR_DELAY_SECONDS = 1.0  # terminal: a bar appears only for steps that take longer than this

T = TypeVar("T")

_active: list[weakref.ref] = []  # the open steps, outermost first (weak: a step abandoned by an exception ends
# when it is garbage-collected, without a close())
_state = {"quiet": 0, "last_line": -math.inf}
_clock = time.monotonic  # tests replace it


def interval_seconds() -> float:
    """The periodic report interval: ``MIPP_PROGRESS_SECONDS`` if set (a number > 0), else ``INTERVAL_SECONDS``."""
    text = os.environ.get("MIPP_PROGRESS_SECONDS")
    try:
        value = float(text) if text else INTERVAL_SECONDS
    except ValueError:
        return INTERVAL_SECONDS
    return value if value > 0 else INTERVAL_SECONDS


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short enough for one line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No bars and no progress lines inside (nestable)."""
    _state["quiet"] += 1
    try:
        yield
    finally:
        _state["quiet"] -= 1


def _open_steps() -> list["Progress"]:
    """The open steps, outermost first, without those an exception left behind and Python has since freed."""
    _active[:] = [ref for ref in _active if ref() is not None]
    return [ref() for ref in _active]


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    """One long step of ``total`` units of work (``None``: unknown); use as a context manager or call close().

    ``leave``: keep the finished bar on the terminal (default: only an outermost step's).
    ``update(n)`` after each piece of work, ``status(text)`` for what it is doing now (e.g. the method and budget
    of the current job), ``note(text)`` for a result worth a line of its own (an epoch's loss): printed when this
    is the outermost step, otherwise only shown as the status.
    """

    def __init__(self, total: Optional[int], description: str, unit: str = "step", *, initial: int = 0,
                 enabled: bool = True, leave: Optional[bool] = None):
        self.total = None if total is None else max(0, int(total))
        self.description, self.unit = description, unit
        self.done = self.initial = int(initial)
        self.text = ""
        self.enabled = enabled and not _state["quiet"]
        self.depth = len(_open_steps())
        self.started = self.last_update = _clock()
        self.recent = collections.deque(maxlen=RECENT_UPDATES)  # seconds per unit of work of the last updates
        self.steps_reported = self._steps()
        self.closed = False
        self.bar = None
        if not self.enabled:
            return
        _active.append(weakref.ref(self))
        if self.depth == 0:
            _state["last_line"] = self.started  # the first periodic line comes one interval in
        if on_terminal():
            from tqdm import tqdm

            sized = _terminal_columns() > 0  # a terminal of unknown width (some ptys): a fixed-width bar
            self.bar = tqdm(total=self.total, initial=self.initial, desc=description, unit=unit, file=sys.stderr,
                            leave=self.depth == 0 if leave is None else leave, position=self.depth,
                            delay=BAR_DELAY_SECONDS, dynamic_ncols=sized, ncols=None if sized else 100,
                            nrows=None if sized else 20)

    # ------------------------------------------------------------------------------------------- progress

    def update(self, n: int = 1, status: Optional[str] = None, note: Optional[str] = None, *,
               timed: bool = True) -> None:
        """``n`` more units done; ``note``: what the finished piece gave, as a line of its own when outermost
        (prefixed with [done/total], ETA ...; it replaces that update's periodic line). ``timed=False``: work found
        already done (a sweep's finished runs), which the ETA's time per unit leaves out."""
        self.done += n
        if status is not None:
            self.text = status
        if not self.enabled:
            return
        now = _clock()
        if n > 0 and timed:
            self.recent.append((now - self.last_update) / n)
        self.last_update = now
        if self.bar is not None:
            if status is not None:
                self.bar.set_postfix_str(status, refresh=False)
            if timed:
                self.bar.update(n)
            else:  # counted, but outside tqdm's rate (its smoothed rate and its average over `initial`)
                self.bar.n, self.bar.last_print_n, self.bar.initial = (self.bar.n + n, self.bar.last_print_n + n,
                                                                       self.bar.initial + n)
                self.bar.refresh()
        if note is not None:
            eta = self.eta_seconds()
            where = f"{self.done}/{self.total}" if self.total else f"{self.done}"
            if math.isfinite(eta) and self.total and self.done < self.total:
                where += f", ETA {format_seconds(eta)}"
            self.steps_reported = self._steps()
            self.note(f"[{where}] {note}")
        if self.bar is not None or note is not None:
            return
        due = now - _state["last_line"] >= interval_seconds()
        steps = self._steps()
        if self.depth == 0 and steps > self.steps_reported and now - _state["last_line"] >= MIN_GAP_SECONDS:
            due = True
        if due:
            self.steps_reported = steps
            _state["last_line"] = now
            log.info("%s", self.line())

    def status(self, text: str) -> None:
        """What the step is doing now; shown on the bar or in the next line."""
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def note(self, message: str) -> None:
        """A result line (e.g. an epoch's metrics): logged when outermost, else only the status."""
        if not self.enabled:
            return
        if self.depth > 0:
            self.status(message)
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            _state["last_line"] = _clock()
            log.info("%s", message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        steps = _open_steps()
        if self in steps:  # steps left open inside it (an exception went through them) end with it
            del _active[steps.index(self):]

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------------------------------- reports

    def _steps(self) -> int:
        if not self.total:
            return 0
        return int(min(self.done, self.total) / self.total / STEP_FRACTION + 1e-9)

    def fraction(self) -> Optional[float]:
        return None if not self.total else min(1.0, self.done / self.total)

    def eta_seconds(self) -> float:
        """Seconds left at the median time per unit of the last updates: robust to one long piece of work (the
        demo's base training among its jobs, a first batch that pays for set-up); work resumed from a checkpoint
        does not count."""
        if self.fraction() is None or not self.recent:
            return math.inf
        return statistics.median(self.recent) * (self.total - self.done)

    def summary(self, detailed: bool) -> str:
        """'fine-tuning 120/469 batch (26%), 9s, ETA 26s' (detailed) or 'demo 6/31, ETA 3m10s [status]'."""
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text = f"{self.description} {count}"
        if detailed:
            text += f" {self.unit}"
            if self.fraction() is not None:
                text += f" ({100 * self.fraction():.0f}%)"
            text += f", {format_seconds(_clock() - self.started)}"
        if self.total and self.done < self.total and math.isfinite(self.eta_seconds()):
            text += f", ETA {format_seconds(self.eta_seconds())}"
        if self.text:
            text += f" [{self.text}]"
        return text

    def line(self) -> str:
        """The report of this step with every enclosing step, outermost first."""
        steps = _open_steps()
        chain = steps[: steps.index(self) + 1] if self in steps else [self]
        return " > ".join(step.summary(step is self) for step in chain)


def track(items: Iterable[T], description: str, unit: str = "step", *, total: Optional[int] = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, description, unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.update(1)
