"""Sweep configuration: models x data x methods x targets x regimes x seeds x fine-tuning budgets, expanded to runs.

A sweep comes from a JSON file or from command-line flags; both give a :class:`SweepConfig`, and :func:`expand` turns
it into :class:`RunSpec` s, one per (model, data, seed, regime, method, target).  The fine-tuning budgets are not part
of a run's identity: one run records the accuracy after each budget, so adding a budget later extends finished runs
instead of recomputing them.  A run's id is a hash of everything that decides its numbers (never paths, device or
progress), so the same run always lands in the same file of the result store.

Entries may be short names or dicts:
  models   "lenet5" | {"name": "vgg11", "width": 0.25, ...build_model extras}   ("planted": the planted network)
  data     "fashion-mnist" | {"name": ..., "limit": 5000, "options": {...}, "deform": {"seed": 0, ...} or true}
           (a network with planted weights runs on its own data, named like it: "planted")
  methods  "random" | {"name": "mipp", "label": "mipp-ksg", "options": {...}, "targets": [null], "n_samples": 1000,
                       "regimes": ["init"]}
           ("all": every method; targets, n_samples and regimes, when given, replace the sweep's for that entry:
           a method designed for one regime, such as SNIP at initialisation, need not be run in the other)
A target is a fraction of `metric` to remove; null lets the method decide (MIPP's confidence mode); {"as": LABEL}
(or "as:LABEL") removes what the run of the method labelled LABEL removed, on the same base model (same model, data,
seed and regime): every baseline at the sparsity MIPP's confidence mode chose, with no interpolation. Where LABEL
runs several targets, the entry becomes one run per run of LABEL. A matched run's identity holds the id of the run it
matches, and it runs after it.
finetune_epochs is a list of budgets for every regime, or a dict regime -> list (training a net pruned at
initialisation usually needs more epochs than fine-tuning a pruned trained one); budget 0 is always recorded.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mipp.io import stable_hash
from mipp.reconstruct import reconstruction_mode

REGIMES = ("init", "trained")


@dataclass
class SweepConfig:
    name: str = "sweep"
    models: list = field(default_factory=lambda: ["lenet5"])
    data: list = field(default_factory=lambda: ["fashion-mnist"])
    methods: list = field(default_factory=lambda: ["mipp", "random", "magnitude-l1"])
    targets: list = field(default_factory=lambda: [0.5, 0.7, 0.9])
    metric: str = "units"  # what a target counts: units | params | macs
    regimes: list = field(default_factory=lambda: list(REGIMES))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    finetune_epochs: list | dict = field(default_factory=lambda: [0, 1])  # or per regime: {"init": [0, 5], ...}
    train: dict = field(default_factory=dict)  # TrainConfig of the base model, and of a net pruned at init
    finetune: dict = field(default_factory=lambda: {"lr": 0.01})  # TrainConfig overrides for a pruned trained net
    n_samples: int = 2000  # calibration samples given to the selection
    min_units: float = 1  # collapse guard: units each group keeps (>= 1) or a fraction of its width (< 1)
    train_eval_n: int | None = 10000  # train accuracy on a fixed stratified subset of this size (None: all)
    latency: bool = True  # measure CPU latency at batch 1 and 64
    # re-fit the readers of removed units after surgery (mipp.reconstruct), every method: true (independent) or
    # "sequential" (each reader from the pruned network's inputs)
    reconstruct: bool | str = False
    recalibrate: bool = False  # re-estimate batch-norm statistics after surgery (mipp.recalibrate), every method
    data_root: str | None = None  # where data files are (not part of any run's identity)
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> "SweepConfig":
        """From a dict of the fields; a "comment" entry (free text for humans) is ignored."""
        data = {k: v for k, v in data.items() if k != "comment"}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown sweep config key(s) {unknown}; known keys: {known}")
        reconstruction_mode(data.get("reconstruct", False))  # a clear error now, not in every run
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "SweepConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep config {path} does not exist; see configs/*.json for examples")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"sweep config {path} is not valid JSON ({err})") from err
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunSpec:
    """One run: prune one model (at initialisation or trained) with one method to one target, with one seed."""

    model: dict
    data: dict
    seed: int
    regime: str
    method: dict  # {"name", "label", "options"}
    target: float | dict | None  # a fraction, None (the method decides) or {"as": label, "run": run_id} (matched)
    metric: str
    settings: dict  # n_samples, min_units, train, train_epochs, finetune, train_eval_n
    finetune_epochs: tuple = (0,)  # not part of the identity

    def identity(self) -> dict:
        """Everything that decides this run's numbers."""
        settings = dict(self.settings)
        if self.regime == "init":
            settings.pop("train_epochs")  # the base training does not touch a run at initialisation
        return {"model": self.model, "data": self.data, "seed": self.seed, "regime": self.regime,
                "method": {"name": self.method["name"], "options": self.method["options"]},
                "target": self.target, "metric": self.metric, "settings": settings}

    @property
    def run_id(self) -> str:
        return stable_hash(self.identity())

    def base_identity(self) -> dict:
        """What decides the trained base model: shared by every run of this model, data and seed."""
        return {"model": self.model, "data": self.data, "seed": self.seed, "train": self.settings["train"],
                "epochs": self.settings["train_epochs"]}

    @property
    def labels(self) -> dict:
        return {"model": model_label(self.model) + repair_label(self.settings), "data": data_label(self.data),
                "method": self.method["label"]}


