"""FedAF (Wang et al., CVPR 2024): aggregation-free federated learning by condensed data."""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp import Grid

from fedistill.federated import ClientFailure
from fedistill.federated.defenses import robust_stats
from fedistill.federated.fedaf import StatsError, aggregate_stats, knowledge_matching, validate_stats
from protocol.records import read_tensors
from strategies.base import Reply, RoundState, register_strategy
from strategies.distill import DistillStrategy

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

    With ``stats_exchange=piggyback`` the two become one: clients condense with the
    previous round's global logits (no SWD term in round 1) and send this round's
    statistics with their sets, so the global model goes down once per round.

    Options (``strategy.*``): ``lambda_loc``, ``gamma``, ``projections`` (client
    condensation), ``lambda_glob``, ``temperature`` (soft labels, both sides),
    ``stats_exchange`` (``separate`` | ``piggyback``), ``server``.
    """

    name = "fedaf"
    continue_training = True
    defense_acts_on = ("sets", "stats")
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "global_stats")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_stats: dict[str, torch.Tensor] | None = None

    def engine_task(self) -> dict[str, Any]:
        """The ``method`` group's DM settings, run by the ``fedaf`` engine with FedAF's options."""
        return self.dm_engine_task(
            "fedaf", ("lambda_loc", "gamma", "projections"), "condenses by distribution matching"
        )

    def round_inputs(self, round_: int) -> dict[str, torch.Tensor] | None:
        """The global class logits (this round's with ``separate``, the last round's with ``piggyback``)."""
        return None if self.global_stats is None else {"global_logits": self.global_stats["class_logits"]}

    def open_round(self, grid: Grid, state: RoundState) -> list[int]:
        """``separate``: gather and aggregate class statistics first; the clients that sent valid ones condense.

        ``piggyback``: nothing before; the statistics come with the sets (see :meth:`accept`).
        """
        mode = str(self.opts["stats_exchange"])
        if mode == "piggyback":
            return state.nodes
        if mode != "separate":
            raise ValueError(f"unknown strategy.stats_exchange {mode!r}; valid: separate, piggyback")
        task = {"temperature": float(self.opts["temperature"])}
        msgs, down = self.messages(state.round, state.nodes, "query.stats", task, self.global_model.state)
        replies, failures, up = self.exchange(grid, state.round, msgs)
        state.down += down
        state.up += up
        state.failures += failures
        return [r.node for r in self._collect_stats(replies, state.failures)]

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The FedAF engine task and the current global weights (with ``piggyback``, the statistics' temperature)."""
        task = self.engine_task()
        if self.opts["stats_exchange"] == "piggyback":
            task["stats_temperature"] = float(self.opts["temperature"])
        return task, self.global_model.state

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """``piggyback``: the replies' statistics first (aggregated over the valid ones); then their sets."""
        bad: list[ClientFailure] = []
        if self.opts["stats_exchange"] == "piggyback":
            replies = self._collect_stats(replies, bad)
        ok, more = super().accept(round_, replies)
        return ok, bad + more

    def _collect_stats(self, replies: list[Reply], failures: list[ClientFailure]) -> list[Reply]:
        """Validate every reply's ``stats`` record (failures appended), aggregate the valid ones; those replies."""
        ok, stats = [], []
        for r in replies:
            try:
                stats.append(validate_stats(read_tensors(r.msg.content.array_records["stats"]), self.num_classes))
                ok.append(r)
            except (KeyError, StatsError) as err:
                failures.append(ClientFailure(r.node, r.client, "rejected", f"class statistics: {err}"))
        if stats:  # a defence with a robust estimate (defense=robust_proto: the median) replaces the mean
            self.global_stats = robust_stats(self.defense_name, stats) or aggregate_stats(stats)
        return ok

    @property
    def num_classes(self) -> int:
        """Classes of the server's dataset."""
        return self.bundle.info.num_classes

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Train the global model on the round's sets with CE + the knowledge-matching term; nothing is averaged."""
        assert self.global_stats is not None
        regularizer = knowledge_matching(
            self.global_stats["class_soft"],
            weight=float(self.opts["lambda_glob"]),
            temperature=float(self.opts["temperature"]),
        )
        rec = self.train_global(round_, self.merge(round_, accepted), regularizer=regularizer)
        rec["classes_held"] = int((self.global_stats["holders"] > 0).sum())
        return rec

    def finish(self) -> dict[str, Any]:
        """The distillation summary, plus the side channels FedAF releases without noise."""
        out = super().finish()
        privacy = dict(out.get("privacy") or {})
        privacy["public"] = [
            *privacy.get("public", []),
            "class_logits, class_soft: every client's class-wise mean logits and soft labels (query.stats), not noised",
            "holders: which classes every client holds",
        ]
        return {**out, "privacy": privacy}
