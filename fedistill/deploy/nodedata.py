"""Write partitions of a dataset as SuperNode ``data-path`` s (to try a deployment on one machine).

The partition is the one ``fedistill simulate`` would give the same config
(:func:`fedistill.federated.node.partition_indices` of the same data spec), so a
deployment over loopback and a simulation see the same client data. Every format
written here is one :func:`fedistill.federated.node.read_node_data` reads.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedistill.data import load_dataset
from fedistill.data.base import Split
from fedistill.data.readers import write_idx
from fedistill.federated.node import IDX_NAMES, data_spec, partition_indices
from fedistill.io import atomic_save_tensors

__all__ = ["FORMATS", "to_pixels", "write_node_data", "write_partitions"]

FORMATS = ("npz", "safetensors", "idx", "cifar")
"""``npz``/``safetensors``: one file; ``idx``: a directory of two IDX files; ``cifar``: one python batch."""


def to_pixels(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """``uint8`` pixels ``[N, C, H, W]`` (de-normalized) and ``int64`` labels of a split."""
    x = split.info.denormalize(split.images).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.numpy(), split.labels.numpy().astype(np.int64)


def write_node_data(out: str | Path, images: np.ndarray, labels: np.ndarray, *, fmt: str = "npz") -> Path:
    """Write ``uint8`` images ``[N, C, H, W]`` and labels as one node's ``data-path``.

    Parameters
    ----------
    out
        Path without suffix; the suffix (``.npz``, ``.safetensors``, none for ``idx``
        directories and CIFAR batches) is added.
    fmt
        One of :data:`FORMATS`. ``idx`` needs one channel; ``cifar`` needs ``3x32x32``.

    Returns
    -------
    Path
        The ``data-path`` to give the SuperNode.
    """
    out = Path(out)
    if fmt == "npz":
        path = out.with_name(out.name + ".npz")
        np.savez(path, images=images, labels=labels)
    elif fmt == "safetensors":
        path = out.with_name(out.name + ".safetensors")
        atomic_save_tensors(path, {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    elif fmt == "idx":
        if images.shape[1] != 1:
            raise ValueError(f"IDX node data holds one channel; these images have {images.shape[1]}")
        path = out
        path.mkdir(parents=True, exist_ok=True)
        write_idx(path / f"{IDX_NAMES[0]}.gz", images[:, 0])
        write_idx(path / f"{IDX_NAMES[1]}.gz", labels.astype(np.uint8))
    elif fmt == "cifar":
        if images.shape[1:] != (3, 32, 32):
            raise ValueError(f"a CIFAR batch holds 3x32x32 images, not {images.shape[1:]}")
        path = out
        batch = {b"data": images.reshape(len(images), -1), b"labels": labels.tolist()}
        path.write_bytes(pickle.dumps(batch, protocol=4))
    else:
        raise ValueError(f"unknown node data format {fmt!r}; choose one of {list(FORMATS)}")
    return path


def write_partitions(
    out_dir: str | Path, cfg: dict[str, Any], *, fmt: str = "npz", nodes: Sequence[int] | None = None
) -> list[Path]:
    """Write every partition (or those in ``nodes``) of a resolved ``simulate`` config.

    Parameters
    ----------
    out_dir
        Directory of the node data (``node-<i>.npz``, ``node-<i>/`` ...).
    cfg
        Resolved ``simulate`` config: ``dataset``, ``clients`` (number of partitions),
        ``partition``, ``seed``, ``data``.
    fmt
        See :func:`write_node_data`.
    nodes
        Partition ids to write (default: all).

    Returns
    -------
    list of Path
        One ``data-path`` per written partition, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = cfg["data"]
    bundle = load_dataset(cfg["dataset"]["name"], root=data["root"], val_fraction=float(data["val_fraction"]))
    num = int(cfg["clients"])
    parts = partition_indices(data_spec(cfg, bundle.info.name), num)
    ids = list(range(num)) if nodes is None else list(nodes)
    for i in ids:
        if not 0 <= i < num:
            raise ValueError(f"node {i} is outside 0..{num - 1} (clients={num})")
    return [
        write_node_data(out / f"node-{i}", *to_pixels(bundle.train.subset(torch.from_numpy(parts[i]))), fmt=fmt)
        for i in ids
    ]
