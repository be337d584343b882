"""The README's command-line examples, run exactly as written, on a tiny stand-in for Fashion-MNIST.

The commands come from the ```bash blocks of the README's "Command line" section. They run in a temporary folder,
in this process (`mipp.cli.main` on the shell-split line), with MIPP_FASHION_MNIST pointing at a few hundred
random 28x28 images in the IDX format, so that `--data fashion-mnist` reads them. The fast test puts a LeNet-5
trained for a few batches at runs/demo/base.pt, where `make demo` leaves the trained model, and runs every command
that follows `make demo`; the slow one runs the demo itself and the experiment commands. The one command not run
as written is the full LeNet-5 grid sweep (hours): it runs with --dry-run, which still reads its config and
counts its runs.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from mipp.checkpoint import save_model
from mipp.cli import main
from mipp.data import load_dataset
from mipp.models import build_model
from mipp.train import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("mipp", ".venv/bin/mipp")
SET_UP = ("source .venv/bin/activate",)
TOO_LONG = "--config configs/protocol/lenet5-macs.json"  # a protocol sweep: counted with --dry-run, not run


def readme_commands(section: str = "## Command line") -> list[str]:
    """Every command line of the ```bash blocks between `section` and the next level-2 heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def argv_of(line: str) -> list[str] | None:
    """The arguments after the program name, or None for a set-up line; anything else is a README error."""
    words = shlex.split(line, comments=True)
    if " ".join(words) in SET_UP:
        return None
    assert words and words[0] in PROGRAMS, f"README command line {line!r} is neither mipp nor a set-up step"
    return words[1:]


def write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.tobytes())


def tiny_fashion_mnist(folder: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Fashion-MNIST's four IDX files with a few hundred images: a noisy template per class (learnable)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        noise = rng.normal(0, 60, size=(n, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A working folder like a fresh clone after `make demo`'s set-up: configs/ at hand, the data installed."""
    monkeypatch.setenv("MIPP_FASHION_MNIST", str(tiny_fashion_mnist(tmp_path / "fashion-mnist")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the commands keep this process's one thread
    monkeypatch.setenv("MIPP_PROGRESS_SECONDS", "3600")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def run(line: str, extra: tuple[str, ...] = ()) -> None:
    argv = argv_of(line)
    if argv is not None:
        assert main(argv + list(extra)) == 0, f"README command failed: {line}"


def test_the_readme_has_the_commands_this_test_runs():
    commands = readme_commands()
    programs = [argv_of(line) for line in commands]
    names = [argv[0] for argv in programs if argv]
    assert {"train", "eval", "prune", "demo", "sweep", "report"} <= set(names)
    assert any("runs/demo/base.pt" in line for line in commands), "the examples start from what make demo writes"
    assert sum(TOO_LONG in line for line in commands) == 1


def test_readme_commands_after_make_demo(clone):
    """Every command except the demo itself and the experiments, on a LeNet-5 trained for a few batches."""
    train = load_dataset("fashion-mnist", "train")
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    fit(model, train, TrainConfig(epochs=1, batch_size=128, device="cpu"), progress=False)
    save_model(clone / "runs" / "demo" / "base.pt", model, metrics=evaluate(model, load_dataset("fashion-mnist",
                                                                                                "test")))
    ran = 0
    for line in readme_commands():
        argv = argv_of(line)
        if argv is None or argv[0] in ("demo", "sweep", "report"):
            continue
        run(line)
        ran += 1
    assert ran >= 6
    assert (clone / "runs" / "demo-p70" / "plan.json").exists() and (clone / "runs" / "lenet" / "model.pt").exists()


@pytest.mark.slow
def test_readme_demo_and_experiment_commands(clone):
    """`mipp demo` on the tiny data (its 5 epochs are a few batches each), then the sweep and report commands."""
    for line in readme_commands():
        argv = argv_of(line)
        if argv is None or argv[0] not in ("demo", "sweep", "report"):
            continue
        run(line, ("--dry-run",) if TOO_LONG in line else ())
    assert (clone / "runs" / "demo" / "results.md").exists() and (clone / "runs" / "try-report").is_dir()


def test_readme_findings_are_the_generated_ones():
    """The README's findings are docs/findings.md verbatim (made by `mipp report --readme README.md`), never
    numbers copied by hand."""
    from mipp.experiments.findings import block_of

    generated = ROOT / "docs" / "findings.md"
    if not generated.exists():
        pytest.skip("no generated findings in this checkout")
    assert block_of(ROOT / "README.md") == generated.read_text()
