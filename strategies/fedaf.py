"""FedAF (Wang et al., CVPR 2024): aggregation-free federated learning by condensed data."""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp import Grid

from fedistill.federated import ClientFailure
from fedistill.federated.fedaf import StatsError, aggregate_stats, knowledge_matching, validate_stats
from fedistill.registry import UnknownNameError
from strategies.base import Reply, register_strategy
from strategies.distill import DistillStrategy
from strategies.records import read_tensors

__all__ = ["FedAF"]


@register_strategy("fedaf")
class FedAF(DistillStrategy):
    """Two exchanges per round, no weight averaging.

    1. ``query.stats``: the global model goes down; clients reply with class-wise mean
       logits and soft labels on their real data; the server averages them over the
       clients holding each class.
    2. ``train.distill``: the global model and the global class logits go down; clients
       condense with DM + ``lambda_loc`` x SWD to the global logits around re-sampled
       copies of the global model (engine ``fedaf``) and send their synthetic sets.

    The server trains the global model (continuing) on the sets, through the ``policy``,
    with cross-entropy plus ``lambda_glob`` x the symmetric KL between the clients'
    class soft labels and its own on the synthetic data.

    Options (``strategy.*``): ``lambda_loc``, ``gamma``, ``projections`` (client
    condensation), ``lambda_glob``, ``temperature`` (soft labels, both sides), ``server``.
    """

    name = "fedaf"
    continue_training = True
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "global_stats")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_stats: dict[str, torch.Tensor] | None = None

    def engine_task(self) -> dict[str, Any]:
        """The ``method`` group's DM settings, run by the ``fedaf`` engine with FedAF's options."""
        task = super().engine_task()
        if task["method"] not in ("dm", "fedaf"):
            raise UnknownNameError(
                f"strategy=fedaf condenses by distribution matching and needs method=dm "
                f"(got method={task['method']}); use strategy=oneshot for other engines"
            )
        task["method"] = "fedaf"
        for key in ("lambda_loc", "gamma", "projections"):
            if key in self.opts:
                task["method_options"][key] = self.opts[key]
        return task

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The FedAF engine task and the current global weights."""
        return self.engine_task(), self.global_model.state

    def exchange(self, grid: Grid, round_: int, nodes: list[int]) -> tuple[list[Reply], list[ClientFailure], int, int]:
        """Gather and aggregate class statistics, then ask the clients that sent valid ones to condense."""
        temperature = float(self.opts.get("temperature", 2.0))
        replies, failures, down, up = self.send(
            grid, round_, nodes, "query.stats", {"temperature": temperature}, self.global_model.state
        )
        stats, ready = [], []
        for r in replies:
            try:
                stats.append(validate_stats(read_tensors(r.msg.content.array_records["stats"]), self.num_classes))
                ready.append(r.node)
            except (KeyError, StatsError) as err:
                failures.append(ClientFailure(r.node, r.client, "rejected", f"class statistics: {err}"))
        if not ready:
            return [], failures, down, up
        self.global_stats = aggregate_stats(stats)
        task, arrays = self.configure(round_)
        inputs = {"global_logits": self.global_stats["class_logits"]}
        replies, more, down2, up2 = self.send(grid, round_, ready, self.message_type, task, arrays, inputs)
        return replies, failures + more, down + down2, up + up2

    @property
    def num_classes(self) -> int:
        """Classes of the server's dataset."""
        return self.bundle.info.num_classes

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Train the global model on the round's sets with CE + the knowledge-matching term; nothing is averaged."""
        assert self.global_stats is not None
        regularizer = knowledge_matching(
            self.global_stats["class_soft"],
            weight=float(self.opts.get("lambda_glob", 0.8)),
            temperature=float(self.opts.get("temperature", 2.0)),
        )
        rec = self.train_global(round_, self.merge(round_, accepted), regularizer=regularizer)
        rec["classes_held"] = int((self.global_stats["holders"] > 0).sum())
        return rec
