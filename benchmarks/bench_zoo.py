"""MIPP at the scale of torchvision's ResNet-50 and EfficientNet-B0: capture time, selection time, peak memory.

Issue 17's goal: at 50% of MACs with 512 calibration samples of 64x64, selection at most 3x the capture pass and
peak memory under 2 GB. "capture" is MIPP's own pass(es) over the calibration data (position moments, and the
spatial means of the groups that features="auto" reads by their mean: two passes when there are both); "forward"
is one plain forward pass of the same images, the floor of any activation method. Needs torchvision (the zoo
environment: `make test-zoo` builds `.venv-zoo`); run `.venv-zoo/bin/python benchmarks/bench_zoo.py [model ...]`.
Each model runs in a fresh process, so that the peak resident memory printed is its own; "floor" is that peak
before MIPP starts (torch, torchvision, the model and one forward pass: the CUDA build of torch that torchvision
needs here is large). Prints ratios, asserts nothing.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

MODELS = ("resnet50", "efficientnet_b0")
N_SAMPLES = 512
SIDE = 64


def measure(name: str) -> dict:
    import torch
    import torchvision

    import mipp

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    images = torch.randn(N_SAMPLES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    with torch.no_grad():  # the floor: one plain forward pass of the calibration set, in the capture's batches
        for batch in images.split(256):
            model(batch)
    forward_s = time.perf_counter() - started
    floor_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # torch, torchvision, model and pass
    started = time.perf_counter()
    plan = mipp.select_plan(model, images, method="mipp", budget=0.5, metric="macs", example_input=images[:2],
                            n_samples=N_SAMPLES)
    features = plan.settings.get("features") or {}
    return {"model": name, "forward_s": forward_s, "capture_s": plan.stats["capture_seconds"],
            "groups_on_means": len(features.get("mean_groups", {})) if features else len(plan.kept),
            "groups": len(plan.kept),
            "selection_s": plan.stats["selection_seconds"] - plan.stats["capture_seconds"],
            "total_s": time.perf_counter() - started, "macs_removed": plan.stats["macs_removed"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "floor_gb": floor_gb,
            "excluded": len(plan.excluded)}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(measure(argv[1])))
        return
    print(f"MIPP at 50% of MACs, {N_SAMPLES} samples of {SIDE}x{SIDE}, "
          f"{os.environ.get('OMP_NUM_THREADS', '1')} thread(s)")
    print(f"{'model':<16} {'forward s':>9} {'capture s':>10} {'selection s':>12} {'selection/capture':>18} "
          f"{'selection/forward':>18} {'peak GB':>8} {'floor GB':>9} {'MACs removed':>13} {'groups on means':>16}")
    for name in argv or MODELS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<16} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<16} {r['forward_s']:>9.1f} {r['capture_s']:>10.1f} {r['selection_s']:>12.1f} "
              f"{r['selection_s'] / max(r['capture_s'], 1e-9):>18.1f} "
              f"{r['selection_s'] / max(r['forward_s'], 1e-9):>18.1f} {r['peak_rss_gb']:>8.2f} {r['floor_gb']:>9.2f} "
              f"{100 * r['macs_removed']:>12.1f}% {r['groups_on_means']:>9} of {r['groups']:<4}")


if __name__ == "__main__":
    main(sys.argv[1:])
