"""The `mipp` command: train then eval with --json, bad input as one-line errors, and a real kill-and-resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_same_training
from mipp import __version__
from mipp.cli import main

TRAIN = ["train", "--model", "mlp", "--data", "synthetic", "--limit", "400", "--epochs", "2", "--batch-size", "32"]


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_train_then_eval_with_json_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = run_json(capsys, TRAIN)
    out = tmp_path / "runs" / "mlp-synthetic-s0"  # the default output folder
    assert trained["out"] == os.path.join("runs", "mlp-synthetic-s0")
    assert {p.name for p in out.iterdir()} == {"train-state.pt", "model.pt", "metrics.json"}
    assert trained["test_accuracy"] > 0.9 and trained["n_test"] == 400 and trained["resumed_from"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["config"]["batch_size"] == 32

    scores = run_json(capsys, ["eval", "--checkpoint", str(out / "model.pt"), "--data", "synthetic", "--limit", "400"])
    assert scores["accuracy"] == trained["test_accuracy"] and scores["n"] == 400
    assert scores["params"] == trained["params"] and scores["loss"] == pytest.approx(trained["test_loss"])

    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--data", "synthetic"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # rerunning a finished run loads it instead of training again
    assert run_json(capsys, TRAIN)["resumed_from"] == {"epoch": 2, "step": 0}


@pytest.mark.parametrize("argv, cause", [
    (["train", "--model", "nope", "--data", "synthetic"], "unknown model name 'nope'"),
    (["train", "--model", "mlp", "--data", "nope"], "unknown data set 'nope'"),
    (["train", "--model", "mlp", "--data", "synthetic", "--data-option", "colour=1"], "colour"),
    (["train", "--model", "mlp", "--data", "synthetic", "--optimizer", "adam", "--lr", "-1"], "lr must be > 0"),
    (["eval", "--checkpoint", "missing/model.pt", "--data", "synthetic"], "no checkpoint file at missing/model.pt"),
])
def test_bad_input_exits_2_with_a_one_line_message(tmp_path, capsys, monkeypatch, argv, cause):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"mipp {argv[0]}: error: ") and cause in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_resuming_another_run_needs_no_resume(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert main(TRAIN + out + ["--epochs", "1"]) == 0
    assert main(TRAIN + out + ["--epochs", "3", "--json"]) == 2
    assert "epochs: 1 there, 3 now" in capsys.readouterr().err
    assert run_json(capsys, TRAIN + out + ["--epochs", "3", "--no-resume"])["epochs"] == 3
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "train-state.pt"), "--data", "synthetic"]) == 2
    assert "expected 'mipp-model/1'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"mipp {__version__}"


@pytest.mark.parametrize("module", ["mipp", "mipp.cli"])
def test_python_dash_m_runs_the_command(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"mipp {__version__}"


def test_sigkilled_training_resumes_to_the_same_weights_and_metrics(tmp_path, capsys):
    """A real `mipp train` process is killed with SIGKILL after its first checkpoint and then resumed."""
    argv = ["train", "--model", "lenet5", "--data", "synthetic", "--data-option", "input_size=28", "--epochs", "3",
            "--batch-size", "16", "--lr", "0.02", "--checkpoint-every", "25",
            # one thread in every run: without --threads the CLI picks its threads from the machine's load, and
            # runs with different thread counts do not compute bit for bit the same (CI failed on this once)
            "--threads", "1"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    state = killed / "train-state.pt"
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mipp.cli", *argv, "--out", str(killed)],
                                   stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while not state.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert state.exists(), (tmp_path / "log.txt").read_text()
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert not (killed / "model.pt").exists(), "the process finished before it could be killed"

    resumed = run_json(capsys, argv + ["--out", str(killed)])
    assert resumed["resumed_from"] is not None and resumed["resumed_from"]["epoch"] < 3
    run_json(capsys, argv + ["--out", str(reference)])
    assert_same_training(killed, reference)