def model_label(spec: dict) -> str:
    return spec["name"] + (f"@{spec['width']:g}" if spec.get("width", 1.0) != 1.0 else "")


def repair_settings(config: SweepConfig) -> dict:
    """What is done to every pruned net after surgery, in a run's settings (absent when off)."""
    return {key: getattr(config, key) for key in ("reconstruct", "recalibrate") if getattr(config, key)}


def repair_label(settings: dict) -> str:
    """"+rec" / "+bn" on the model label: repaired runs are reported apart from plain removal."""
    reconstruct = settings.get("reconstruct")
    return (("+seq" if reconstruct == "sequential" else "+rec" if reconstruct else "")
            + ("+bn" if settings.get("recalibrate") else ""))


def data_label(spec: dict) -> str:
    return spec["name"] + ("+deform" if spec.get("deform") else "")


# ------------------------------------------------------------------------------------------------ normalising


def model_spec(entry) -> dict:
    from mipp.models import model_names

    spec = {"name": entry} if isinstance(entry, str) else dict(entry)
    if spec.get("name") not in model_names():
        raise ValueError(f"unknown model {spec.get('name')!r} in the sweep; choose from {model_names()}")
    spec["width"] = float(spec.get("width", 1.0))
    return spec


def data_spec(entry) -> dict:
    from mipp.data import canonical_name

    spec = {"name": entry} if isinstance(entry, str) else dict(entry)
    unknown = sorted(set(spec) - {"name", "limit", "options", "deform"})
    if unknown:
        raise ValueError(f"unknown data key(s) {unknown}; a data entry takes name, limit, options, deform")
    name = spec.get("name")
    spec["name"] = name if own_data_of(name) else canonical_name(name)
    spec.setdefault("limit", None)
    spec["options"] = dict(spec.get("options") or {})
    deform = spec.get("deform")
    # true: the paper's study (each image one of a fixed set of transformations); a dict spells out
    # mipp.data.deformed's options (without "per", the per-class deformation of the earliest records)
    spec["deform"] = {"seed": 0, "per": "image"} if deform is True else (dict(deform) if deform else None)
    return spec


def own_data_of(name) -> str | None:
    """The network with planted weights whose own data `name` is (they share the name), else None."""
    from mipp.models import model_entry, model_names

    return name if name in model_names() and model_entry(name).data is not None else None


def method_specs(entries) -> list[dict]:
    from mipp.methods import get_method, method_names

    if entries == "all" or entries == ["all"]:
        entries = method_names()
    specs = []
    for entry in entries:
        spec = {"name": entry} if isinstance(entry, str) else dict(entry)
        unknown = sorted(set(spec) - {"name", "label", "options", "targets", "n_samples", "regimes"})
        if unknown:
            raise ValueError(f"unknown method key(s) {unknown}; a method entry takes name, label, options, targets, "
                             "n_samples, regimes")
        bad = sorted(set(spec.get("regimes", REGIMES)) - set(REGIMES))
        if bad:
            raise ValueError(f"method {spec.get('label', spec.get('name'))!r} has unknown regime(s) {bad}; choose "
                             f"from {REGIMES}")
        get_method(spec.get("name"))  # raises for an unknown method, naming the valid ones
        spec.setdefault("label", spec["name"])
        spec["options"] = dict(spec.get("options") or {})
        specs.append(spec)
    labels = [s["label"] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}; give variants a distinct 'label'")
    return specs


def _target(value) -> float | dict | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
        return None
    if isinstance(value, str) and value.startswith("as:"):
        value = {"as": value[3:]}
    if isinstance(value, dict):
        if set(value) != {"as"} or not isinstance(value.get("as"), str) or not value["as"]:
            raise ValueError(f"a matched target is {{\"as\": LABEL}} (or \"as:LABEL\") naming a method label of "
                             f"the sweep, got {value!r}")
        return dict(value)
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"a target is a fraction in (0, 1) (or null for MIPP's own choice), got {value}")
    return value


