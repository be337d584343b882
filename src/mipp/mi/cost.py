"""How long a MIPP sweep will take with a slow estimator (KSG, the loss proxy), said before it starts.

The cost model is calibrated by timing a tiny case of the very estimator (same options) on this machine, now, so
that it knows the machine's speed and its current load. A sweep of a layer of m units costs one session, m
single-unit MI estimates and up to m transfer-entropy tests, so

    seconds(sweep) ~ sum over layers of  session + m * (unit MI + test),   each term timed at n0 samples and scaled
    by (n / n0) ** exponent: 2 for KSG (its pairwise distances; the permutation test repeats them
    n_permutations + 1 times), 1 for the proxy (each test trains small networks for epochs of n samples).

The calibration case has 4 one-feature units and a 4-dimensional target; the size of a layer's features and target
hardly matters next to n for these estimators (measured at n = 250-1000, 6-60 units, 10-84 target dimensions:
KSG tests within 2x of each other at equal n; proxy tests 0.2-1 s each, dominated by early-stopped training).
Expect the estimate within a factor of about 2-3; the sweep's own progress then gives a running ETA. Budget
mode repeats the sweep while it searches its price (7-47 sweeps measured on LeNet-5).

Reference points, one thread on a busy 2-core machine: a KSG test (100 permutations) takes about 0.3 s at 250
samples, 2 s at 500, 8 s at 1000, so a 2,000-sample sweep of LeNet-5's 226 units is hours; a proxy test about
0.5-1 s. The Gaussian estimator scores a whole layer in milliseconds and needs no estimate.
"""
from __future__ import annotations

import logging
import time

import torch

from mipp.progress import format_seconds

log = logging.getLogger(__name__)

FAST_ESTIMATORS = ("gaussian",)  # no estimate: a sweep takes seconds
SCALING_EXPONENT = {"ksg": 2.0, "proxy": 1.0}  # others: 2.0, the cautious guess
CALIBRATION_SAMPLES = 300
CALIBRATION_UNITS = 4
WARN_SECONDS = 300.0  # an estimate above this is a warning (shown even where logging is not configured)
BUDGET_SWEEPS = (7, 47)  # sweeps of a budget search, as measured on LeNet-5 (stats "bisection_steps")


def calibrate(estimator, n_samples: int, seed: int = 0) -> dict:
    """Seconds of one session, one unit's MI and one test of `estimator` on a tiny synthetic layer, scaled to
    `n_samples` samples (per the module docstring)."""
    import scipy.stats  # noqa: F401 - the tests import it on first use (~1 s): not a cost of each test

    n0 = min(n_samples, CALIBRATION_SAMPLES)
    generator = torch.Generator().manual_seed(seed)
    units = torch.randn(n0, CALIBRATION_UNITS, 1, generator=generator, dtype=torch.float64)
    mixing = torch.randn(CALIBRATION_UNITS, 4, generator=generator, dtype=torch.float64)
    target = units[:, :, 0] @ mixing + 0.5 * torch.randn(n0, 4, generator=generator, dtype=torch.float64)
    started = time.perf_counter()
    session = estimator.session(units, target)
    session_seconds = time.perf_counter() - started
    started = time.perf_counter()
    session.unit_mi()
    mi_seconds = (time.perf_counter() - started) / CALIBRATION_UNITS
    started = time.perf_counter()
    session.transfer_entropy(0)
    test_seconds = time.perf_counter() - started
    scale = (n_samples / n0) ** SCALING_EXPONENT.get(getattr(estimator, "name", ""), 2.0)
    return {"session": session_seconds * scale, "unit_mi": mi_seconds * scale, "test": test_seconds * scale,
            "calibration_samples": n0, "calibration_seconds": session_seconds + CALIBRATION_UNITS * mi_seconds
            + test_seconds}


def sweep_seconds(costs: dict, widths: list[int]) -> float:
    """Estimated seconds of one sweep over layers of these widths (units), from `calibrate`'s costs."""
    return sum(costs["session"] + width * (costs["unit_mi"] + costs["test"]) for width in widths)


def announce_cost(name: str, estimator, widths: list[int], n_samples: int, budget_mode: bool,
                  seed: int = 0) -> float | None:
    """Log (a warning above WARN_SECONDS) how long the sweep will take; returns the estimate, None when fast."""
    if name in FAST_ESTIMATORS:
        return None
    costs = calibrate(estimator, n_samples, seed)
    seconds = sweep_seconds(costs, widths)
    message = (f"MIPP with the {name} estimator: about {format_seconds(seconds)} per sweep over {sum(widths)} "
               f"units in {len(widths)} layers at {n_samples} samples (from a {costs['calibration_samples']}-sample "
               f"test case timed now)")
    if budget_mode:
        low, high = BUDGET_SWEEPS
        message += (f"; a budget repeats the sweep while it searches its price ({low}-{high} sweeps measured: "
                    f"{format_seconds(low * seconds)} to {format_seconds(high * seconds)})")
    message += ". The gaussian estimator takes seconds; fewer samples (n_samples, --samples) cut the time"
    if name == "ksg":
        message += " quadratically"
    log.log(logging.WARNING if seconds * (BUDGET_SWEEPS[0] if budget_mode else 1) > WARN_SECONDS else logging.INFO,
            "%s", message)
    return seconds
