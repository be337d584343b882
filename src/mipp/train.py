"""One loop for training, fine-tuning and evaluation, deterministic and resumable to the exact step.

Why it looks the way it does:
- Batch order never comes from the global RNG: the permutation of epoch ``e`` is drawn from a generator seeded by
  ``(seed, e)`` and augmentation from ``(seed, e, step)``.  A resumed run regenerates the same order and skips the
  finished batches, so an interrupted-then-resumed run ends with bit-identical weights and metrics (on the same
  device and number of CPU threads; on CUDA only as far as the kernels themselves are deterministic).
- In-memory data sets (anything with ``.images``/``.labels`` tensors or arrays) are indexed directly: no DataLoader
  overhead.  Other data sets go through a DataLoader fed the same index batches.
- Checkpoints (model, optimizer, scheduler, position, RNG state, config, history) go through
  :func:`mipp.io.atomic_torch_save`, so a kill at any moment leaves the last good checkpoint.
- Under torchrun (``mipp.distributed``) the model is wrapped in DistributedDataParallel and every global batch of
  the same permutation is cut into ``world`` contiguous parts, one per rank (``batch_size / world`` each; a batch
  size the ranks cannot share evenly is an error), so a step sees the examples one process's step sees and DDP
  averages the gradients; a trailing batch too small to give every rank 2 examples is dropped. Batch norms use
  each rank's own part (DDP's default), and their buffers follow rank 0. Rank 0 alone writes checkpoints, with the
  epoch's running sums of all ranks and every rank's RNG state; every rank resumes from it, so a killed and resumed
  run ends as an uninterrupted run with the same number of processes ends. Evaluation is sharded across the ranks
  and its sums all-reduced.

Defaults (``TrainConfig``): SGD with Nesterov momentum 0.9, lr 0.05 (Adam/AdamW: 1e-3), weight decay 5e-4,
batch 128, cosine decay per step to zero, no warm-up, no label smoothing, no augmentation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mipp import distributed
from mipp.checkpoint import TRAIN_STATE_FORMAT, CheckpointError, read_record
from mipp.io import atomic_torch_save, derived_seed
from mipp.progress import Progress

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTATIONS = ("none", "flip-crop")
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
# Fields that do not change the numbers a run produces: a checkpoint may be resumed with other values.
RESULT_NEUTRAL_FIELDS = ("device", "num_workers", "checkpoint_every")
# In-memory data up to this size is moved to the accelerator once, instead of batch by batch.
_DEVICE_RESIDENT_BYTES = 2 << 30

Callback = Callable[[dict], None]


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run's result (plus where it runs and how often it saves)."""

    epochs: int = 10
    batch_size: int = 128
    lr: Optional[float] = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per-step cosine to zero | "step" (x0.1 at 50% and 75% of epochs) | "constant"
    warmup_epochs: float = 0.0  # linear warm-up, counted in (fractional) epochs
    label_smoothing: float = 0.0
    augment: str = "none"  # "flip-crop": random horizontal flip + padded random crop, for CIFAR-like images
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    checkpoint_every: int = 200  # optimizer steps between mid-epoch checkpoints (0: only at epoch ends)
    num_workers: int = 0  # DataLoader workers, for data sets that are not in memory

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 0,
               f"epochs must be an integer >= 0, got {self.epochs!r}")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        _check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        _check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers!r}")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; asking for cuda without one is an error with the fix."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for but torch sees no CUDA device; use cpu or auto")
    return device


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


