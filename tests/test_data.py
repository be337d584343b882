"""Tests of mipp.data: every reader is checked on tiny files written here, exactly, plus the error paths.

The IDX, CIFAR and image-folder files are made by the tests (same structure as the real ones) so the
readers are verified value by value without any download; one test reads Debian's real Fashion-MNIST
when it is installed.
"""
from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mipp.data as data
from mipp.data import (
    DATASET_NAMES,
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    dataset_info,
    load_dataset,
    read_idx,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
ENV_VARS = ("MIPP_FASHION_MNIST", "MIPP_MNIST", "MIPP_CIFAR10", "MIPP_CIFAR100", "MIPP_IMAGEFOLDER")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------------------------- IDX

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_set(folder: Path, n_train=20, n_test=10, gz_train=False, gz_test=True, seed=0):
    """Writes the four IDX files; returns the raw arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n, gz, stem in (("train", n_train, gz_train, "train"), ("test", n_test, gz_test, "t10k")):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        write_idx(folder / f"{stem}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 7
    path = write_idx(tmp_path / "a-idx3", arr, gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # writable, native order


@pytest.mark.parametrize("gz_train,gz_test", [(False, False), (True, True), (False, True)])
def test_load_idx_exact(tmp_path, gz_train, gz_test):
    arrays = make_idx_set(tmp_path, gz_train=gz_train, gz_test=gz_test)
    for split in ("train", "test"):
        x, y = arrays[split]
        raw = load_dataset("fashion-mnist", split, root=tmp_path, normalize=False)
        assert isinstance(raw, ArrayDataset)
        assert raw.images.dtype == torch.float32 and raw.images.shape == (len(y), 1, 28, 28)
        assert raw.labels.dtype == torch.int64
        np.testing.assert_array_equal(torch.round(raw.images * 255).to(torch.uint8).numpy()[:, 0], x)
        np.testing.assert_array_equal(raw.labels.numpy(), y)
        ds = load_dataset("fashion-mnist", split, root=tmp_path)
        expected = (x.astype(np.float32) / 255 - 0.2860) / 0.3530
        np.testing.assert_allclose(ds.images.numpy()[:, 0], expected, rtol=1e-5, atol=1e-5)
        img, lab = ds[3]
        assert img.shape == (1, 28, 28) and int(lab) == int(y[3])
        assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10


def test_mnist_uses_its_own_statistics(tmp_path):
    arrays = make_idx_set(tmp_path)
    ds = load_dataset("mnist", "train", root=tmp_path)
    x = arrays["train"][0]
    np.testing.assert_allclose(ds.images.numpy()[:, 0], (x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)


def test_idx_folder_from_env_and_torchvision_layout(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "FashionMNIST" / "raw")
    assert len(load_dataset("fashion-mnist", root=tmp_path)) == 20
    monkeypatch.setenv("MIPP_FASHION_MNIST", str(tmp_path / "FashionMNIST" / "raw"))
    assert len(load_dataset("fashion-mnist", "test")) == 10


def _assert_corrupt(path: Path, folder: Path):
    with pytest.raises(CorruptDataError) as exc:
        load_dataset("fashion-mnist", "train", root=folder)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    make_idx_set(tmp_path, gz_train=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    if gz:
        raw = gzip.decompress(path.read_bytes())[:-100]
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(path.read_bytes()[:-100])
    _assert_corrupt(path, tmp_path)


def test_idx_cut_gzip_stream(tmp_path):
    make_idx_set(tmp_path, gz_train=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    _assert_corrupt(path, tmp_path)


@pytest.mark.parametrize("mutation", ["magic", "dtype", "header", "trailing", "empty"])
def test_idx_bad_header(tmp_path, mutation):
    make_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    raw = {
        "magic": b"\x1f\x00" + raw[2:],
        "dtype": raw[:2] + b"\x42" + raw[3:],
        "header": raw[:9],
        "trailing": raw + b"\x00\x01",
        "empty": b"",
    }[mutation]
    path.write_bytes(raw)
    _assert_corrupt(path, tmp_path)


def test_idx_inconsistent_files(tmp_path):
    make_idx_set(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(19, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="19 labels"):
        load_dataset("fashion-mnist", root=tmp_path)
    write_idx(labels, np.full(20, 10, dtype=np.uint8))
    _assert_corrupt(labels, tmp_path)
    write_idx(labels, np.zeros((20, 1), dtype=np.uint8))
    _assert_corrupt(labels, tmp_path)


def test_idx_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("fashion-mnist", root=missing)
    msg = str(exc.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "MIPP_FASHION_MNIST" in msg
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("mnist", root=missing)
    assert str(missing) in str(exc.value) and "MIPP_MNIST" in str(exc.value)


def test_idx_missing_env_folder_and_split_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPP_FASHION_MNIST", str(tmp_path / "env-folder"))
    with pytest.raises(DataNotFoundError, match="MIPP_FASHION_MNIST") as exc:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "env-folder") in str(exc.value)
    make_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("fashion-mnist", "test", root=tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(exc.value)


def test_idx_info_reads_headers_only(tmp_path):
    make_idx_set(tmp_path, n_train=20, n_test=10)
    info = dataset_info("fashion-mnist", root=tmp_path)
    assert isinstance(info, DatasetInfo)
    assert (info.in_channels, info.input_size, info.num_classes) == (1, 28, 10)
    assert (info.num_train, info.num_test) == (20, 10)
    assert info.input_shape == (1, 28, 28)
    with pytest.raises(Exception):
        info.num_classes = 3  # frozen
    # Without the files the static facts are still known.
    info = dataset_info("mnist", root=tmp_path / "nowhere")
    assert (info.in_channels, info.input_size, info.num_classes, info.num_train) == (1, 28, 10, None)


# --------------------------------------------------------------------------------------------- CIFAR


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> (N, 3072) rows written pixel by pixel as the official format describes:
    1024 red values, then 1024 green, then 1024 blue, each image row-major."""
    n = images.shape[0]
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            for h in range(32):
                rows[i, c * 1024 + h * 32:c * 1024 + h * 32 + 32] = images[i, c, h, :]
    return rows


def make_cifar10(folder: Path, per_batch=3, seed=0, str_keys=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    out = {"train": ([], []), "test": ([], [])}
    for fname, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
        imgs = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        d = {k("batch_label"): k("x"), k("labels"): labels, k("data"): cifar_rows(imgs),
             k("filenames"): [k(f"{i}.png") for i in range(per_batch)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[split][0].append(imgs)
        out[split][1].extend(labels)
    names = [k(n) for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({k("label_names"): names, k("num_cases_per_batch"): per_batch, k("num_vis"): 3072}, f)
    return {s: (np.concatenate(v[0]), np.asarray(v[1])) for s, v in out.items()}


def make_cifar100(folder: Path, n_train=8, n_test=4, seed=1, str_keys=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [f // 5 for f in fine]
        d = {k("data"): cifar_rows(imgs), k("fine_labels"): fine, k("coarse_labels"): coarse}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[split] = (imgs, np.asarray(fine), np.asarray(coarse))
    with open(folder / "meta", "wb") as f:
        pickle.dump({k("fine_label_names"): [k(f"f{i}") for i in range(100)],
                     k("coarse_label_names"): [k(f"c{i}") for i in range(20)]}, f)
    return out


def test_cifar_rows_layout_is_channel_major():
    img = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    img[0, 0, 0, 1] = 11   # red, row 0, column 1
    img[0, 1, 2, 0] = 22   # green, row 2, column 0
    img[0, 2, 31, 31] = 33  # blue, last pixel
    row = cifar_rows(img)[0]
    assert row[1] == 11 and row[1024 + 64] == 22 and row[3071] == 33


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_round_trip(tmp_path, use_parent):
    batches = tmp_path / "cifar-10-batches-py"
    arrays = make_cifar10(batches)
    root = tmp_path if use_parent else batches
    for split, n in (("train", 15), ("test", 3)):
        x, y = arrays[split]
        ds = load_dataset("cifar10", split, root=root, normalize=False)
        assert ds.images.shape == (n, 3, 32, 32)
        np.testing.assert_array_equal(torch.round(ds.images * 255).to(torch.uint8).numpy(), x)
        np.testing.assert_array_equal(ds.labels.numpy(), y)
        assert ds.classes[0] == "plane"
        norm = load_dataset("cifar10", split, root=root)
        mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
        std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
        np.testing.assert_allclose(norm.images.numpy(), (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_cifar10_str_keys_and_env(tmp_path, monkeypatch):
    arrays = make_cifar10(tmp_path / "c10", str_keys=True)
    monkeypatch.setenv("MIPP_CIFAR10", str(tmp_path / "c10"))
    ds = load_dataset("cifar10", "test", normalize=False)
    np.testing.assert_array_equal(ds.labels.numpy(), arrays["test"][1])


def test_cifar100_round_trip(tmp_path):
    arrays = make_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        x, fine, coarse = arrays[split]
        ds = load_dataset("cifar100", split, root=tmp_path, normalize=False)
        np.testing.assert_array_equal(torch.round(ds.images * 255).to(torch.uint8).numpy(), x)
        np.testing.assert_array_equal(ds.labels.numpy(), fine)
        assert len(ds.classes) == 100 and ds.classes[7] == "f7"
        dc = load_dataset("cifar100", split, root=tmp_path, label_mode="coarse")
        np.testing.assert_array_equal(dc.labels.numpy(), coarse)
        assert len(dc.classes) == 20
    info = dataset_info("cifar100", root=tmp_path)
    assert (info.in_channels, info.input_size, info.num_classes) == (3, 32, 100)
    assert dataset_info("cifar100", root=tmp_path, label_mode="coarse").num_classes == 20


def test_cifar_info(tmp_path):
    make_cifar10(tmp_path, per_batch=3)
    info = dataset_info("cifar10", root=tmp_path)
    assert (info.in_channels, info.input_size, info.num_classes) == (3, 32, 10)
    assert (info.num_train, info.num_test) == (15, 3)
    assert info.classes[1] == "car"
    info = dataset_info("cifar10")  # nothing found: static facts only
    assert info.num_classes == 10 and info.num_train is None


def test_cifar_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="MIPP_CIFAR10"):
        load_dataset("cifar10")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("cifar100", root=missing)
    assert str(missing) in str(exc.value) and "MIPP_CIFAR100" in str(exc.value)

    make_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "data_batch_3") in str(exc.value)

    bad = tmp_path / "test_batch"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(CorruptDataError) as exc:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(bad) in str(exc.value)

    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(CorruptDataError, match="3072"):
        load_dataset("cifar10", "test", root=tmp_path)
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]}, f)
    with pytest.raises(CorruptDataError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)

    class Payload:  # what a tampered file could hold: a global that pickle would call while loading
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(bad, "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(CorruptDataError, match="builtins.print is not part of the CIFAR format"):
        load_dataset("cifar10", "test", root=tmp_path)


# --------------------------------------------------------------------------------------- image folder


def make_tree(root: Path):
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 128, 255), "emu": (10, 200, 30)}
    sizes = [(12, 12), (20, 10), (9, 15)]
    for split, per_class in (("train", 3), ("val", 2)):
        for cname, colour in colours.items():
            d = root / split / cname
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", sizes[i], colour).save(d / f"img{i}.png")
    # A grayscale JPEG (converted to RGB on load) and a file that is not an image (ignored).
    Image.new("L", (16, 16), 100).save(root / "train" / "emu" / "gray.JPG")
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    return colours


def test_imagefolder(tmp_path):
    colours = make_tree(tmp_path)
    ds = load_dataset("imagefolder", "train", root=tmp_path, input_size=8)
    assert ds.classes == ("cat", "dog", "emu")
    assert len(ds) == 10 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert int(y) == ds.targets[i]
        path = ds.samples[i][0]
        rgb = (100, 100, 100) if path.endswith("gray.JPG") else colours[ds.classes[int(y)]]
        expected = (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        torch.testing.assert_close(x, expected.expand(3, 8, 8), atol=0.05, rtol=0)
    # "test" falls back to the val folder; classes numbered as in train.
    test = load_dataset("imagefolder", "test", root=tmp_path, input_size=8)
    assert len(test) == 6 and test.classes == ds.classes and test.targets == [0, 0, 1, 1, 2, 2]
    mem = load_dataset("imagefolder", "val", root=tmp_path, input_size=8, in_memory=True)
    assert isinstance(mem, ArrayDataset) and mem.images.shape == (6, 3, 8, 8)
    torch.testing.assert_close(mem.images[2], test[2][0])


def test_imagefolder_centre_crop(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 10), (0, 0, 255))  # blue centre
    img.paste((255, 0, 0), (0, 0, 10, 10))           # red left quarter
    img.paste((0, 255, 0), (30, 0, 40, 10))          # green right quarter
    (tmp_path / "train" / "a").mkdir(parents=True)
    img.save(tmp_path / "train" / "a" / "wide.png")
    x, _ = load_dataset("imagefolder", root=tmp_path, input_size=8, normalize=False)[0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 8, 8))


def test_imagefolder_empty_and_missing(tmp_path):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("imagefolder", root=tmp_path)
    assert str(tmp_path / "train") in str(exc.value)
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("imagefolder", "val", root=tmp_path)
    assert str(tmp_path / "val") in str(exc.value)
    with pytest.raises(DataNotFoundError, match="MIPP_IMAGEFOLDER"):
        load_dataset("imagefolder")


def test_imagefolder_info(tmp_path):
    make_tree(tmp_path)
    info = dataset_info("imagefolder", root=tmp_path, input_size=64)
    assert (info.in_channels, info.input_size, info.num_classes) == (3, 64, 3)
    assert (info.num_train, info.num_test) == (10, 6)
    assert info.classes == ("cat", "dog", "emu")


# --------------------------------------------------------------------------------- digits, synthetic


def test_digits():
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and (len(tr), len(te)) == (1437, 360)
    assert tr.images.shape[1:] == (1, 8, 8) and te.images.shape[1:] == (1, 8, 8)
    assert set(tr.labels.tolist()) == set(range(10))
    # The hard-coded statistics are those of the train split.
    assert abs(tr.images.mean().item()) < 1e-4 and abs(tr.images.std(unbiased=False).item() - 1) < 1e-4
    from sklearn.datasets import load_digits

    raw = load_digits()
    np.testing.assert_allclose(load_dataset("digits", "test", normalize=False).images.numpy()[:, 0],
                               raw.images[1437:] / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(te.labels.numpy(), raw.target[1437:])
    info = dataset_info("digits")
    assert (info.in_channels, info.input_size, info.num_classes, info.num_train, info.num_test) == (1, 8, 10, 1437, 360)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install mipp\[digits\]"):
        load_dataset("digits")


def test_synthetic_deterministic():
    a = load_dataset("synthetic", "train", seed=3)
    b = load_dataset("synthetic", "train", seed=3)
    c = load_dataset("synthetic", "train", seed=4)
    t = load_dataset("synthetic", "test", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert (len(a), len(t)) == (2000, 500)
    assert a.images.shape[1:] == (1, 16, 16) and a.labels.dtype == torch.int64
    assert torch.bincount(a.labels).tolist() == [500] * 4
    assert not torch.equal(a.images[:500], t.images)
    assert abs(a.images.mean().item()) < 0.05 and abs(a.images.std().item() - 1) < 0.05


def test_synthetic_options_and_learnable():
    opts = dict(n=600, in_channels=3, input_size=12, num_classes=6, noise=2.0)
    tr = load_dataset("synthetic", "train", seed=0, **opts)
    te = load_dataset("synthetic", "test", seed=0, **opts)
    assert tr.images.shape == (600, 3, 12, 12) and int(tr.labels.max()) == 5
    # Nearest class mean (no training) already separates the classes: the task is learnable.
    means = torch.stack([tr.images[tr.labels == c].mean(0) for c in range(6)]).flatten(1)
    pred = torch.cdist(te.images.flatten(1), means).argmin(1)
    assert (pred == te.labels).float().mean().item() > 0.9
    info = dataset_info("synthetic", **opts)
    assert (info.in_channels, info.input_size, info.num_classes, info.num_train) == (3, 12, 6, 600)
    assert dataset_info("synthetic").num_train == 2000 and dataset_info("synthetic").num_test == 500


# ------------------------------------------------------------------------------------- limit, registry


def test_limit_deterministic_and_stratified(tmp_path):
    a = load_dataset("digits", limit=100, seed=1)
    b = load_dataset("digits", limit=100, seed=1)
    c = load_dataset("digits", limit=100, seed=2)
    assert len(a) == 100
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert len(load_dataset("digits", "test", limit=10_000)) == 360
    with pytest.raises(ValueError):
        load_dataset("digits", limit=0)
    make_idx_set(tmp_path)
    x = load_dataset("fashion-mnist", root=tmp_path, limit=10, seed=5)
    y = load_dataset("fashion-mnist", root=tmp_path, limit=10, seed=5)
    assert len(x) == 10 and torch.equal(x.images, y.images)
    assert sorted(x.labels.tolist()) == list(range(10))  # 2 of each class -> 1 of each
    s = load_dataset("synthetic", limit=40, seed=9)
    assert len(s) == 40 and torch.bincount(s.labels).tolist() == [10] * 4


def test_subset_indices():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = data.subset_indices(labels, 10, seed=0)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    np.testing.assert_array_equal(idx, data.subset_indices(labels, 10, seed=0))
    np.testing.assert_array_equal(data.subset_indices(labels, None), np.arange(100))


def test_registry():
    assert DATASET_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "digits", "synthetic")
    with pytest.raises(ValueError) as exc:
        load_dataset("imagenet-1k")
    for name in DATASET_NAMES:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        dataset_info("nope")
    with pytest.raises(TypeError, match="input_size"):
        load_dataset("digits", input_size=32)
    assert dataset_info("Fashion_MNIST").name == "fashion-mnist"
    assert dataset_info("synthetic", limit=100, seed=3).num_train == 100
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic", "validation")


def test_dataloader_collates():
    ds = load_dataset("synthetic", n=32)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 1, 16, 16) and y.shape == (8,) and y.dtype == torch.int64


@pytest.mark.skipif(not (REAL_FASHION / "train-labels-idx1-ubyte.gz").exists()
                    and not (REAL_FASHION / "train-labels-idx1-ubyte").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", "train", root=REAL_FASHION)
    assert ds.images.shape == (60_000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert abs(ds.images.mean().item()) < 0.01 and abs(ds.images.std().item() - 1) < 0.01
    info = dataset_info("fashion-mnist", root=REAL_FASHION)
    assert (info.num_train, info.num_test, info.num_classes) == (60_000, 10_000, 10)
