"""A node's local data: its partition of a dataset (simulation) or its own files (devices).

In simulation a node's config carries ``partition-id`` and ``num-partitions``; the
server's task config names the dataset and the partition scheme, and every process
derives the same split from them (:func:`fedistill.data.partition`). The dataset and
the split are computed once per process (Ray actors are long-lived), not per message.

On a real device the node config carries ``data-path`` instead (read by
:func:`fedistill.federated.nodefiles.read_node_data`; the device never needs the full dataset, only its
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
from fedistill.data.base import Split
from fedistill.data.partition import class_histogram, partition
from fedistill.federated.nodefiles import IDX_NAMES, NodeDataError, load_node_file, read_node_data

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
