"""mipp.progress off a terminal: which lines a long step logs, and when (a fake clock, no waiting)."""
import logging

import pytest
import torch

from mipp import progress
from mipp.progress import Progress, format_seconds, quiet, track


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch, caplog):
    fake = FakeClock()
    monkeypatch.setattr(progress, "_clock", fake)
    monkeypatch.delenv("MIPP_PROGRESS_SECONDS", raising=False)
    caplog.set_level(logging.INFO, logger="mipp.progress")
    return fake


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mipp.progress"]


def test_a_quick_step_prints_nothing(clock, caplog):
    with Progress(50, "quick") as step:
        for _ in range(50):
            step.update()
    assert lines(caplog) == []


def test_a_slow_step_reports_each_tenth_with_eta(clock, caplog):
    with Progress(100, "capture", "sample") as step:
        for _ in range(100):
            clock.now += 1.0  # 1 s per sample: 10 s per tenth, more than the minimum gap
            step.update()
    reported = lines(caplog)
    assert len(reported) == 10
    assert reported[0] == "capture 10/100 sample (10%), 10s, ETA 1m30s"
    assert reported[-1] == "capture 100/100 sample (100%), 1m40s"


def test_periodic_lines_name_every_enclosing_step(clock, caplog):
    with Progress(4, "demo", "job") as demo:
        demo.status("mipp at 70% of units")
        clock.now += 10
        with Progress(200, "fine-tuning", "batch") as tune:
            for _ in range(200):
                clock.now += 0.5  # inner steps do not report their tenths, only every interval
                tune.update()
        demo.update()
    reported = lines(caplog)
    assert len(reported) == 4  # every 30 s during fine-tuning, then the outer step's first quarter
    assert reported[0] == "demo 0/4 [mipp at 70% of units] > fine-tuning 40/200 batch (20%), 20s, ETA 1m20s"
    assert reported[-1] == "demo 1/4 job (25%), 1m50s, ETA 5m30s [mipp at 70% of units]"


def test_notes_print_at_the_top_and_become_the_status_when_nested(clock, caplog):
    with Progress(2, "training", "batch") as top:
        top.note("epoch 1/2: loss 0.5")
        with Progress(2, "inner") as inner:
            inner.note("epoch 1/1: loss 0.7")
            assert inner.text == "epoch 1/1: loss 0.7"
    assert lines(caplog) == ["epoch 1/2: loss 0.5"]


def test_quiet_and_disabled_steps_print_nothing(clock, caplog):
    with quiet():
        step = Progress(10, "silenced")
        clock.now += 100
        step.update(10)
        step.note("nothing")
        step.close()
    for _ in track(range(10), "off", enabled=False):
        clock.now += 100
    assert lines(caplog) == []


def test_the_interval_can_be_set_from_the_environment(clock, caplog, monkeypatch):
    monkeypatch.setenv("MIPP_PROGRESS_SECONDS", "5")
    with Progress(None, "unknown total", "unit") as step:
        for _ in range(4):
            clock.now += 3
            step.update()
    assert lines(caplog) == ["unknown total 2 unit, 6s", "unknown total 4 unit, 12s"]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59, "59s"), (185, "3m05s"), (3725, "1h02m"),
                                           (float("inf"), "?")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_training_logs_one_labelled_line_per_epoch(clock, caplog):
    from mipp.train import TrainConfig, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    fit(model, data, TrainConfig(epochs=2, batch_size=16, device="cpu"), description="training tiny")
    reported = lines(caplog)
    assert [line.split(":")[0] for line in reported] == ["training tiny epoch 1/2", "training tiny epoch 2/2"]
    assert "train_loss" in reported[0]
    caplog.clear()
    fit(model, data, TrainConfig(epochs=1, batch_size=16, device="cpu"), progress=False)
    assert lines(caplog) == []


def test_eta_is_not_thrown_off_by_one_long_item(clock):
    with Progress(10, "demo", "job") as demo:
        for seconds in (100, 10, 10):  # the base training, then two quick jobs
            clock.now += seconds
            demo.update()
        assert demo.eta_seconds() == 70  # 7 jobs left at the median 10 s, not at the mean 40 s


def test_work_found_already_done_does_not_shorten_the_eta(clock):
    with Progress(100, "sweep", "run") as sweep:
        sweep.update(60, timed=False)  # a resumed sweep's finished runs, found in no time
        for _ in range(2):
            clock.now += 30
            sweep.update()
        assert sweep.done == 62 and sweep.eta_seconds() == 38 * 30


def test_a_finished_piece_of_work_gets_one_line_with_the_eta(clock, caplog):
    with Progress(4, "demo", "job") as demo:
        for job in ("a", "b"):
            clock.now += 20
            demo.update(1, note=f"job {job}: done")
    assert lines(caplog) == ["[1/4, ETA 1m00s] job a: done", "[2/4, ETA 40s] job b: done"]


def test_a_slow_estimator_announces_its_time_before_the_sweep(caplog):
    from mipp.mi import get_estimator
    from mipp.mi.cost import announce_cost

    caplog.set_level(logging.INFO, logger="mipp.mi.cost")
    estimator = get_estimator("ksg", seed=0, n_permutations=5)
    seconds = announce_cost("ksg", estimator, [16, 8], n_samples=120, budget_mode=True)
    assert seconds > 0
    (message,) = [r.getMessage() for r in caplog.records if r.name == "mipp.mi.cost"]
    assert "ksg estimator: about" in message and "24 units in 2 layers at 120 samples" in message
    assert "budget repeats the sweep" in message and "quadratically" in message
    assert announce_cost("gaussian", get_estimator("gaussian"), [16, 8], 120, False) is None


def test_the_sweep_reports_its_units_when_slow(clock, caplog, monkeypatch):
    import mipp

    ticking = iter(range(10 ** 6))
    monkeypatch.setattr(progress, "_clock", lambda: 1000.0 + 7 * next(ticking))  # every call: 7 s later
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = torch.randn(200, 6)
    mipp.select_plan(model, data, example_input=data[:2], n_samples=200)
    reported = lines(caplog)
    assert any(line.startswith("capture ") for line in reported)
    assert any(line.startswith("MIPP sweep ") and " unit " in line and "[group " in line for line in reported)


def test_a_step_abandoned_by_an_exception_does_not_stay_open(clock, caplog):
    def failing():
        step = Progress(10, "abandoned")  # never closed: the exception leaves it behind
        step.update()
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        failing()
    with Progress(10, "next") as step:
        assert step.depth == 0
        step.note("printed: outermost again")
    assert lines(caplog) == ["printed: outermost again"]