def expand(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, ordered so that runs sharing a base model follow each other."""
    from mipp.methods import BUDGET_METRICS
    from mipp.train import TrainConfig

    if config.metric not in BUDGET_METRICS:
        raise ValueError(f"metric must be one of {BUDGET_METRICS}, got {config.metric!r}")
    bad = sorted(set(config.regimes) - set(REGIMES))
    if bad:
        raise ValueError(f"unknown regime(s) {bad}; choose from {REGIMES}")
    budgets = {regime: _budgets(config.finetune_epochs, regime) for regime in config.regimes}
    train = TrainConfig.from_dict({**config.train, "seed": 0}).to_dict()  # validates; the run's seed goes in later
    finetune = TrainConfig.from_dict({**train, **config.finetune}).to_dict()
    for settings in (train, finetune):
        for key in ("seed", "epochs", "device", "num_workers", "checkpoint_every"):
            settings.pop(key)  # set per run, or do not change the numbers
    min_units = int(config.min_units) if config.min_units >= 1 else float(config.min_units)  # 1 and 1.0: one hash
    settings = {"n_samples": int(config.n_samples), "min_units": min_units, "train": train,
                "train_epochs": int(config.train.get("epochs", 10)), "finetune": finetune,
                "train_eval_n": config.train_eval_n}
    settings.update(repair_settings(config))  # only when on: runs without repair keep their ids
    targets = [_target(t) for t in config.targets]
    runs = []
    for model in map(model_spec, config.models):
        for data in map(data_spec, config.data):
            if own_data_of(model["name"]) != own_data_of(data["name"]):
                raise ValueError(f"the {own_data_of(model['name']) or own_data_of(data['name'])} network runs on its "
                                 "own data and nothing else: put them in a sweep of their own (see "
                                 "configs/planted.json)")
            for seed in config.seeds:
                for regime in config.regimes:
                    for method in method_specs(config.methods):
                        if regime not in method.get("regimes", REGIMES):
                            continue
                        entry = {k: method[k] for k in ("name", "label", "options")}
                        mine = {**settings, "n_samples": int(method.get("n_samples", settings["n_samples"]))}
                        for target in method.get("targets", targets):
                            runs.append(RunSpec(model, data, int(seed), regime, entry, _target(target),
                                                config.metric, mine, budgets[regime]))
    return _matched_after_their_references(runs)


def _matched_after_their_references(runs: list[RunSpec]) -> list[RunSpec]:
    """Give each run with a matched target ({"as": LABEL}) the id of the run it matches (same model, data, seed and
    regime, method label LABEL, in its identity) and move it after the runs of its model, data and seed. Where LABEL
    runs several targets per seed and regime, the matched entry becomes one run per run of LABEL (e.g. MIPP at the
    very cost each target of an ablation reached)."""
    def place(run):
        return (stable_hash(run.model), stable_hash(run.data), run.seed)

    by_label: dict[tuple, list[RunSpec]] = {}
    for run in runs:
        by_label.setdefault(place(run) + (run.regime, run.method["label"]), []).append(run)
    labels = {run.method["label"] for run in runs}
    resolved = []
    for run in runs:
        if not isinstance(run.target, dict):
            resolved.append(run)
            continue
        label = run.target["as"]
        if label not in labels:
            raise ValueError(f"target as:{label} of {run.method['label']!r} names no method label of this sweep; "
                             f"labels: {sorted(labels)}")
        found = by_label.get(place(run) + (run.regime, label), [])
        if not found or any(isinstance(reference.target, dict) for reference in found):
            raise ValueError(f"target as:{label} needs {label!r} to run targets of its own (a fraction or null) in "
                             f"the {run.regime} regime; it runs {len(found)}, matched or none")
        resolved += [dataclasses.replace(run, target={"as": label, "run": reference.run_id}) for reference in found]
    blocks: dict[tuple, int] = {}  # the runs of one model, data and seed follow each other (see expand)
    for run in resolved:
        blocks.setdefault(place(run), len(blocks))
    return sorted(resolved, key=lambda run: (blocks[place(run)], isinstance(run.target, dict)))  # stable


def _budgets(spec, regime: str) -> tuple[int, ...]:
    """The fine-tuning budgets (epochs) of `regime`: a list for every regime, or a dict regime -> list."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(REGIMES))
        if unknown:
            raise ValueError(f"finetune_epochs has unknown regime(s) {unknown}; use keys from {REGIMES}")
        spec = spec.get(regime, [0])
    budgets = tuple(sorted({int(b) for b in spec} | {0}))
    if budgets[0] < 0:
        raise ValueError(f"fine-tuning budgets are epochs >= 0, got {spec}")
    return budgets
