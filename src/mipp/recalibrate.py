"""Batch-norm recalibration: re-estimate every BatchNorm's running statistics after surgery.

Removing units (and re-fitting readers) changes what each batch norm sees, so the statistics it learnt in training
no longer normalise its input; a pruned BN net can be at chance accuracy until they are re-estimated. This resets
them and averages the batch statistics over a fixed, seeded set of calibration batches (momentum None: a cumulative
average, every batch weighs the same), with gradients off and only the batch norms in train mode (dropout stays off,
so the statistics are those of the deterministic network). Modes and momenta are restored afterwards.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mipp.activations import calibration_batches

# 16 batches of 128: 2,048 samples, as many as a prune call's default calibration set.
RECALIBRATION_BATCHES = 16
RECALIBRATION_BATCH_SIZE = 128


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch norms that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batch_norm(model: nn.Module, data, *, n_batches: int = RECALIBRATION_BATCHES,
                           batch_size: int = RECALIBRATION_BATCH_SIZE, seed: int = 0,
                           device: str | torch.device | None = None) -> int:
    """Re-estimate the running mean and variance of every batch norm of `model` (in place) on `n_batches` batches of
    calibration `data` (a tensor, an (inputs, labels) pair, a Dataset or a DataLoader); returns the number of
    batches used (0 for a model without batch norm, which is left untouched). A DataLoader keeps its own batch size
    (up to n_batches x batch_size samples are read). A batch of one sample cannot give a variance and is skipped."""
    norms = batch_norms(model)
    if not norms:
        return 0
    if n_batches < 1 or batch_size < 2:
        raise ValueError(f"recalibration needs n_batches >= 1 and batch_size >= 2, got {n_batches} and {batch_size}")
    device = torch.device(device or next(model.parameters()).device)
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for batch in calibration_batches(data, n_batches * batch_size, batch_size, seed):
                if len(batch) < 2:
                    continue
                model(batch.to(device))
                used += 1
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    if used == 0:
        raise ValueError("batch-norm recalibration got no batch of at least 2 samples: pass more calibration data")
    return used
