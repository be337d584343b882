"""Calibration statistics of a tiny LeNet-5, written to a file: run as one process, or under torchrun by
tests/test_distributed.py, which compares the two (rank 0 writes; every rank checks it holds the same).

    python tests/distributed_statistics.py OUT.pt
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_statistics.py OUT.pt
"""
import sys

import torch

from mipp import distributed
from mipp.activations import capture
from mipp.api import select_plan
from mipp.models import build_model
from mipp.positions import capture_reader_moments
from mipp.reconstruct import reconstruction_statistics
from mipp.units import find_units

SAMPLES = 600  # batches of 256, 256 and 88: rank 0 of 2 takes the first and the last, rank 1 the second


def main(out: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group("cpu"):
        torch.manual_seed(0)
        model = build_model("lenet5", in_channels=1, input_size=28, width=0.5).eval()
        data = torch.randn(SAMPLES, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        units = find_units(model, data[:2])
        acts = capture(model, units, data, n_samples=SAMPLES)
        moments = capture_reader_moments(model, units, data, n_samples=SAMPLES)
        plan = select_plan(model, data, budget=0.5, metric="macs", n_samples=SAMPLES, features="patches")
        readers = reconstruction_statistics(model, plan, data, units=units, n_samples=SAMPLES)
        result = {
            "world": distributed.world_size(),
            "units": acts.units, "outputs": acts.outputs,
            "moments": {f"{r.group}|{r.reader}": {"sums": r.moments.as_sums(), "images": r.images,
                                                  "between": r.between, "rho": r.intra_image_correlation}
                        for readers in moments.values() for r in readers},
            "readers": {name: {"gram": s.gram, "cross": s.cross, "input_sum": s.input_sum,
                               "output_sum": s.output_sum, "rows": s.rows} for name, s in readers.items()},
            "kept": plan.kept,
        }
        everyone = distributed.all_gather_objects(result)
        for other in everyone[1:]:  # every rank holds what rank 0 holds
            assert other["kept"] == result["kept"]
            for key, value in result["units"].items():
                assert torch.equal(other["units"][key], value), key
            for name, stats in result["readers"].items():
                assert torch.equal(other["readers"][name]["gram"], stats["gram"]), name
            for key, stats in result["moments"].items():
                assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                           for a, b in zip(other["moments"][key]["sums"], stats["sums"])), key
        if distributed.is_main():
            torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1])
