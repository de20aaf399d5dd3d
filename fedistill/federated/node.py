"""A node's local data: its partition of a dataset (simulation) or its own files (devices).

In simulation a node's config carries ``partition-id`` and ``num-partitions``; the
server's task config names the dataset and the partition scheme, and every process
derives the same split from them (:func:`fedistill.data.partition`). The dataset and
the split are computed once per process (Ray actors are long-lived), not per message.

On a real device the node config carries ``data-path`` instead (read by
:func:`read_node_data`; the device never needs the full dataset, only its
description), and may bound the client's footprint (:func:`node_task`):

``data-path``
    A ``.npz`` or ``.safetensors`` file with ``images`` and ``labels``; a directory of
    IDX files (``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``, the
    MNIST layout) or of CIFAR-10 python batches (``data_batch_*``); or one CIFAR-10
    python batch file. Images are ``uint8`` pixels (or floats in ``[0, 1]``) shaped
    ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``; labels integers ``[N]``.
``threads``
    torch threads of the client (default: what the server's task asks, 1).
``device``
    ``cpu`` (default on a node with a ``data-path``: edge devices run CPU-only) or ``cuda``.
``max-memory-mb``
    Cap on the client process's data segment (``RLIMIT_DATA``): an allocation past it
    fails and the node answers with an error reply instead of exhausting the device.

A task on ``cuda`` that carries ``gpu_fraction`` also caps the process's CUDA memory at
that fraction of the GPU (:func:`apply_gpu_memory_cap`).
"""

from __future__ import annotations

import json
import resource
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedistill.data import dataset_info, load_dataset
from fedistill.data.base import DatasetFormatError, DatasetInfo, Split
from fedistill.data.partition import class_histogram, partition
from fedistill.data.readers import read_cifar_batch, read_idx
from fedistill.io import load_tensors

__all__ = [
    "IDX_NAMES",
    "NodeDataError",
    "apply_gpu_memory_cap",
    "data_spec",
    "footprint",
    "gpu_memory_cap",
    "node_split",
    "node_task",
    "partition_histogram",
    "partition_indices",
    "read_node_data",
    "release_gpu_cache",
]

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
"""File names of a node's IDX directory (optionally ``.gz``)."""

_FIX = "write it with numpy.savez(path, images=..., labels=...) or fedistill.deploy.nodedata.write_node_data"


class NodeDataError(ValueError):
    """A node cannot produce the data a run needs (missing, wrong shape, bad config)."""


@lru_cache(maxsize=8)
def _partitions(
    dataset: str, root: str | None, val_fraction: float, num: int, spec: str, seed: int
) -> list[np.ndarray]:
    bundle = load_dataset(dataset, root=root, val_fraction=val_fraction)
    params = json.loads(spec)
    scheme = params.pop("scheme")
    return partition(bundle.train.labels.numpy(), num, scheme, seed=seed, **params)


