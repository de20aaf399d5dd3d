"""Dataset registry and loaders.

``load_dataset(name, root=...)`` returns a :class:`~fedistill.data.base.DataBundle`
with normalized tensors and a validation split carved from the training set.

Registered datasets
-------------------
digits
    scikit-learn's 8x8 handwritten digits (ships with scikit-learn; the default).
mnist, fashion_mnist
    Standard IDX files (raw or ``.gz``), flat or in torchvision's ``<Name>/raw/``.
cifar10
    The python-pickle batches of ``cifar-10-python.tar.gz``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedistill.data.base import DataBundle, DatasetInfo, DatasetNotFoundError, Split
from fedistill.data.readers import read_cifar_batch, read_idx
from fedistill.registry import Registry
from fedistill.seeding import numpy_rng

__all__ = ["DATASETS", "dataset_info", "load_dataset", "register_dataset", "search_roots"]

RawLoader = Callable[[Sequence[Path]], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
"""Returns ``(x_train, y_train, x_test, y_test)``; images uint8/float in ``[0, 255]`` or ``[0, 1]``."""

DATASETS: Registry[tuple[DatasetInfo, RawLoader, tuple[str, ...]]] = Registry("dataset")


def register_dataset(info: DatasetInfo, *, default_dirs: Sequence[str] = ()) -> Callable[[RawLoader], RawLoader]:
    """Register a raw loader for ``info.name``.

    Parameters
    ----------
    info
        Static description (classes, shape, normalization).
    default_dirs
        Extra directories searched after ``root`` (e.g. a system package's path).
    """

    def deco(fn: RawLoader) -> RawLoader:
        DATASETS.register(info.name)((info, fn, tuple(default_dirs)))
        return fn

    return deco


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset (no file access)."""
    return DATASETS.get(name)[0]


def search_roots(name: str, root: str | Path | None = None) -> list[Path]:
    """Directories searched for ``name``: ``root``, ``$FEDISTILL_DATA``, ``./data``, then defaults."""
    roots = [Path(root)] if root else []
    if os.environ.get("FEDISTILL_DATA"):
        roots.append(Path(os.environ["FEDISTILL_DATA"]))
    roots.append(Path("data"))
    roots += [Path(d) for d in DATASETS.get(name)[2]]
    return [r.expanduser() for r in roots]


def _stratified_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (train, val), taking ``fraction`` of every class for val."""
    rng = numpy_rng(seed, "val-split")
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = round(len(idx) * fraction)
        val.append(rng.permutation(idx)[:n])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def _to_tensor(x: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    if x.dtype == np.uint8:
        t = t / 255.0
    if t.ndim == 3:
        t = t.unsqueeze(1)
    return info.normalize(t).contiguous()


@lru_cache(maxsize=8)
def load_dataset(name: str, *, root: str | None = None, val_fraction: float = 0.1, val_seed: int = 0) -> DataBundle:
    """Load a registered dataset into memory.

    Parameters
    ----------
    name
        Registry name (see :data:`DATASETS`).
    root
        Directory with the dataset's files (searched first).
    val_fraction
        Fraction of every training class held out as the validation split.
    val_seed
        Seed of the validation carve-out (fixed by default so every run and every
        process sees the same train/val split).

    Returns
    -------
    DataBundle
        Cached per process; treat the tensors as read-only.

    Raises
    ------
    UnknownNameError
        For an unregistered name (the message lists the valid ones).
    DatasetNotFoundError
        When the files are missing (the message lists where we looked and how to get them).
    """
    info, loader, _ = DATASETS.get(name)
    xtr, ytr, xte, yte = loader(search_roots(name, root))
    tr_idx, val_idx = _stratified_val(ytr, val_fraction, val_seed)
    xtr_t, xte_t = _to_tensor(xtr, info), _to_tensor(xte, info)
    ytr_t, yte_t = torch.as_tensor(ytr, dtype=torch.int64), torch.as_tensor(yte, dtype=torch.int64)
    tr, va = torch.as_tensor(tr_idx), torch.as_tensor(val_idx)
    return DataBundle(
        info=info,
        train=Split(xtr_t[tr], ytr_t[tr], info),
        val=Split(xtr_t[va], ytr_t[va], info),
        test=Split(xte_t, yte_t, info),
    )


# --------------------------------------------------------------------------- digits
DIGITS = DatasetInfo("digits", 10, 1, (8, 8), (0.3053,), (0.3760,), tuple(str(i) for i in range(10)), flip=False)


@register_dataset(DIGITS)
def _load_digits(roots: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits with a fixed stratified 80/20 train/test split.

    Read from scikit-learn's own ``digits.csv.gz`` (what ``load_digits`` parses) without
    importing scikit-learn, which costs every client process ~1.3 s; ``load_digits`` only
    where the file is not where scikit-learn keeps it.
    """
    table = _digits_table()
    x = (table[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    train, test = _stratified_val(y, 0.2, 20240101)
    return x[train], y[train], x[test], y[test]


def _digits_table() -> np.ndarray:
    """The 1,797 digits as rows of 64 pixel values (0-16) and the label."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    bases = list(spec.submodule_search_locations or []) if spec is not None else []
    for base in bases:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.concatenate([d.data, d.target[:, None]], axis=1)


# ---------------------------------------------------------------------- IDX family
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx_dir(roots: Sequence[Path], subdirs: Sequence[str]) -> tuple[Path, dict[str, Path]] | None:
    for root in roots:
        for sub in subdirs:
            d = root / sub
            found = {}
            for key, stem in _IDX_FILES.items():
                for cand in (d / stem, d / f"{stem}.gz"):
                    if cand.is_file():
                        found[key] = cand
                        break
            if len(found) == len(_IDX_FILES):
                return d, found
    return None


def _idx_loader(name: str, torchvision_name: str, aliases: Sequence[str], how_to_get: str) -> RawLoader:
    subdirs = ["", f"{torchvision_name}/raw", torchvision_name, *aliases, *(f"{a}/raw" for a in aliases)]

    def load(roots: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        hit = _find_idx_dir(roots, subdirs)
        if hit is None:
            looked = ", ".join(str(r / s) if s else str(r) for r in roots for s in subdirs[:2])
            raise DatasetNotFoundError(
                f"dataset {name!r} not found: looked for {_IDX_FILES['train_x']}[.gz] and the other three IDX "
                f"files in {looked} (and aliases {list(aliases)}). {how_to_get} "
                "Then pass data.root=DIR (or set FEDISTILL_DATA)."
            )
        _, f = hit
        return (
            read_idx(f["train_x"]),
            read_idx(f["train_y"]).astype(np.int64),
            read_idx(f["test_x"]),
            read_idx(f["test_y"]).astype(np.int64),
        )

    return load


MNIST = DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), tuple(str(i) for i in range(10)), flip=False)
FASHION_MNIST = DatasetInfo(
    "fashion_mnist",
    10,
    1,
    (28, 28),
    (0.2860,),
    (0.3530,),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    flip=True,
)
register_dataset(MNIST)(
    _idx_loader(
        "mnist", "MNIST", ["mnist"], "Download the four MNIST IDX files (e.g. with torchvision) into a directory."
    )
)
register_dataset(FASHION_MNIST, default_dirs=["/usr/share/datasets/fashion-mnist"])(
    _idx_loader(
        "fashion_mnist",
        "FashionMNIST",
        ["fashion-mnist", "fashion_mnist"],
        "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist).",
    )
)

# ------------------------------------------------------------------------ CIFAR-10
CIFAR10 = DatasetInfo(
    "cifar10",
    10,
    3,
    (32, 32),
    (0.4914, 0.4822, 0.4465),
    (0.2023, 0.1994, 0.2010),
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    flip=True,
)


@register_dataset(CIFAR10)
def _load_cifar10(roots: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for root in roots:
        for d in (root / "cifar-10-batches-py", root):
            if all((d / n).is_file() for n in [*names, "test_batch"]):
                parts = [read_cifar_batch(d / n) for n in names]
                xte, yte = read_cifar_batch(d / "test_batch")
                return (
                    np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]),
                    xte,
                    yte,
                )
    looked = ", ".join(str(r / "cifar-10-batches-py") for r in roots)
    raise DatasetNotFoundError(
        f"dataset 'cifar10' not found: looked for data_batch_1..5 and test_batch in {looked}. "
        "Download and extract cifar-10-python.tar.gz there, then pass data.root=DIR (or set FEDISTILL_DATA)."
    )