# --------------------------------------------------------------------------------------------------- batches


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of epoch ``epoch``: a permutation seeded by (seed, epoch), cut into batches.

    A trailing batch of one example is dropped: BatchNorm cannot train on it.
    """
    order = torch.randperm(n, generator=_generator(seed, "order", epoch))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def _in_memory_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if images is None or labels is None:
        return None
    return torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)


class BatchSource:
    """Yields ``(inputs, targets)`` on ``device`` for given index batches, from memory or through a DataLoader."""

    def __init__(self, dataset: Any, device: torch.device, num_workers: int = 0):
        self.dataset, self.device, self.num_workers = dataset, device, num_workers
        self.tensors = _in_memory_tensors(dataset)
        if self.tensors is not None and device.type != "cpu":
            images, labels = self.tensors
            if images.element_size() * images.nelement() <= _DEVICE_RESIDENT_BYTES:
                self.tensors = images.to(device), labels.to(device)

    def __len__(self) -> int:
        return len(self.tensors[1]) if self.tensors is not None else len(self.dataset)

    def __call__(self, batches: list[torch.Tensor], seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``seed`` seeds the DataLoader's workers; the loader then draws nothing from the global RNG."""
        if self.tensors is not None:
            images, labels = self.tensors
            for idx in batches:
                idx = idx.to(images.device)
                yield images[idx].to(self.device, non_blocking=True), labels[idx].to(self.device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        for inputs, targets in loader:
            yield (inputs.to(self.device, torch.float32, non_blocking=True),
                   torch.as_tensor(targets).to(self.device, torch.long, non_blocking=True))


def flip_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding by size/8 (4 px at 32x32), one draw per image."""
    n, _, height, width = images.shape
    pad = max(1, min(height, width) // 8)
    flips = torch.rand(n, generator=generator) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    device = images.device
    images = torch.where(flips.to(device)[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(height)).to(device)  # (n, H)
    cols = (dx[:, None] + torch.arange(width)).to(device)  # (n, W)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam/AdamW over the trainable parameters, weight decay on all."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.effective_lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.effective_lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based, counted over the whole run)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "step":
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= int(config.epochs * frac) for frac in (0.5, 0.75))
    return 1.0


# ------------------------------------------------------------------------------------------------ evaluation


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (``model.train(mode)`` would flatten mixed modes)."""
    modes = [module.training for module in model.modules()]
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode


@torch.no_grad()
def _evaluate_source(model: nn.Module, source: BatchSource, batch_size: int) -> dict:
    n = len(source)
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    loss_sum = torch.zeros((), dtype=torch.float64, device=source.device)
    correct = torch.zeros((), dtype=torch.long, device=source.device)
    batches = list(torch.arange(n).split(batch_size))
    if distributed.active():  # under torchrun: every world-th batch, then the sums of all ranks
        batches = batches[distributed.rank()::distributed.world_size()]
    with _modes_kept(model):
        model.eval()
        for inputs, targets in source(batches):
            outputs = model(inputs)
            loss_sum += F.cross_entropy(outputs, targets, reduction="sum").double()
            correct += (outputs.argmax(1) == targets).sum()
    distributed.all_reduce_sum(loss_sum)
    distributed.all_reduce_sum(correct)
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "n": n}


def evaluate(model: nn.Module, dataset: Any, *, batch_size: int = 512,
             device: str | torch.device | None = None) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset`` -> ``{"loss", "accuracy", "n"}``.

    Runs under no_grad in eval mode and restores every module's train/eval mode afterwards.  ``device`` None: where
    the model's parameters are; otherwise the model is moved there.  Under torchrun every rank must call it: each
    evaluates its share of the batches and all get the totals.
    """
    device = _model_device(model) if device is None else resolve_device(device)
    model.to(device)
    return _evaluate_source(model, BatchSource(dataset, device), batch_size)


# ----------------------------------------------------------------------------------------------- checkpoints


def _fingerprint(model: nn.Module, config: TrainConfig, n_train: int, identity: dict | None) -> dict:
    """What a checkpoint must match to be resumed: result-affecting config, model shapes, data size, identity."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL_FIELDS}
    settings["lr"] = config.effective_lr
    fingerprint = {
        "config": settings,
        "model_config": getattr(model, "mipp_config", None),
        "model_shapes": {name: list(t.shape) for name, t in model.state_dict().items()},
        "n_train": n_train,
        "identity": identity,
    }
    if distributed.world_size() > 1:  # recorded only then, so one process's checkpoints stay as they were
        fingerprint["world_size"] = distributed.world_size()
    return fingerprint


