"""A device's own data files (a node's ``data-path``): reading, layout and label checks.

Formats (see :mod:`fedistill.federated.node` for the node config): a ``.npz`` or ``.safetensors``
file with ``images`` and ``labels``; a directory of IDX files (``train-images-idx3-ubyte[.gz]`` +
``train-labels-idx1-ubyte[.gz]``) or of CIFAR-10 python batches (``data_batch_*``); or one CIFAR-10
python batch file. Images are ``uint8`` pixels (or floats in ``[0, 1]``) shaped ``[N,H,W]``,
``[N,H,W,C]`` or ``[N,C,H,W]``; labels integers ``[N]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedistill.data.base import DatasetFormatError, DatasetInfo, Split
from fedistill.data.readers import read_cifar_batch, read_idx
from fedistill.io import load_tensors

__all__ = ["IDX_NAMES", "NodeDataError", "load_node_file", "read_node_data"]

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
"""File names of a node's IDX directory (optionally ``.gz``)."""

_FIX = "write it with numpy.savez(path, images=..., labels=...) or fedistill.deploy.nodedata.write_node_data"


class NodeDataError(ValueError):
    """A node cannot produce the data a run needs (missing, wrong shape, bad config)."""


def read_node_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a node's ``data-path`` (formats: module docstring).

    Parameters
    ----------
    path
        A ``.npz`` or ``.safetensors`` file, a directory of IDX files or CIFAR-10
        batches, or one CIFAR-10 batch file.

    Returns
    -------
    images, labels
        The arrays as stored (checked against the run's dataset by :func:`load_node_file`).

    Raises
    ------
    NodeDataError
        When the path is missing or holds none of the supported formats; the message
        names the file, what is wrong and how to fix it.
    """
    path = Path(path)
    if not path.exists():
        raise NodeDataError(
            f"data-path {path} does not exist; point --node-config data-path at a .npz/.safetensors file, "
            "a directory of IDX files or a CIFAR-10 batch"
        )
    try:
        if path.is_dir():
            return _read_dir(path)
        if path.suffix == ".npz":
            return _read_npz(path)
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        return read_cifar_batch(path)
    except DatasetFormatError as err:  # already names the file and the fix
        raise NodeDataError(str(err)) from err
    except (OSError, ValueError) as err:
        raise NodeDataError(f"{path}: cannot read node data ({type(err).__name__}: {err}); {_FIX}") from err


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetFormatError(f"{path}: a single .npy array, not an .npz archive; {_FIX}")
        with archive as f:
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                raise DatasetFormatError(f"{path}: no array {missing[0]!r} (the archive holds {f.files}); {_FIX}")
            images, labels = f["images"], f["labels"]
    except DatasetFormatError:
        raise
    except Exception as err:  # zipfile, zlib, lzma and numpy raise many types for a damaged archive
        raise DatasetFormatError(
            f"{path}: not a readable .npz archive ({type(err).__name__}: {err}); the file is truncated or corrupt, "
            f"{_FIX}"
        ) from err
    for name, arr in (("images", images), ("labels", labels)):
        if not isinstance(arr, np.ndarray):  # a member that is not a .npy array comes back as raw bytes
            raise DatasetFormatError(f"{path}: member {name!r} is not a numpy array; {_FIX}")
    return images, labels


def _read_safetensors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    tensors = load_tensors(path)  # a ValueError naming the file when unreadable
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        raise DatasetFormatError(f"{path}: no tensor {missing[0]!r} (the file holds {sorted(tensors)}); {_FIX}")
    out = []
    for t in (tensors["images"], tensors["labels"]):
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # bfloat16 / float8 have no numpy dtype
        out.append(t.numpy())
    return out[0], out[1]


def _read_dir(path: Path) -> tuple[np.ndarray, np.ndarray]:
    found = [next((c for c in (path / n, path / f"{n}.gz") if c.is_file()), None) for n in IDX_NAMES]
    if found[0] is not None and found[1] is not None:
        return read_idx(found[0]), read_idx(found[1])
    batches = sorted(p for p in path.glob("data_batch_*") if p.is_file())
    if batches:
        parts = [read_cifar_batch(b) for b in batches]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    raise DatasetFormatError(
        f"{path}: directory has neither {IDX_NAMES[0]}[.gz] + {IDX_NAMES[1]}[.gz] nor data_batch_* files; "
        "put the node's IDX or CIFAR-10 batch files there, or point data-path at a .npz file"
    )


def load_node_file(path: Path, info: DatasetInfo) -> Split:
    """Read a device's data (:func:`read_node_data`) and normalize it with the run's dataset constants.

    Parameters
    ----------
    path
        The node's ``data-path``.
    info
        The run's dataset: image shape, number of classes, normalization.

    Raises
    ------
    NodeDataError
        When the data is unreadable or does not fit the run's dataset (shape, pixel
        dtype or range, non-finite pixels, labels out of range or not one per image).
    """
    images, labels = read_node_data(path)
    images = _image_layout(path, images, info)
    labels = _check_labels(path, labels, len(images), info.num_classes)
    pixels = _pixels01(path, images)
    x = info.normalize(torch.from_numpy(pixels))
    return Split(x.contiguous(), torch.from_numpy(labels), info)


def _image_layout(path: Path, images: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """``images`` as ``[N, C, H, W]`` for the run's dataset (from ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``)."""
    c, (h, w) = info.channels, info.image_size
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == c and images.shape[1] != c:
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise NodeDataError(
            f"{path}: images have shape {images.shape[1:]}, the run's dataset {info.name!r} needs {(c, h, w)} "
            "(or [N,H,W] / [N,H,W,C]); write the node's own images of that dataset"
        )
    if len(images) == 0:
        raise NodeDataError(f"{path}: holds no images; a node needs at least one labelled image")
    return images


def _check_labels(path: Path, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """``labels`` as ``int64 [n]`` after checking dtype, shape and range."""
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise NodeDataError(
            f"{path}: labels must be integers of shape [N], got {labels.dtype} {labels.shape}; "
            "save them as labels.astype(numpy.int64)"
        )
    if len(labels) != n:
        raise NodeDataError(f"{path}: {len(labels)} labels for {n} images; need one label per image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise NodeDataError(
            f"{path}: labels span {labels.min()}..{labels.max()}, need one label in 0..{num_classes - 1} per image"
        )
    return labels.astype(np.int64)


def _pixels01(path: Path, images: np.ndarray) -> np.ndarray:
    """Pixels as float32 in ``[0, 1]``: integers in ``0..255`` are divided by 255, floats must lie in ``[0, 1]``."""
    kind = images.dtype.kind
    if kind in "iu":
        if images.min() < 0 or images.max() > 255:
            raise NodeDataError(
                f"{path}: integer pixels span {images.min()}..{images.max()}, need 0..255; save them as uint8"
            )
        return np.ascontiguousarray(images, dtype=np.float32) / 255.0
    if kind == "f":
        x = np.ascontiguousarray(images, dtype=np.float32)
        if not np.isfinite(x).all():
            raise NodeDataError(f"{path}: images hold NaN or infinite pixels; replace them or drop those images")
        if x.min() < 0 or x.max() > 1:
            raise NodeDataError(
                f"{path}: float pixels span {x.min():g}..{x.max():g}, need [0, 1] "
                "(unnormalized: divide 0..255 pixels by 255, or save them as uint8)"
            )
        return x
    raise NodeDataError(f"{path}: images have dtype {images.dtype}; save pixels as uint8 (0..255) or floats in [0, 1]")
