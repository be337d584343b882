"""Selection plus reconstruction on VGG-11 (width 0.5, 2,000 calibration samples), against the capture forward pass.

The reference is one pass of the calibration samples through the unpruned model under torch.no_grad (batches of 256,
as capture runs them), measured in the same run. MIPP selects in budget mode (50% of MACs); reconstruction is timed
as its statistics pass (before surgery) and its solves (after), for several caps on the sampled output positions per
image (each reader takes as many as give it `ROWS_PER_FEATURE` rows per patch feature, up to the cap; the default is
marked), against every reader at the default cap (the rule before), and the sequential re-fit
(`reconstruct="sequential"`); the solves choose each reader's ridge by cross-validation (the default), and for the
default selection also use the fixed ridge, for their cost and output error; batch-norm recalibration is timed apart. Every line is a ratio to the reference; issue
13 asks for selection plus reconstruction at most 3x. The last column is what the time buys: the pruned model's
output error against the original on 500 held-out inputs (mean squared error over the output variance), without
reconstruction and with each setting.

Run: .venv/bin/python benchmarks/bench_reconstruct.py [--samples 2000] [--width 0.5] [--threads 1] [--positions 4,16,32]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch

from mipp import reconstruct
from mipp.activations import calibration_batches
from mipp.api import make_context
from mipp.methods import Budget, get_method
from mipp.models import build_model
from mipp.recalibrate import recalibrate_batch_norm
from mipp.reconstruct import (POSITIONS_PER_IMAGE, RIDGE, reconstruction_statistics, refit_readers,
                              refit_sequentially)
from mipp.surgery import apply_plan
from mipp.units import find_units


@contextlib.contextmanager
def rows_per_feature(value: int):
    """reconstruct.ROWS_PER_FEATURE set to `value` within the block (10**9: every reader takes the cap)."""
    saved, reconstruct.ROWS_PER_FEATURE = reconstruct.ROWS_PER_FEATURE, value
    try:
        yield
    finally:
        reconstruct.ROWS_PER_FEATURE = saved


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def forward_pass(model, data, n_samples: int) -> None:
    with torch.no_grad():
        for batch in calibration_batches(data, n_samples):
            model(batch)


def relative_error(pruned, model, held_out) -> float:
    with torch.no_grad():
        reference = model(held_out)
        return float(((pruned(held_out) - reference) ** 2).mean() / reference.var())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread mostly contends)")
    parser.add_argument("--positions", default=f"4,16,{POSITIONS_PER_IMAGE}",
                        help="comma-separated sampled output positions per image to compare")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model("vgg11", in_channels=3, input_size=32, width=args.width).eval()
    data = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    forward_pass(model, data, args.samples)  # warm-up
    _, floor = timed(lambda: forward_pass(model, data, args.samples))
    ctx = make_context(model, data, n_samples=args.samples)
    plan, selection = timed(lambda: get_method("mipp").select(ctx, Budget(0.5, "macs"), features="mean"))
    print(f"VGG-11 width {args.width}: {args.samples} calibration samples, {torch.get_num_threads()} threads; "
          f"MIPP removes {100 * plan.stats['macs_removed']:.1f}% of MACs")
    held_out = torch.randn(500, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = apply_plan(copy.deepcopy(model), plan, ctx.example_input)
    print(f"{'what':<66} {'seconds':>9} {'x forward':>10} {'rel. error':>10}")
    rows = [("forward pass of the calibration samples (the reference)", floor, None),
            ("MIPP selection, features='mean', 50% of MACs (capture incl.)", selection, None),
            ("plain removal (no reconstruction)", None, relative_error(plain, model, held_out))]
    # each number of positions as a cap with the per-reader rule (ROWS_PER_FEATURE rows per patch feature), and the
    # default cap taken by every reader (the rule before it), for comparison in the same run
    settings = [(p, True) for p in sorted({int(p) for p in args.positions.split(",")})] + [(POSITIONS_PER_IMAGE, False)]
    for positions, per_reader in settings:
        target = copy.deepcopy(model)
        units = find_units(target, ctx.example_input)
        with rows_per_feature(reconstruct.ROWS_PER_FEATURE if per_reader else 10 ** 9):
            statistics, gather = timed(lambda: reconstruction_statistics(
                target, plan, data, units=units, n_samples=args.samples, positions_per_image=positions))
        apply_plan(target, plan, units=units)
        _, solve = timed(lambda: refit_readers(target, statistics))
        what = (f"at most {positions} positions/image" if per_reader else f"{positions} positions/image, every reader")
        what += " (default)" if per_reader and positions == POSITIONS_PER_IMAGE else ""
        rows += [(f"reconstruction statistics pass, {what}", gather, None),
                 (f"reconstruction solves ({len(statistics)} readers)", solve, None),
                 (f"selection + reconstruction, {what}", selection + gather + solve,
                  relative_error(target, model, held_out))]
    # features="patches": the selection's position-sampled moments are the readers' normal equations (no second
    # pass); "auto" (the default): patches for the groups whose readers have at most AUTO_MAX_FEATURES features, the
    # spatial mean for the rest, and a reconstruction pass only for the readers the moments do not cover
    for features, per_reader in (("patches", True), ("auto", False), ("auto", True)):
        patches_ctx = make_context(model, data, n_samples=args.samples)
        patches_plan, patches_selection = timed(
            lambda: get_method("mipp").select(patches_ctx, Budget(0.5, "macs"), features=features))
        target = copy.deepcopy(model)
        units = find_units(target, ctx.example_input)
        with rows_per_feature(reconstruct.ROWS_PER_FEATURE if per_reader else 10 ** 9):
            statistics, gather = timed(lambda: reconstruction_statistics(
                target, patches_plan, data, units=units, n_samples=args.samples,
                moments=patches_ctx.reader_moments))
        apply_plan(target, patches_plan, units=units)
        _, solve = timed(lambda: refit_readers(target, statistics))
        on_means = len((patches_plan.settings.get("features") or {}).get("mean_groups", {}))
        rows += [(f"MIPP selection, features={features!r} ({100 * patches_plan.stats['macs_removed']:.1f}% of MACs"
                  + (f"; {on_means} groups on means)" if features == "auto" else ")"), patches_selection, None),
                 ("reconstruction statistics: the moments (+ a pass for the rest"
                  + (")" if per_reader else f", {POSITIONS_PER_IMAGE} positions/image for every reader)"), gather,
                  None),
                 (f"reconstruction solves ({len(statistics)} readers)", solve, None),
                 (f"selection + reconstruction, features={features!r}", patches_selection + gather + solve,
                  relative_error(target, model, held_out))]
        if features == "auto" and per_reader:  # the default; its solves also with the fixed ridge (the rule before)
            fixed = copy.deepcopy(model)
            apply_plan(fixed, patches_plan, units=find_units(fixed, ctx.example_input))
            _, fixed_solve = timed(lambda: refit_readers(fixed, statistics, ridge=RIDGE))
            rows.append((f"  the same solves with the fixed ridge {RIDGE:g} (not validated)", fixed_solve,
                         relative_error(fixed, model, held_out)))
    # reconstruct="sequential": after surgery, each reader from the pruned network's own inputs, in forward order (a
    # pass of both networks up to each reader), on the last plan above
    original, target = copy.deepcopy(model), copy.deepcopy(model)
    units = find_units(target, ctx.example_input)
    apply_plan(target, patches_plan, units=units)
    refitted, sequential = timed(lambda: refit_sequentially(original, target, patches_plan, data, units=units,
                                                            n_samples=args.samples))
    rows += [(f"sequential reconstruction ({len(refitted)} readers, a pass up to each)", sequential, None),
             ("selection + sequential reconstruction, features='auto'", patches_selection + sequential,
              relative_error(target, model, held_out))]
    _, recalibration = timed(lambda: recalibrate_batch_norm(target, data))
    rows.append(("batch-norm recalibration (16 batches of 128)", recalibration, None))
    for label, seconds, error in rows:
        time_columns = f"{'':>9} {'':>10}" if seconds is None else f"{seconds:>9.3f} {seconds / floor:>10.2f}"
        print(f"{label:<66} {time_columns} {'' if error is None else f'{error:.4f}':>10}")


if __name__ == "__main__":
    main()
