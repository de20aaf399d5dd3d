"""Federated building blocks without Flower: node data, client tasks, server-side aggregation.

The Flower layer (``clients/``, ``strategies/``) only moves records between these
functions; everything here is plain torch/numpy and testable without Flower.
"""

from fedistill.federated.client import distill_task, evaluate_task, fit_task, stats_task
from fedistill.federated.node import NodeDataError, node_split, partition_indices
from fedistill.federated.server import (
    ClientFailure,
    FederationError,
    GlobalModel,
    decode_synthetic,
    encode_synthetic,
    merge_sets,
    weighted_average,
)

__all__ = [
    "ClientFailure",
    "FederationError",
    "GlobalModel",
    "NodeDataError",
    "decode_synthetic",
    "distill_task",
    "encode_synthetic",
    "evaluate_task",
    "fit_task",
    "merge_sets",
    "node_split",
    "partition_indices",
    "stats_task",
    "weighted_average",
]
