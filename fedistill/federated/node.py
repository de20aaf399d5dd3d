"""A node's local data: its partition of a dataset (simulation) or its own files (devices).

In simulation a node's config carries ``partition-id`` and ``num-partitions``; the
server's task config names the dataset and the partition scheme, and every process
derives the same split from them (:func:`fedistill.data.partition`). The dataset and
the split are computed once per process (Ray actors are long-lived), not per message.
On a real device the node config carries ``data-path`` instead: a ``.npz`` file with
``images`` (uint8 pixels ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``) and ``labels``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedistill.data import load_dataset
from fedistill.data.base import DatasetInfo, Split
from fedistill.data.partition import partition

__all__ = ["NodeDataError", "node_split", "partition_indices"]


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
    bundle = load_dataset(data["dataset"], root=data.get("root"), val_fraction=float(data.get("val_fraction", 0.1)))
    if "data-path" in node_config:
        return load_node_file(Path(str(node_config["data-path"])), bundle.info)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise NodeDataError(
            "node config has neither 'data-path' nor 'partition-id'/'num-partitions'; "
            'start the node with --node-config "data-path=/path/to/data.npz"'
        )
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < num:
        raise NodeDataError(f"partition-id {pid} is outside 0..{num - 1}")
    idx = partition_indices(data, num)[pid]
    return bundle.train.subset(torch.from_numpy(idx))


def load_node_file(path: Path, info: DatasetInfo) -> Split:
    """Read a device's ``.npz`` data and normalize it with the run's dataset constants."""
    if not path.is_file():
        raise NodeDataError(f"data-path {path} does not exist; point --node-config data-path at a .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise NodeDataError(f"{path}: expected a .npz with arrays 'images' and 'labels' ({err})") from err
    c, (h, w) = info.channels, info.image_size
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == c and images.shape[1] != c:
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise NodeDataError(f"{path}: images have shape {images.shape[1:]}, the run's dataset needs {(c, h, w)}")
    if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) >= info.num_classes:
        raise NodeDataError(f"{path}: need one label in 0..{info.num_classes - 1} per image")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    x = info.normalize(torch.from_numpy(images.astype(np.float32) / scale))
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)), info)
