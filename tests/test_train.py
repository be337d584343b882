"""The training loop and checkpoints: learning, determinism, exact resume, atomic files, model save/load."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mipp.checkpoint import CheckpointError, load_model, read_record, save_model
from mipp.io import atomic_open, atomic_torch_save
from mipp.train import TrainConfig, epoch_batches, evaluate, fit, flip_crop, lr_factor, steps_per_epoch


class Arrays:
    """A stand-in for an in-memory data set: `.images` / `.labels` tensors; class c shifts the brightness by c/2."""

    def __init__(self, n, seed, num_classes=3):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)
        self.images = torch.randn(n, 1, 8, 8, generator=generator) + 0.5 * (self.labels - 1.0).view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class Lazy(torch.utils.data.Dataset):
    """The same data without `.images` / `.labels`, so the loop must go through a DataLoader."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return self.arrays[i]


TRAIN, TEST = Arrays(300, seed=1), Arrays(120, seed=2)
CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.1, checkpoint_every=4, augment="flip-crop", device="cpu")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def metrics(result):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result["history"]]


@pytest.fixture(scope="module")
def reference():
    """One uninterrupted run of CONFIG, the yardstick of the determinism and resume tests."""
    model = tiny_model()
    return model, fit(model, TRAIN, CONFIG, eval_set=TEST, progress=False)


# ------------------------------------------------------------------------------------------- learning


def test_tiny_model_learns_the_synthetic_task(reference):
    model, result = reference
    assert len(result["history"]) == 3
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    scores = evaluate(model, TEST)
    assert scores["accuracy"] > 0.85  # chance is 1/3
    assert scores["n"] == len(TEST)
    assert scores["accuracy"] == result["history"][-1]["eval_accuracy"]


def test_same_seed_same_weights_other_seed_other_weights(reference):
    model, result = reference
    again = tiny_model()
    assert metrics(fit(again, TRAIN, CONFIG, eval_set=TEST, progress=False)) == metrics(result)
    assert same_weights(model, again)
    other = tiny_model()
    fit(other, TRAIN, TrainConfig(**{**CONFIG.to_dict(), "seed": 1}), progress=False)
    assert not same_weights(model, other)


def test_fit_leaves_the_callers_rng_alone():
    model = tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, TRAIN, TrainConfig(epochs=1, device="cpu"), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_dataloader_path_gives_the_same_run_as_in_memory(reference):
    model, result = reference
    lazy = tiny_model()
    assert metrics(fit(lazy, Lazy(TRAIN), CONFIG, eval_set=Lazy(TEST), progress=False)) == metrics(result)
    assert same_weights(model, lazy)


# --------------------------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def interrupt_at(epoch, step):
    def callback(info):
        if info["event"] == "step" and info["epoch"] == epoch and info["step"] == step:
            raise Interrupt

    return callback


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "dataloader"])
def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path, lazy):
    wrap = Lazy if lazy else (lambda data: data)
    path = tmp_path / "train-state.pt"
    with pytest.raises(Interrupt):  # step 7 of epoch 2: the last checkpoint was at its step 6 (global step 16)
        fit(tiny_model(), wrap(TRAIN), CONFIG, eval_set=wrap(TEST), checkpoint_path=path, progress=False,
            callbacks=[interrupt_at(1, 7)])
    assert read_record(path, "mipp-train/1")["step"] == 6
    resumed = tiny_model(seed=99)  # the checkpoint, not the initialisation, decides the weights
    result = fit(resumed, wrap(TRAIN), CONFIG, eval_set=wrap(TEST), checkpoint_path=path, progress=False)
    assert result["resumed_from"] == {"epoch": 1, "step": 6}
    assert metrics(result) == metrics(reference[1])
    assert same_weights(resumed, reference[0])


def test_finished_checkpoint_is_loaded_not_retrained(reference, tmp_path):
    path = tmp_path / "train-state.pt"
    fit(tiny_model(), TRAIN, CONFIG, eval_set=TEST, checkpoint_path=path, progress=False)
    calls = []
    model = tiny_model(seed=5)
    result = fit(model, TRAIN, CONFIG, eval_set=TEST, checkpoint_path=path, progress=False, callbacks=[calls.append])
    assert calls == [] and result["resumed_from"] == {"epoch": 3, "step": 0}
    assert same_weights(model, reference[0]) and metrics(result) == metrics(reference[1])


def test_checkpoint_of_another_run_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "train-state.pt"
    short = TrainConfig(epochs=1, batch_size=32, device="cpu")
    fit(tiny_model(), TRAIN, short, checkpoint_path=path, progress=False)
    with pytest.raises(CheckpointError, match=r"lr: 0.05 there, 0.2 now.*new output folder.*--no-resume"):
        fit(tiny_model(), TRAIN, TrainConfig(epochs=1, batch_size=32, lr=0.2), checkpoint_path=path, progress=False)
    wider = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(CheckpointError, match="shapes differ"):
        fit(wider, TRAIN, short, checkpoint_path=path, progress=False)
    with pytest.raises(CheckpointError, match="identity"):
        fit(tiny_model(), TRAIN, short, checkpoint_path=path, progress=False, identity={"data": "other"})
    # result-neutral settings may change, and resume=False starts over
    fit(tiny_model(), TRAIN, TrainConfig(epochs=1, batch_size=32, checkpoint_every=7), checkpoint_path=path,
        progress=False)
    assert fit(wider, TRAIN, short, checkpoint_path=path, resume=False, progress=False)["resumed_from"] is None


