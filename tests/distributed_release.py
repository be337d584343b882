"""Two-process training with mipp.train.fit, then a count of the DistributedDataParallel objects still alive,
written by rank 0: run under torchrun by tests/test_distributed.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_release.py OUT.json
"""
import gc
import json
import sys

import torch

from mipp import distributed
from mipp.models import build_model
from mipp.train import TrainConfig, fit


def main(out: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group("cpu"):
        torch.manual_seed(0)
        model = build_model("lenet5", in_channels=1, input_size=28, width=0.5)
        data = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
        fit(model, data, TrainConfig(epochs=1, batch_size=16, device="cpu"), progress=False)
        alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        if distributed.is_main():
            with open(out, "w") as file:
                json.dump({"world": distributed.world_size(), "ddp_alive": alive}, file)


if __name__ == "__main__":
    main(sys.argv[1])
