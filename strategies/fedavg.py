"""FedAvg (McMahan et al.): the model-averaging baseline every table shows beside distillation."""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedistill.federated import ClientFailure, FederationError, weighted_average
from fedistill.federated.faults import WEIGHT_FAULTS
from fedistill.federated.server import examples_problem, state_problem
from protocol.records import read_tensors
from strategies.base import Reply, RoundState, Strategy, register_strategy
from strategies.dp_fedavg import FlowerCentralDP
from strategies.robust import robust_aggregate

__all__ = ["FedAvg"]


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Clients run ``local_epochs`` of SGD from the global weights; the server averages them,
    weighted by local example counts.

    Options (``strategy.*``): ``local_epochs``, ``lr``, ``momentum``, ``weight_decay``, ``batch_size``;
    ``aggregator`` (``mean``, or Flower's ``median``, ``trimmed_mean``, ``krum``: see
    :mod:`strategies.robust`), ``dp.noise_multiplier`` (> 0 turns on Flower's central DP wrapper, see
    :mod:`strategies.dp_fedavg`), ``dp.clip``, ``dp.delta``, ``dp.max_epsilon``.
    """

    name = "fedavg"
    message_type = "train.fit"
    defense_acts_on = ("aggregator",)
    checkpoint_attrs = (*Strategy.checkpoint_attrs, "dp")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dp = dict(self.opts["dp"])
        self.dp: FlowerCentralDP | None = None
        if dp["noise_multiplier"]:
            clients = int(self.cfg["clients"])
            sampled = max(1, math.ceil(float(self.opts["fraction"]) * clients))
            self.dp = FlowerCentralDP(dp, clients=clients, sampled=min(sampled, clients), seed=self.seed)
        if self.aggregator() != "mean" and self.dp is not None:
            raise ValueError(
                f"aggregator {self.aggregator()} (strategy.aggregator / defense) cannot be combined with "
                "strategy.dp.noise_multiplier > 0: Flower's DP wrapper averages the clipped updates itself"
            )

    def open_round(self, grid: Grid, state: RoundState) -> list[int]:
        """With DP, register the round's release with Flower's wrapper first (it refuses one over budget)."""
        if self.dp is not None:
            try:
                self.dp.start_round(state.round, self.global_model.state, state.nodes)
            except PrivacyBudgetExhausted as err:
                raise FederationError(
                    f"round {state.round}: {err} Raise strategy.dp.max_epsilon or run fewer rounds."
                ) from err
        return state.nodes

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The local SGD recipe and the global weights."""
        fit = {
            "epochs": int(self.opts["local_epochs"]),
            "lr": float(self.opts["lr"]),
            "momentum": float(self.opts["momentum"]),
            "weight_decay": float(self.opts["weight_decay"]),
            "batch_size": int(self.opts["batch_size"]),
        }
        return {"fit": fit}, self.global_model.state

    def fault_kinds(self) -> list[str]:
        """FedAvg clients misbehave in their weights and counts (:data:`WEIGHT_FAULTS`)."""
        return WEIGHT_FAULTS.names()

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Reject replies whose weights do not match the global model's keys, shapes or finiteness, or
        whose ``examples`` weight is not a positive whole number or exceeds the client's simulated partition."""
        ok, bad = [], []
        ref = self.global_model.state
        held = self.simulated_partitions() or {}  # the simulated clients' record counts: an upper bound on their weight
        for r in replies:
            try:
                state = read_tensors(r.msg.content.array_records["model"])
            except KeyError:
                bad.append(ClientFailure(r.node, r.client, "rejected", "reply has no 'model' ArrayRecord"))
                continue
            problem = state_problem(state, ref) or examples_problem(r.metrics.get("examples"), held=held.get(r.client))
            if problem:
                bad.append(ClientFailure(r.node, r.client, "rejected", problem))
                continue
            r.metrics["state"] = state
            ok.append(r)
        return ok, bad

    def aggregator(self) -> str:
        """``strategy.aggregator``, or the robust aggregator a ``defense`` names (``defense=median``)."""
        own = str(self.opts["aggregator"])
        chosen = self.defense.aggregator
        if chosen and own not in ("mean", chosen):
            raise ValueError(
                f"strategy.aggregator={own} and defense={self.defense_name} choose different aggregators; "
                "set one of them"
            )
        return chosen or own

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Average the accepted weights (by example count; uniformly, clipped and noised with DP)."""
        weights = [float(r.metrics["examples"]) for r in accepted]  # accept() checked every count
        aggregator = self.aggregator()
        if self.dp is None and aggregator != "mean":
            opts = {**self.opts, **self.defense_options}  # trim_beta / krum_malicious of the defense group
            new = robust_aggregate(aggregator, opts, round_, accepted, weights)
            if new is not None:
                self.global_model.state = {k: v.to(self.global_model.state[k].dtype) for k, v in new.items()}
            return {"examples": int(sum(weights)), "aggregator": aggregator}
        if self.dp is None:
            self.global_model.state = weighted_average([r.metrics["state"] for r in accepted], weights)
            return {"examples": int(sum(weights))}
        new = self.dp.aggregate(round_, accepted)
        if new is None:  # Flower's accounted DP path releases only when every sampled client replied
            self.run.log("dp_release_skipped", round=round_, replies=len(accepted))
        else:
            self.global_model.state = {k: v.to(self.global_model.state[k].dtype) for k, v in new.items()}
        return {"examples": int(sum(weights)), "epsilon": round(self.dp.epsilon(), 6), "dp_released": new is not None}

    def finish(self) -> dict[str, Any]:
        """The privacy summary of a DP run."""
        return {} if self.dp is None else {"privacy": self.dp.summary()}
