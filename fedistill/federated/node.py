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
from fedistill.data.partition import partition
from fedistill.data.readers import read_cifar_batch, read_idx
from fedistill.io import load_tensors

__all__ = [
    "IDX_NAMES",
    "NodeDataError",
    "data_spec",
    "footprint",
    "node_split",
    "node_task",
    "partition_indices",
    "read_node_data",
]

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
"""File names of a node's IDX directory (optionally ``.gz``)."""


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
    """What a node needs to derive its partition: dataset, root, validation split, scheme, seed."""
    data = cfg.get("data", {})
    return {
        "dataset": dataset,
        "root": data.get("root"),
        "val_fraction": float(data.get("val_fraction", 0.1)),
        "partition": dict(cfg["partition"]),
        "seed": int(cfg["seed"]),
    }


def partition_indices(data: Mapping[str, Any], num_partitions: int) -> list[np.ndarray]:
    """Training-split positions of every partition for the task's data spec.

    Parameters
    ----------
    data
        ``{"dataset", "root", "val_fraction", "partition": {"scheme", ...params}, "seed"}``.
    num_partitions
        Number of partitions (clients).
    """
    spec = json.dumps(dict(data["partition"]), sort_keys=True)
    return _partitions(
        data["dataset"],
        data.get("root"),
        float(data.get("val_fraction", 0.1)),
        int(num_partitions),
        spec,
        int(data["seed"]),
    )


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
    bundle = load_dataset(data["dataset"], root=data.get("root"), val_fraction=float(data.get("val_fraction", 0.1)))
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
    return out


def footprint() -> dict[str, float]:
    """This process's footprint so far: peak resident memory (MiB) and CPU seconds (user + system).

    CPU seconds do not grow when other processes compete for the cores, unlike wall time.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3)}


def read_node_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a node's ``data-path`` (formats: module docstring).

    Raises
    ------
    NodeDataError
        When the path is missing or holds none of the supported formats.
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
            with np.load(path, allow_pickle=False) as f:
                return f["images"], f["labels"]
        if path.suffix == ".safetensors":
            t = load_tensors(path)
            return t["images"].numpy(), t["labels"].numpy()
        return read_cifar_batch(path)
    except (OSError, ValueError, KeyError) as err:  # DatasetFormatError is a ValueError
        raise NodeDataError(f"{path}: expected arrays 'images' and 'labels' ({err})") from err


def _read_dir(path: Path) -> tuple[np.ndarray, np.ndarray]:
    found = [next((c for c in (path / n, path / f"{n}.gz") if c.is_file()), None) for n in IDX_NAMES]
    if found[0] is not None and found[1] is not None:
        return read_idx(found[0]), read_idx(found[1])
    batches = sorted(path.glob("data_batch_*"))
    if batches:
        parts = [read_cifar_batch(b) for b in batches]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    raise DatasetFormatError(f"directory has neither {IDX_NAMES[0]}[.gz] + {IDX_NAMES[1]}[.gz] nor data_batch_* files")


def load_node_file(path: Path, info: DatasetInfo) -> Split:
    """Read a device's data (:func:`read_node_data`) and normalize it with the run's dataset constants."""
    images, labels = read_node_data(path)
    c, (h, w) = info.channels, info.image_size
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == c and images.shape[1] != c:
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise NodeDataError(
            f"{path}: images have shape {images.shape[1:]}, the run's dataset {info.name!r} needs {(c, h, w)}"
        )
    if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) >= info.num_classes:
        raise NodeDataError(f"{path}: need one label in 0..{info.num_classes - 1} per image")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    x = info.normalize(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / scale))
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)), info)
