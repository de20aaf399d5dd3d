"""What a run records before its first round: the config's headline, where the data came from, the split.

:func:`open_run` is shared by fedistill's ServerApp (:func:`strategies.app.serve`) and by
:meth:`strategies.base.Strategy.create` (a strategy used in a user's own ServerApp), so both
start a run directory the same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fedistill.data import DataBundle, load_dataset
from fedistill.federated.node import data_spec, partition_histogram
from fedistill.io import atomic_write_text
from fedistill.reporting import RunDir, save_partition_plot

__all__ = ["data_summary", "open_run", "write_partition"]


def write_partition(cfg: dict[str, Any], run: RunDir, bundle: DataBundle) -> None:
    """Per-client class histograms of the simulated split, as data (``partition.json``) and as ``partition.png``."""
    hist = partition_histogram(data_spec(cfg, bundle.info.name), int(cfg["clients"]), bundle.train)
    record = {"partition": cfg["partition"], "clients": int(cfg["clients"]), "histogram": hist.tolist()}
    atomic_write_text(run.path / "partition.json", json.dumps(record) + "\n")
    save_partition_plot(hist, run.path / "partition.png", class_names=bundle.info.class_names)
    sizes = hist.sum(1)
    run.log("partition", sizes_min=int(sizes.min()), sizes_max=int(sizes.max()), empty=int((sizes == 0).sum()))
    run.update_summary(partition_sizes={"min": int(sizes.min()), "median": float(np.median(sizes))})


def data_summary(cfg: dict[str, Any], node_data: str) -> dict[str, Any]:
    """Where the clients' data came from, as ``summary.json`` records it.

    Parameters
    ----------
    cfg
        Resolved ``simulate`` config.
    node_data
        ``"partition"``: clients hold the config's simulated split (``partition``,
        ``alpha``); ``"own"``: each SuperNode read its own ``data-path``, so the config's
        partition was never used and is not recorded (``partition: {scheme: node-data}``).

    Returns
    -------
    dict
        The ``partition`` (and for a simulated split ``alpha``) fields of the summary.
    """
    if node_data == "own":
        return {"partition": {"scheme": "node-data"}}
    return {"alpha": cfg["alpha"], "partition": cfg["partition"]}


def open_run(cfg: dict[str, Any], run: RunDir, *, node_data: str = "partition") -> DataBundle:
    """Load the server's dataset and write the run's headline fields (status ``running``) and split.

    ``node_data="own"`` (a deployment: nodes hold their own data) skips the plot of the
    simulated partition, which no node uses then, and records none (:func:`data_summary`).
    Returns the server's dataset.
    """
    bundle = load_dataset(
        cfg["dataset"]["name"], root=cfg["data"]["root"], val_fraction=float(cfg["data"]["val_fraction"])
    )
    run.update_summary(
        strategy=cfg["strategy"]["name"],
        method=cfg["method"]["name"],
        policy=cfg["policy"]["name"],
        dataset=bundle.info.name,
        clients=int(cfg["clients"]),
        **data_summary(cfg, node_data),
        rounds=int(cfg["rounds"]),
        ipc=int(cfg["ipc"]),
        seed=int(cfg["seed"]),
        node_data=node_data,
        status="running",
    )
    if node_data == "partition":
        write_partition(cfg, run, bundle)
    return bundle