def data_spec(cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What a node needs to derive its partition: dataset, root, validation split, scheme, seed.

    ``cfg`` is a composed ``simulate`` config (``data``, ``partition``, ``seed``).
    """
    data = cfg["data"]
    return {
        "dataset": dataset,
        "root": data["root"],
        "val_fraction": float(data["val_fraction"]),
        "partition": dict(cfg["partition"]),
        "seed": int(cfg["seed"]),
    }


def partition_indices(data: Mapping[str, Any], num_partitions: int) -> list[np.ndarray]:
    """Training-split positions of every partition for the task's data spec.

    Parameters
    ----------
    data
        ``{"dataset", "root", "val_fraction", "partition": {"scheme", ...params}, "seed"}``
        (:func:`data_spec`; the server sends it in every task).
    num_partitions
        Number of partitions (clients).
    """
    spec = json.dumps(dict(data["partition"]), sort_keys=True)
    return _partitions(
        data["dataset"],
        data["root"],
        float(data["val_fraction"]),
        int(num_partitions),
        spec,
        int(data["seed"]),
    )


def partition_histogram(data: Mapping[str, Any], num_partitions: int, train: Split) -> np.ndarray:
    """``[partitions, classes]`` records per partition and class of :func:`partition_indices`' split of ``train``."""
    return class_histogram(train.labels.numpy(), partition_indices(data, num_partitions), train.info.num_classes)


def node_split(node_config: Mapping[str, Any], data: Mapping[str, Any]) -> Split:
    """This node's training data.

    Parameters
    ----------
    node_config
        Flower node config: ``partition-id`` + ``num-partitions`` (simulation) or
        ``data-path`` (a device's own data).
    data
        The task's data spec (see :func:`partition_indices`).

    Raises
    ------
    NodeDataError
        When the node config has neither, the partition id is out of range, or the
        node's files do not match the run's dataset.
    """
    if "data-path" in node_config:
        return load_node_file(Path(str(node_config["data-path"])), dataset_info(data["dataset"]))
    bundle = load_dataset(data["dataset"], root=data["root"], val_fraction=float(data["val_fraction"]))
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise NodeDataError(
            "node config has neither 'data-path' nor 'partition-id'/'num-partitions'; "
            "start the node with --node-config 'data-path=\"/path/to/data.npz\"'"
        )
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < num:
        raise NodeDataError(f"partition-id {pid} is outside 0..{num - 1}")
    idx = partition_indices(data, num)[pid]
    return bundle.train.subset(torch.from_numpy(idx))


def node_task(node_config: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """The server's task with this node's own limits applied (see the module docstring).

    ``threads`` and ``device`` of the node config override the task's; a node with a
    ``data-path`` runs on the CPU unless its config says ``device=cuda``. A
    ``max-memory-mb`` caps the process's data segment from here on.
    """
    out = dict(task)
    if "threads" in node_config:
        out["threads"] = max(1, int(node_config["threads"]))
    if "device" in node_config:
        out["device"] = str(node_config["device"])
    elif "data-path" in node_config:
        out["device"] = "cpu"
    if "max-memory-mb" in node_config:
        limit = int(float(node_config["max-memory-mb"]) * 2**20)
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    apply_gpu_memory_cap(out)
    return out


_GPU_CAPS: dict[int, float] = {}  # CUDA device index -> the fraction this process is capped at


def gpu_memory_cap(task: Mapping[str, Any]) -> tuple[int | None, float] | None:
    """The CUDA memory cap a task asks of its process: ``(device index, fraction)``, or ``None``.

    A task on ``cuda`` (``cuda:N``) that carries ``gpu_fraction`` (its share of the GPU,
    e.g. a simulation's ``client.num_gpus``) caps this process's caching allocator at that
    fraction of the device's memory: Ray's fractional GPUs limit scheduling, not memory.
    A fraction of 1 or more (a whole GPU) needs no cap. Pure: looks at no device.
    """
    device = str(task["device"])
    if not device.startswith("cuda") or task.get("gpu_fraction") is None:
        return None
    fraction = float(task["gpu_fraction"])
    if not fraction > 0:
        raise ValueError(f"gpu_fraction must be > 0, got {fraction}")
    if fraction >= 1:
        return None
    _, _, index = device.partition(":")
    return (int(index) if index else None), fraction


def apply_gpu_memory_cap(task: Mapping[str, Any]) -> tuple[int | None, float] | None:
    """Apply :func:`gpu_memory_cap` to this process (once per device and fraction); returns what was applied.

    A no-op (``None``) where CUDA is not available.
    """
    cap = gpu_memory_cap(task)
    if cap is None or not torch.cuda.is_available():
        return None
    index, fraction = cap
    key = torch.cuda.current_device() if index is None else index
    if _GPU_CAPS.get(key) != fraction:
        torch.cuda.set_per_process_memory_fraction(fraction, key)
        _GPU_CAPS[key] = fraction
    return key, fraction


def release_gpu_cache() -> bool:
    """Return this process's cached CUDA blocks to the device (after a handler); whether it did.

    Never initializes CUDA: a process that has not used it (every CPU client) does nothing.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        return True
    return False


def footprint() -> dict[str, float]:
    """This process's footprint so far: peak resident memory (MiB) and CPU seconds (user + system).

    CPU seconds do not grow when other processes compete for the cores, unlike wall time.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3)}


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
