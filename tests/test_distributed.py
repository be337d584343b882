"""Several processes under torchrun (gloo on CPU): the same Plan and statistics as one process, and a killed
training job that resumes to the weights of an uninterrupted one.

Each torchrun job is started as `python -m torch.distributed.run --standalone` (a free rendezvous port each
time, so tests do not collide) with one thread per process.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_training
from mipp.checkpoint import load_model
from mipp.cli import main

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# --device cpu: gloo and the host even where GPUs are (two ranks on one GPU are not a thing nccl does)
TINY_DATA = ["--data", "synthetic", "--data-option", "input_size=28", "--limit", "600", "--device", "cpu"]


def torchrun_command(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args]


def environment() -> dict:
    """This checkout's mipp first on the path, one thread per process."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun_command(*args), env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_cli(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    assert main(["train", "--model", "lenet5", *TINY_DATA, "--epochs", "1", "--batch-size", "32",
                 "--threads", "1", "--out", str(out), "--json"]) == 0
    return out / "model.pt"


def test_prune_with_two_processes_gives_the_single_process_plan(base_model, tmp_path, capsys):
    """600 calibration samples: batches of 256, 256 and 88, so rank 0 runs two and rank 1 one."""
    argv = ["prune", "--checkpoint", str(base_model), *TINY_DATA, "--samples", "600", "--budget", "0.5",
            "--metric", "macs", "--threads", "1", "--features", "mean"]  # gathered activations: exact (README)
    single = run_cli(capsys, [*argv, "--out", str(tmp_path / "one")])
    done = run_torchrun("-m", "mipp", *argv, "--out", str(tmp_path / "two"), "--json")
    shared = json.loads(done.stdout)  # rank 0 alone prints
    assert shared["processes"] == 2 and "processes" not in single
    one, two = (json.loads((tmp_path / name / "plan.json").read_text()) for name in ("one", "two"))
    assert "features" not in one["settings"] and "features" not in two["settings"]  # --features mean reached MIPP
    assert one["kept"] == two["kept"]
    assert one["decisions"] == two["decisions"]  # every unit's score and p-value, bit for bit
    assert sum(map(len, one["kept"].values())) < sum(one["sizes"].values())
    assert shared["units_kept"] == single["units_kept"] and shared["macs_removed"] == single["macs_removed"]
    # the re-fitted weights come from sums in another order: equal to rounding
    model_one, _ = load_model(tmp_path / "one" / "model.pt")
    model_two, _ = load_model(tmp_path / "two" / "model.pt")
    for (name, a), b in zip(model_one.state_dict().items(), model_two.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_all_reduced_statistics_equal_the_single_process_ones(tmp_path):
    """Captured activations (gathered) bit for bit; position moments and reconstruction sums (merged / all-reduced
    in float64) within 1e-9 relative; and the Plan MIPP selects on the position moments the same."""
    script = str(HERE / "distributed_statistics.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], env=environment(), check=True,
                   capture_output=True, timeout=120)
    run_torchrun(script, str(tmp_path / "two.pt"))
    one, two = (torch.load(tmp_path / f"{name}.pt", weights_only=False) for name in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert one["kept"] == two["kept"]
    for part in ("units", "outputs"):
        assert one[part].keys() == two[part].keys()
        for key in one[part]:
            assert torch.equal(one[part][key], two[part][key]), key
    assert one["moments"].keys() == two["moments"].keys() and one["readers"].keys() == two["readers"].keys()
    assert any(len(stats["between"]) for stats in one["moments"].values())
    for key, a in one["moments"].items():
        b = two["moments"][key]
        assert a["sums"][0] == b["sums"][0] and a["images"] == b["images"] == 600, key
        for k in (1, 2):
            assert _relative(b["sums"][k], a["sums"][k]) < 1e-9, key
        assert _relative(b["between"], a["between"]) < 1e-9, key
        assert abs(a["rho"] - b["rho"]) < 1e-9, key
    assert any(reader.startswith("features") for reader in one["readers"])  # a conv reader: positions drawn
    for name, a in one["readers"].items():
        b = two["readers"][name]
        assert a["rows"] == b["rows"] > 0, name
        for field in ("gram", "cross", "input_sum", "output_sum"):
            assert _relative(b[field], a[field]) < 1e-9, (name, field)


def test_training_releases_its_distributed_wrapper_while_the_process_group_is_alive(tmp_path):
    """fit() wraps the model in DistributedDataParallel, which sits in reference cycles; left to the interpreter's
    exit, it tore gloo down during finalisation and aborted a rank now and then (exit -6 after all work was done:
    5 of 60 two-process jobs). fit() now drops and collects it before it returns."""
    out = tmp_path / "release.json"
    run_torchrun(str(HERE / "distributed_release.py"), str(out))
    assert json.loads(out.read_text()) == {"world": 2, "ddp_alive": 0}


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun's agent and its workers (each in a session of its own, so a process group is not enough)."""
    for pid in [*_children(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def test_two_process_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, capsys):
    # 599 examples: 37 batches of 16 and one of 7, shared 4 / 3 (the loss weights of unequal parts at work)
    data = ["--data", "synthetic", "--data-option", "input_size=28", "--limit", "599", "--device", "cpu"]
    argv = ["-m", "mipp", "train", "--model", "lenet5", *data, "--epochs", "3", "--batch-size", "16",
            "--lr", "0.02", "--checkpoint-every", "10", "--threads", "1", "--json"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    state = killed / "train-state.pt"
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(torchrun_command(*argv, "--out", str(killed)), env=environment(), stdout=log,
                                   stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not state.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert state.exists(), (tmp_path / "log.txt").read_text()[-4000:]
        finally:
            _kill_job(process)
    assert not (killed / "model.pt").exists(), "the job finished before it could be killed"
    first = torch.load(state, weights_only=False)
    assert first["fingerprint"]["world_size"] == 2 and len(first["rng_ranks"]) == 2

    resumed = json.loads(run_torchrun(*argv, "--out", str(killed)).stdout)
    assert resumed["resumed_from"] is not None and resumed["resumed_from"]["epoch"] < 3
    run_torchrun(*argv, "--out", str(reference))
    model_b, record_b = assert_same_training(killed, reference)
    assert len(record_b["metrics"]["history"]) == 3 and record_b["metrics"]["n_train"] == 599
    # LeNet-5 has no batch norm, so two processes compute one process's steps, up to the rounding of the gradient
    # average and of the loss weights of the trailing batch's unequal parts (measured: 7e-7 relative)
    run_cli(capsys, [*argv[2:-1], "--out", str(tmp_path / "one")])
    model_c, _ = load_model(tmp_path / "one" / "model.pt")
    for (name, b), c in zip(model_b.state_dict().items(), model_c.state_dict().values()):
        assert torch.allclose(b, c, rtol=1e-4, atol=1e-5), name


def test_a_batch_size_the_processes_cannot_share_is_refused(base_model, tmp_path):
    done = subprocess.run(torchrun_command("-m", "mipp", "train", "--model", "lenet5", *TINY_DATA, "--epochs", "1",
                                           "--batch-size", "15", "--threads", "1", "--out", str(tmp_path / "t")),
                          env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--batch-size 15 cannot be shared by the 2 processes" in done.stderr


def test_fine_tuning_after_a_prune_resumes_from_its_state_file(base_model, tmp_path, capsys):
    """--finetune-checkpoint-every: the rerun prunes again (to the same model) and finds the fine-tuning done."""
    argv = ["prune", "--checkpoint", str(base_model), *TINY_DATA, "--samples", "300", "--budget", "0.5",
            "--finetune-epochs", "1", "--finetune-batch-size", "32", "--finetune-checkpoint-every", "5",
            "--threads", "1", "--out", str(tmp_path / "p")]
    first = run_cli(capsys, argv)
    assert (tmp_path / "p" / "finetune-state.pt").exists() and "finetune_resumed_from" not in first
    weights = load_model(tmp_path / "p" / "model.pt")[0].state_dict()
    again = run_cli(capsys, argv)
    assert again["finetune_resumed_from"] == {"epoch": 1, "step": 0}
    assert again["accuracy_finetuned"] == first["accuracy_finetuned"]
    for name, tensor in load_model(tmp_path / "p" / "model.pt")[0].state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_each_rank_takes_a_contiguous_part_of_every_global_batch_and_the_loss_weights_undo_unequal_parts():
    from mipp.train import epoch_batches, rank_batches, steps_per_epoch

    n, batch_size, world = 45, 16, 4  # batches of 16, 16 and 13 (parts of 4, 3, 3, 3)
    batches = epoch_batches(n, batch_size, seed=0, epoch=0)
    shares = [rank_batches(batches, rank, world) for rank in range(world)]
    for step, batch in enumerate(batches):
        assert torch.equal(torch.cat([parts[step] for parts, _ in shares]), batch)
        # DDP averages over the ranks the gradients of weight x (mean loss of the part): each example then counts
        # weight / (world x part size), which must be 1 / (global batch size), as in one process's mean loss
        for parts, weights in shares:
            assert weights[step] / (world * len(parts[step])) == pytest.approx(1 / len(batch), rel=1e-12)
    assert [weights[-1] for _, weights in shares] == [4 * 4 / 13] + [3 * 4 / 13] * 3
    assert len(shares[0][0]) == steps_per_epoch(n, batch_size, world) == 3
    # a trailing batch that would leave a rank fewer than 2 examples is dropped, and the step count says so
    assert len(rank_batches(epoch_batches(39, 16, 0, 0), 0, 4)[0]) == steps_per_epoch(39, 16, 4) == 2
