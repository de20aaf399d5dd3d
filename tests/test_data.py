"""Dataset readers and the registry, tested on files generated in the real formats."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedistill.data import DatasetFormatError, DatasetNotFoundError, load_dataset
from fedistill.data.readers import read_cifar_batch, read_idx, write_idx
from fedistill.registry import UnknownNameError


def _fake_idx_dir(d, n_train=60, n_test=20, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, arr in arrays.items():
        write_idx(d / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, suffix):
    arr = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / f"x{suffix}", arr)
    assert np.array_equal(read_idx(tmp_path / f"x{suffix}"), arr)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DatasetFormatError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "t", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        read_idx(tmp_path / "t")


@pytest.mark.parametrize(("layout", "gz"), [("", False), ("MNIST/raw", True)])
def test_mnist_loader_flat_and_torchvision_layout(tmp_path, layout, gz):
    arrays = _fake_idx_dir(tmp_path / layout, gz=gz)
    b = load_dataset("mnist", root=str(tmp_path), val_fraction=0.1)
    assert b.train.images.shape == (50, 1, 28, 28) and len(b.val) == 10 and len(b.test) == 20
    assert b.train.images.dtype == torch.float32 and b.train.labels.dtype == torch.int64
    # every class (6 samples each) gives round(10%) = 1 sample to validation: stratified
    assert torch.bincount(b.val.labels, minlength=10).tolist() == [1] * 10
    # normalization: test image 0 maps back to its raw pixels
    raw = torch.as_tensor(arrays["t10k-images-idx3-ubyte"][0], dtype=torch.float32) / 255
    assert torch.allclose(b.info.denormalize(b.test.images[:1])[0, 0], raw, atol=1e-5)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("mnist", root=str(tmp_path / "nowhere"))
    msg = str(exc.value)
    assert str(tmp_path / "nowhere") in msg and "data.root" in msg and "train-images-idx3-ubyte" in msg


def test_fashion_mnist_missing_mentions_debian_package(tmp_path, monkeypatch):
    from fedistill.data import datasets

    _, loader, _ = datasets.DATASETS.get("fashion_mnist")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        loader([tmp_path])


def _write_cifar(d, n_per_batch=10, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": list(range(n_per_batch)),
            b"batch_label": name.encode(),
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_reader_and_loader(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    x, y = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == list(range(10))
    b = load_dataset("cifar10", root=str(tmp_path))
    assert len(b.train) + len(b.val) == 50 and b.test.images.shape == (10, 3, 32, 32)


def test_cifar_reader_refuses_foreign_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="refusing to load"):
        read_cifar_batch(tmp_path / "data_batch_1")
    (tmp_path / "garbage").write_bytes(gzip.compress(b"not a pickle"))
    with pytest.raises(DatasetFormatError, match="not a CIFAR-10 python batch"):
        read_cifar_batch(tmp_path / "garbage")


def test_digits_is_fixed_and_normalized(digits):
    again = load_dataset("digits", val_fraction=0.1)
    assert torch.equal(digits.test.images, again.test.images)
    assert digits.info.shape == (1, 8, 8) and digits.info.flip is False
    assert abs(float(digits.train.images.mean())) < 0.05 and abs(float(digits.train.images.std()) - 1) < 0.05
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    # the validation split is carved from training data, stratified
    assert set(digits.val.labels.tolist()) == set(range(10))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError, match=r"digits.*fashion_mnist"):
        load_dataset("imagenet")


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    """The fast path reads scikit-learn's own file: the same images and labels as ``load_digits``."""
    from sklearn.datasets import load_digits

    from fedistill.data.datasets import _digits_table

    table, ref = _digits_table(), load_digits()
    assert np.array_equal(table[:, :-1].reshape(-1, 8, 8), ref.images)
    assert np.array_equal(table[:, -1].astype(np.int64), ref.target)


def test_a_client_process_starts_without_opacus_or_scikit_learn():
    """Every Ray actor imports the ClientApp and loads its data: Opacus (~2 s) and scikit-learn
    (~1.3 s) stay out of a process that runs no DP accounting or audit."""
    code = (
        "import sys, clients.simulation; from fedistill.data import load_dataset; load_dataset('digits'); "
        "print(sorted(m for m in ('opacus', 'sklearn') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]", out.stdout
