"""Flower's robust aggregators for the FedAvg baseline (``strategy.aggregator``).

``median`` (coordinate-wise, Flower's ``FedMedian``), ``trimmed_mean`` (``FedTrimmedAvg``,
``strategy.trim_beta`` cut from each end) and ``krum`` (``Krum``, assuming
``strategy.krum_malicious`` hostile clients) replace the weighted mean; ``mean`` is
fedistill's own weighted average. They defend the model-averaging baseline against the
hostile clients of ``attack.*`` so that distillation strategies can be compared with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fedistill.registry import Registry
from protocol.records import as_flower_train_replies, read_tensors
from strategies.base import Reply

__all__ = ["AGGREGATORS", "robust_aggregate"]

AGGREGATORS: Registry[Callable[[dict[str, Any]], Any]] = Registry("aggregator")
AGGREGATORS.register("median")(lambda opts: FedMedian(weighted_by_key="weight"))
AGGREGATORS.register("trimmed_mean")(
    lambda opts: FedTrimmedAvg(weighted_by_key="weight", beta=float(opts["trim_beta"]))
)
AGGREGATORS.register("krum")(
    lambda opts: Krum(weighted_by_key="weight", num_malicious_nodes=int(opts["krum_malicious"]))
)


def robust_aggregate(
    name: str, opts: dict[str, Any], round_: int, accepted: list[Reply], weights: list[float]
) -> dict[str, torch.Tensor] | None:
    """The aggregate of the accepted updates under Flower's ``name`` aggregator (``None``: nothing to aggregate)."""
    strategy = AGGREGATORS.get(name)(opts)
    arrays, _ = strategy.aggregate_train(round_, as_flower_train_replies(accepted, weights))
    return None if arrays is None else read_tensors(arrays)
