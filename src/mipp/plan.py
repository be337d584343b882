"""Plan: which units of each group a pruning method keeps, and the record of how it decided.

A Plan is the one thing every method produces and everything downstream consumes: surgery applies it
(:func:`mipp.surgery.apply_plan`), reports read it, and a saved Plan plus the original architecture and the pruned
state dict rebuilds the pruned model (JSON, no pickle).  It is plain data: kept indices, decisions, settings and
versions, with a JSON round trip; it knows nothing of models. Groups that mipp could not prune safely (attention,
recurrent layers, norms over channels; see `mipp.units`) are named in `excluded` with the reason; plan files written
before that field existed load with none.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mipp.io import atomic_write_text, versions

FORMAT = "mipp-plan/1"


@dataclass
class UnitDecision:
    """What a method knew and decided about one unit."""

    unit: int
    kept: bool
    score: float | None = None  # the method's criterion (MIPP: transfer entropy in nats)
    p_value: float | None = None
    mi: float | None = None  # MIPP: single-unit mutual information with the target, for the ordering
    rank: int | None = None  # MIPP: position in the test order (0 = tested first)


@dataclass
class Plan:
    kept: dict[str, list[int]]  # group key -> kept unit indices, ascending
    sizes: dict[str, int]  # group key -> original number of units
    method: str
    settings: dict = field(default_factory=dict)
    seed: int = 0
    example_shape: list[int] = field(default_factory=list)  # input shape used to trace the model
    decisions: dict[str, list[UnitDecision]] = field(default_factory=dict)
    guard_hits: list[str] = field(default_factory=list)  # groups left at the minimum width
    excluded: dict[str, str] = field(default_factory=dict)  # root module of a group left unpruned -> why
    stats: dict = field(default_factory=dict)  # fractions removed, selection time, ...
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kept = {k: sorted(int(i) for i in v) for k, v in self.kept.items()}
        if not self.versions:
            self.versions = versions()
        self.validate()

    def validate(self) -> None:
        for key, units in self.kept.items():
            size = self.sizes.get(key)
            if size is None:
                raise ValueError(f"plan keeps units of group {key!r} but gives no size for it")
            if not units:
                raise ValueError(f"plan empties group {key!r}: every group must keep at least one unit")
            if units[0] < 0 or units[-1] >= size or len(set(units)) != len(units):
                raise ValueError(f"plan for group {key!r} has indices outside 0..{size - 1} or duplicates")

    def removed(self, key: str) -> list[int]:
        kept = set(self.kept[key])
        return [i for i in range(self.sizes[key]) if i not in kept]

    @property
    def units_total(self) -> int:
        return sum(self.sizes.values())

    @property
    def units_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    @property
    def unit_fraction_removed(self) -> float:
        return 1.0 - self.units_kept / self.units_total

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"unknown plan format {fmt!r}; this mipp reads {FORMAT!r}")
        data["decisions"] = {k: [UnitDecision(**d) for d in v] for k, v in data.get("decisions", {}).items()}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the Plan as JSON, atomically (a kill mid-write leaves the previous file)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"plan file {path} does not exist: write one with `mipp prune` or Plan.save")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"plan file {path} is not a valid mipp plan ({err})") from err

    def summary(self) -> str:
        """One line per group: kept / original width."""
        width = max((len(k) for k in self.kept), default=5)
        lines = [f"{'group':<{width}}  kept / units"]
        for key, units in self.kept.items():
            mark = "  (at minimum width)" if key in self.guard_hits else ""
            lines.append(f"{key:<{width}}  {len(units):>4} / {self.sizes[key]:<4}{mark}")
        lines.append(f"{'total':<{width}}  {self.units_kept:>4} / {self.units_total:<4}"
                     f"  ({100 * self.unit_fraction_removed:.1f}% of units removed)")
        for key, reason in self.excluded.items():
            lines.append(f"not pruned: {key} ({reason})")
        return "\n".join(lines)

