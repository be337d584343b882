"""Several processes under torchrun: the process group, this process's rank, and the few collectives mipp needs.

`torchrun --nproc-per-node N -m mipp prune ...` (or ``python -m torch.distributed.run``) starts N copies of the
command with RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address in their environment.
:func:`init_from_environment` joins them into one process group (gloo on CPU, nccl when the device is a GPU, each
process on ``cuda:LOCAL_RANK``); without those variables nothing happens and every helper here behaves as the one
process it is (rank 0 of 1), so the single-process code path is unchanged.

What the callers do with it:
- calibration passes give batch ``j`` of the calibration set to rank ``j % world`` (:func:`owns_batch`), then
  all-reduce their float64 sums (:func:`all_reduce_sum`) or gather per-sample activations in batch order
  (:func:`all_gather_objects`), so every rank holds the single-process statistics;
- the Plan chosen on rank 0 is broadcast (:func:`broadcast_object`), so every rank applies the same one;
- training splits each global batch across ranks and averages gradients with DistributedDataParallel; rank 0
  alone writes files (:func:`is_main`).

Layer 1, next to `mipp.plan` (the one mipp module it uses).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import warnings

import torch
import torch.distributed as dist

from mipp.plan import Plan

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a collective waits for a rank that is not there (one that crashed, or a command not every rank runs).
TIMEOUT_MINUTES = 30


def under_torchrun() -> bool:
    """True when torchrun (or torch.distributed.run) started this process: RANK, WORLD_SIZE, LOCAL_RANK are set."""
    return all(os.environ.get(name, "").strip() for name in TORCHRUN_VARIABLES)


def active() -> bool:
    """True when this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints results."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_from_environment(device: str | None = "auto") -> bool:
    """Join torchrun's process group when this process was started by torchrun; returns whether it did.

    Backend: nccl when ``device`` asks for CUDA ("auto" with a GPU present, "cuda", "cuda:k"; each rank then uses
    ``cuda:LOCAL_RANK``), else gloo. Already initialised (by the caller): left as it is."""
    if not under_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("torch was built without torch.distributed, so it cannot run under torchrun; run one "
                         "process (python -m mipp ...) or install a torch build with distributed support")
    name = str(device or "auto")
    cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank()} has no GPU (torch sees {torch.cuda.device_count()}): "
                             "start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    return True


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = "auto") -> Iterator[bool]:
    """Join torchrun's group for the duration (when under torchrun; yields whether it did) and leave it after."""
    joined = init_from_environment(device)
    try:
        yield joined
        # Every rank done before any tears down: gloo aborts a rank ("terminate called without an active
        # exception") whose peer closed the connection first. Not after an error: a dead peer would leave the
        # barrier waiting.
        if joined:
            barrier()
    finally:
        if joined:
            destroy()


def _communication_device() -> torch.device:
    """Where tensors must be for the backend: the rank's GPU for nccl, the host for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (one process: unchanged); returns it. Sums of statistics should be
    float64 so that their order across ranks changes them only at the level of rounding."""
    if not active():
        return tensor
    device = _communication_device()
    work = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)  # (a view that is not contiguous would not be written to)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def sum_scalar(value: float | int) -> float | int:
    """A Python number summed over the ranks (ints stay ints)."""
    if not active():
        return value
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    total = all_reduce_sum(torch.tensor([value], dtype=dtype))
    return int(total.item()) if dtype == torch.int64 else float(total.item())


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable: tensors, dicts, lists), in rank order; one process: ``[value]``."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` on every rank (picklable); one process: ``value``."""
    if not active():
        return value
    box = [value if rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def broadcast_plan(plan: Plan) -> Plan:
    """Rank 0's Plan on every rank, sent as its JSON text (one process: ``plan``). Every rank selects on the same
    statistics, so the Plans should agree; a rank whose own choice differs is named in a warning (it applies rank
    0's)."""
    if not active():
        return plan
    chosen = Plan.from_json(broadcast_object(plan.to_json()))
    if chosen.kept != plan.kept:
        warnings.warn(f"rank {rank()} selected other units than rank 0 (numerical differences between the "
                      "processes?); every rank applies rank 0's Plan", stacklevel=2)
    return chosen


def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Copy rank ``source``'s buffers (batch-norm statistics) of ``module`` to every rank, in place."""
    if not active():
        return
    device = _communication_device()
    for buffer in module.buffers():
        moved = buffer if buffer.device == device else buffer.to(device)
        dist.broadcast(moved, src=source)
        if moved is not buffer:
            buffer.copy_(moved)


def barrier() -> None:
    if active():
        dist.barrier()


def owns_batch(number: int) -> bool:
    """Whether calibration batch ``number`` (0-based, in the order one process reads them) is this rank's."""
    return number % world_size() == rank()