# ------------------------------------------------------------------------------------ pieces of the loop


def test_config_json_round_trip_and_validation():
    config = TrainConfig(epochs=7, lr=0.01, optimizer="adam", schedule="step", warmup_epochs=0.5, seed=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="rmsprop")
    assert TrainConfig().effective_lr == 0.05 and TrainConfig(optimizer="adam").effective_lr == 1e-3


def test_epoch_batches_cover_every_example_once_and_depend_on_seed_and_epoch():
    batches = epoch_batches(100, 32, seed=0, epoch=0)
    assert [len(b) for b in batches] == [32, 32, 32, 4] == [len(b) for b in epoch_batches(100, 32, 0, 0)]
    assert sorted(torch.cat(batches).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(100, 32, 0, 0)))
    assert not torch.equal(batches[0], epoch_batches(100, 32, 0, 1)[0])
    assert not torch.equal(batches[0], epoch_batches(100, 32, 1, 0)[0])
    assert len(epoch_batches(65, 32, 0, 0)) == 2 == steps_per_epoch(65, 32)  # a lone last example is dropped


def test_lr_schedules():
    cosine = TrainConfig(epochs=2, warmup_epochs=0.5)
    factors = [lr_factor(s, cosine, 10) for s in range(20)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and factors[-1] < 0.02
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    step = TrainConfig(epochs=4, schedule="step")
    assert [lr_factor(e * 10, step, 10) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(17, TrainConfig(schedule="constant"), 10) == 1.0


def test_flip_crop_is_seeded_and_keeps_shapes():
    images = torch.randn(6, 3, 16, 16)
    out = flip_crop(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and not torch.equal(out, images)
    assert torch.equal(out, flip_crop(images, torch.Generator().manual_seed(0)))
    # every output is a (possibly flipped) window of the zero-padded input
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        windows = [img[:, y:y + 16, x:x + 16] for img in (padded[i], padded[i].flip(2))
                   for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_evaluate_restores_each_modules_mode():
    model = tiny_model()
    model.train()
    model[4].eval()
    before = [m.training for m in model.modules()]
    scores = evaluate(model, TEST, batch_size=50)
    assert [m.training for m in model.modules()] == before
    model.eval()
    with torch.no_grad():
        logits = model(TEST.images)
    assert scores["loss"] == pytest.approx(nn.functional.cross_entropy(logits, TEST.labels).item(), rel=1e-5)
    assert scores["accuracy"] == (logits.argmax(1) == TEST.labels).sum().item() / len(TEST)


# ------------------------------------------------------------------------------------------ checkpoint


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(path, {"value": torch.ones(3)})
    with pytest.raises(Exception):
        atomic_torch_save(path, {"value": lambda: None})  # cannot be pickled: fails mid-serialisation
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.ones(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old and complete")
    script = textwrap.dedent(f"""
        import os
        from mipp.io import atomic_open
        with atomic_open({str(path)!r}, "w") as handle:
            handle.write("new but ")
            handle.flush()
            os._exit(9)  # dies without cleaning up, like SIGKILL
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert path.read_text() == "old and complete"
    with atomic_open(path, "w") as handle:
        handle.write("replaced")
    assert path.read_text() == "replaced"
    assert os.listdir(tmp_path) == ["notes.txt"]  # the dead writer's temporary file was cleaned up


def small_mlp(seed=0):
    from mipp.models import build_model

    torch.manual_seed(seed)
    return build_model("mlp", in_channels=1, input_size=8, num_classes=3, hidden=(12, 6))


def test_save_and_load_model_round_trip(tmp_path):
    model = small_mlp()
    path = save_model(tmp_path / "model.pt", model, metrics={"accuracy": 0.5}, extra={"note": ("a", 1)})
    loaded, record = load_model(path)
    assert same_weights(model, loaded) and not loaded.training
    assert record["format"] == "mipp-model/1" and record["metrics"] == {"accuracy": 0.5}
    assert record["extra"] == {"note": ["a", 1]} and record["plan"] is None
    assert set(record["versions"]) == {"mipp", "torch", "python"}


def test_save_and_load_pruned_model_through_its_plan(tmp_path):
    from mipp.plan import Plan
    from mipp.surgery import apply_plan
    from mipp.units import find_units

    model = small_mlp()
    x = torch.randn(5, 1, 8, 8)
    units = find_units(model, x)
    plan = Plan(kept={g.key: list(range(0, g.size, 2)) for g in units.groups},
                sizes={g.key: g.size for g in units.groups}, method="test", example_shape=list(x.shape))
    pruned = apply_plan(model, plan).eval()
    save_model(tmp_path / "pruned.pt", pruned, plan=plan)
    loaded, record = load_model(tmp_path / "pruned.pt")
    assert record["plan"]["kept"] == plan.kept
    assert same_weights(pruned, loaded)
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))


def test_bad_model_files_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*mipp train"):
        load_model(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{garbage} is not a readable mipp checkpoint"):
        load_model(garbage)
    other = tmp_path / "other.pt"
    torch.save({"format": "something/1"}, other)
    with pytest.raises(CheckpointError, match=f"{other} has format 'something/1'.*OUT/model.pt"):
        load_model(other)
    with pytest.raises(ValueError, match="mipp_config"):
        save_model(tmp_path / "x.pt", tiny_model())