def _differences(found: dict, expected: dict) -> list[str]:
    diffs = []
    if found.get("world_size", 1) != expected.get("world_size", 1):  # the key exists only under torchrun
        diffs.append(f"processes (torchrun ranks): {found.get('world_size', 1)} there, "
                     f"{expected.get('world_size', 1)} now")
    for key in expected:
        a, b = found.get(key), expected[key]
        if a == b or key == "world_size":
            continue
        if key == "config" and isinstance(a, dict):
            diffs += [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in b if a.get(k) != b.get(k)]
        elif key == "model_shapes":
            diffs.append("the model's layers or shapes differ")
        else:
            diffs.append(f"{key}: {a!r} there, {b!r} now")
    return diffs


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# ------------------------------------------------------------------------------------------------------ fit


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Number of batches :func:`epoch_batches` yields (a trailing batch of one example is dropped); with ``world``
    ranks, :func:`rank_batches`'s (a trailing batch of fewer than 2 examples per rank is dropped)."""
    steps = math.ceil(n / batch_size)
    if world > 1:
        return steps - 1 if n - (steps - 1) * batch_size < 2 * world else steps
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


def rank_batches(batches: list[torch.Tensor], rank: int, world: int) -> tuple[list[torch.Tensor], list[float]]:
    """Rank ``rank``'s part of each global batch (``world`` contiguous parts: ``torch.tensor_split``), and the
    factor on its mean loss that makes DDP's average of the ranks' gradients the gradient of the global batch's mean
    loss (1 when the parts are equal; a trailing batch's may not be). A trailing batch of fewer than 2 examples per
    rank is dropped (a batch norm cannot train on one example)."""
    if len(batches[-1]) < 2 * world:
        batches = batches[:-1]
    parts = [batch.tensor_split(world)[rank] for batch in batches]
    return parts, [len(part) * world / len(batch) for part, batch in zip(parts, batches)]


