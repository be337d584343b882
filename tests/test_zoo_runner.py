"""scripts/zoo.py's reading of its logs: outcomes, seconds, memory, time limits, and the table it writes."""
import importlib.util
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "scripts" / "zoo.py"
spec = importlib.util.spec_from_file_location("zoo_runner", PATH)
zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo)

TEST = "tests/test_zoo.py::test_architecture_prunes_into_a_working_smaller_model"


def write_log(folder: Path, name: str, body: str, tail: str) -> None:
    (folder / f"{name}.log").write_text(f"commit: abc1234\narchitecture: {name}\n{body}\n{tail}")


def test_a_finished_log_gives_each_runs_outcome_and_seconds(tmp_path):
    body = "\n".join([
        f"31.50s call     {TEST}[resnet18-mipp-0.5]",
        f"2.25s setup    {TEST}[resnet18-mipp-confidence]",
        f"4.00s call     {TEST}[resnet18-mipp-confidence]",
        f"PASSED {TEST}[resnet18-mipp-confidence]",
        f"FAILED {TEST}[resnet18-mipp-0.5] - AssertionError",
        f"PASSED {TEST}[resnet18-random-0.5]",
        f"PASSED {TEST}[resnet18-tp-l1-0.5]",
    ])
    write_log(tmp_path, "resnet18", body, "exit status: 1\nwall seconds: 61.5\npeak MB: 2048\n")
    record = zoo.read_log(tmp_path / "resnet18.log")
    assert record["commit"] == "abc1234" and record["status"] == 1 and not record["timed_out"]
    assert record["outcomes"] == {"mipp-confidence": "passed", "mipp-0.5": "failed", "random-0.5": "passed",
                                  "tp-l1-0.5": "passed"}
    assert record["seconds"] == {"mipp-0.5": 31.5, "mipp-confidence": 4.0} and record["setup"] == 2.25
    assert record["wall"] == 61.5 and record["peak_mb"] == 2048
    text = zoo.table([("resnet18", 11_700_000), ("vgg11", 132_900_000)], tmp_path)
    assert text.startswith("0 of 2 architectures passed all four runs.")
    row = next(line for line in text.splitlines() if line.startswith("| resnet18 "))
    assert "failed (32 s)" in row and "passed (4 s)" in row and "| 2.0 | abc1234 |" in row
    assert "| vgg11 | 132.9 | not run |" in text


def test_a_log_cut_by_the_time_limit_or_unfinished_says_so(tmp_path):
    write_log(tmp_path, "vit_h_14", f"PASSED {TEST}[vit_h_14-mipp-confidence]",
              "time limit reached: 900 s\n\nexit status: -9\nwall seconds: 900.2\npeak MB: 9000\n")
    record = zoo.read_log(tmp_path / "vit_h_14.log")
    assert record["timed_out"] and record["limit"] == 900.0
    row = next(line for line in zoo.table([("vit_h_14", 632_000_000)], tmp_path).splitlines()
               if line.startswith("| vit_h_14 "))
    assert row.count("time limit") == 3 and "passed" in row
    (tmp_path / "cut.log").write_text("commit: abc1234\narchitecture: cut\n")  # the process never finished
    assert zoo.read_log(tmp_path / "cut.log") is None and zoo.read_log(tmp_path / "absent.log") is None