def fit(model: nn.Module, train_set: Any, config: TrainConfig | None = None, *, eval_set: Any = None,
        checkpoint_path: str | Path | None = None, resume: bool = True, progress: bool = True,
        callbacks: Iterable[Callback] | None = None, identity: dict | None = None,
        description: str = "training") -> dict:
    """Train ``model`` in place on ``train_set``; returns ``{"history", "steps", "resumed_from", "seconds"}``.

    ``history`` has one row per epoch: epoch, train_loss, train_accuracy, eval_loss/eval_accuracy (with
    ``eval_set``), lr (of the epoch's last step) and seconds.  With ``checkpoint_path`` the run saves its full state
    every ``config.checkpoint_every`` steps and at each epoch end, and (``resume=True``) continues from an existing
    checkpoint at the exact step; a checkpoint of another run (config, model, data size or ``identity``, a JSON-able
    description such as the data set's name) is an error.  ``callbacks`` are called with a dict after every step
    (``event="step"``) and epoch (``event="epoch"``).  The global RNG (dropout) is seeded from ``config.seed``
    inside a fork, so the caller's RNG state is left alone.  The model ends on ``config.device``.
    ``progress``: a bar over all the run's batches (with ETA) on a terminal, else a line now and then and one per
    epoch (:mod:`mipp.progress`), labelled ``description``.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    model.to(device)
    trainer = _Trainer(model, BatchSource(train_set, device, config.num_workers), config, identity=identity,
                       eval_source=BatchSource(eval_set, device, config.num_workers) if eval_set is not None else None,
                       path=Path(checkpoint_path) if checkpoint_path is not None else None,
                       callbacks=list(callbacks or []))
    resumed_from = None
    with torch.random.fork_rng(devices=_cuda_indices(device)), _modes_kept(model):
        torch.manual_seed(config.seed)
        if trainer.path is not None and resume and trainer.path.exists():
            trainer.restore()
            resumed_from = {"epoch": trainer.epoch, "step": trainer.step}
        if trainer.world > 1:
            trainer.network = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=_cuda_indices(device) or None)
        with Progress(config.epochs * trainer.steps_per_epoch, description, "batch",
                      enabled=progress and distributed.is_main(),
                      initial=trainer.epoch * trainer.steps_per_epoch + trainer.step) as trainer.bar:
            while trainer.epoch < config.epochs:
                trainer.train_epoch()
        if trainer.world > 1:
            # DistributedDataParallel sits in reference cycles; collected now, while the process group it holds is
            # alive. Left to the interpreter's exit, gloo tore down during finalisation and now and then aborted a
            # rank after all its work was done ("terminate called without an active exception", exit -6)
            trainer.network = model
            gc.collect()
    return {"history": trainer.history, "steps": config.epochs * trainer.steps_per_epoch,
            "resumed_from": resumed_from, "seconds": sum(row["seconds"] for row in trainer.history)}


class _Trainer:
    """The objects of one :func:`fit` call plus its position and running totals: what a checkpoint holds."""

    def __init__(self, model: nn.Module, source: BatchSource, config: TrainConfig, *, identity: dict | None,
                 eval_source: BatchSource | None, path: Path | None, callbacks: list[Callback]):
        n = len(source)
        if n < 2:
            raise ValueError(f"the training set has {n} example(s); at least 2 are needed")
        self.model, self.source, self.config, self.device = model, source, config, source.device
        self.network = model  # what the training steps call: fit() wraps it in DDP under torchrun
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if self.world > 1:
            _check(config.batch_size % self.world == 0,
                   f"batch_size={config.batch_size} cannot be shared by the {self.world} processes torchrun started: "
                   f"pass a multiple of {self.world} (each process takes batch_size / {self.world} examples of "
                   "every batch)")
            _check(steps_per_epoch(n, config.batch_size, self.world) > 0,
                   f"the training set has {n} examples: too few for {self.world} processes (each needs at least 2 "
                   "per batch); use fewer processes (--nproc-per-node) or more data")
        self.eval_source, self.path, self.callbacks = eval_source, path, callbacks
        self.bar = Progress(None, "training", enabled=False)  # fit() replaces it with the run's progress
        self.steps_per_epoch = steps_per_epoch(n, config.batch_size, self.world)
        self.optimizer = make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config, self.steps_per_epoch))
        self.fingerprint = _fingerprint(model, config, n, identity)
        self.epoch, self.step, self.history = 0, 0, []
        self.reset_sums()

    def reset_sums(self, loss_sum: float = 0.0, correct: int = 0, seen: int = 0, seconds: float = 0.0) -> None:
        """Running totals of the current epoch (kept on the device: no sync per step)."""
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=self.device)
        self.correct = torch.tensor(correct, dtype=torch.long, device=self.device)
        self.seen, self.seconds = seen, seconds

    def train_epoch(self) -> None:
        """Finish epoch ``self.epoch`` from step ``self.step``, evaluate, record it and checkpoint."""
        config = self.config
        batches = epoch_batches(len(self.source), config.batch_size, config.seed, self.epoch)
        weights = [1.0] * len(batches)
        if self.world > 1:
            batches, weights = rank_batches(batches, self.rank, self.world)
        started = time.perf_counter() - self.seconds
        self.model.train()
        epoch_label = f"epoch {self.epoch + 1}/{config.epochs}"
        self.bar.status(epoch_label)
        for inputs, targets in self.source(batches[self.step:],
                                           derived_seed(config.seed, "workers", self.epoch, self.step)):
            if config.augment == "flip-crop":
                inputs = flip_crop(inputs, _generator(config.seed, "augment", self.epoch, self.step))
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self._train_step(inputs, targets, weights[self.step])
            global_step = self.epoch * len(batches) + self.step
            if config.checkpoint_every and global_step % config.checkpoint_every == 0 and self.step < len(batches):
                self.seconds = time.perf_counter() - started
                self.save()
            self.bar.update(1)
            for callback in self.callbacks:
                callback({"event": "step", "epoch": self.epoch, "step": self.step, "global_step": global_step,
                          "loss": loss.item()})
        row = self._epoch_row(started, lr)
        self.history.append(row)
        self.epoch, self.step = self.epoch + 1, 0
        self.reset_sums()
        self.save()
        self.bar.note(f"{self.bar.description} {epoch_label}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        for callback in self.callbacks:
            callback({"event": "epoch", **row})

    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.network(inputs)
        loss = F.cross_entropy(outputs, targets, label_smoothing=self.config.label_smoothing)
        (loss if weight == 1.0 else loss * weight).backward()
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach().double() * len(targets)
        self.correct += (outputs.detach().argmax(1) == targets).sum()
        self.seen += len(targets)
        self.step += 1
        return loss.detach()

    def _epoch_row(self, started: float, lr: float) -> dict:
        if self.world > 1:  # the epoch's sums over every rank; batch-norm buffers as rank 0 has them
            self._reduce_sums()
            distributed.broadcast_buffers(self.model)
        train_loss = self.loss_sum.item() / max(1, self.seen)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged (loss {train_loss} in epoch {self.epoch + 1}); lower the "
                                     "learning rate (--lr) or add warm-up (--warmup-epochs), with --no-resume")
        row = {"epoch": self.epoch + 1, "train_loss": train_loss,
               "train_accuracy": int(self.correct.item()) / max(1, self.seen)}
        if self.eval_source is not None:
            scores = _evaluate_source(self.model, self.eval_source, max(512, self.config.batch_size))
            row.update(eval_loss=scores["loss"], eval_accuracy=scores["accuracy"])
        row["lr"] = lr
        row["seconds"] = time.perf_counter() - started
        return row

    def _reduce_sums(self) -> None:
        """The running sums of every rank, on rank 0; the other ranks' go to zero (so that a later reduction, or a
        resume from rank 0's checkpoint, counts each example once)."""
        distributed.all_reduce_sum(self.loss_sum)
        distributed.all_reduce_sum(self.correct)
        self.seen = distributed.sum_scalar(self.seen)
        if self.rank != 0:
            self.reset_sums(seconds=self.seconds)

    def save(self) -> None:
        if self.path is None:
            return
        cuda = _cuda_indices(self.device)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda[0]) if cuda else None}
        extra = {}
        if self.world > 1:  # collectives first, on every rank; then rank 0 alone writes
            self._reduce_sums()
            extra["rng_ranks"] = distributed.all_gather_objects(rng)
            if self.rank != 0:
                return
        atomic_torch_save(self.path, {
            "format": TRAIN_STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "sums": {"loss_sum": self.loss_sum.item(), "correct": int(self.correct.item()), "seen": self.seen,
                     "seconds": self.seconds},
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            **extra,
        })

    def restore(self) -> None:
        state = read_record(self.path, TRAIN_STATE_FORMAT, map_location=self.device)
        diffs = _differences(state.get("fingerprint", {}), self.fingerprint)
        if diffs:
            raise CheckpointError(f"{self.path} was written by a different run ({'; '.join(diffs)}); use a new "
                                  "output folder, or --no-resume (fit(..., resume=False)) to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        self.reset_sums(**state["sums"])
        rng = state["rng"]
        if self.world > 1:  # rank 0 saved every rank's sums (the others count from zero) and RNG state
            rng = state["rng_ranks"][self.rank]
            if self.rank != 0:
                self.reset_sums(seconds=state["sums"]["seconds"])
        torch.set_rng_state(rng["torch"].cpu())
        cuda = _cuda_indices(self.device)
        if cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), cuda[0])
        if self.epoch < self.config.epochs:
            log.info("resuming %s at epoch %d, step %d", self.path, self.epoch + 1, self.step)
        else:
            log.info("%s holds a finished run; nothing left to train", self.path)

