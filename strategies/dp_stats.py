"""Aggregate-then-distill DP: clients release noisy class sums, the server distills once from their sum."""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

import torch
from flwr.serverapp import Grid

from fedistill.config import check_strategy
from fedistill.federated import ClientFailure
from fedistill.federated.dp_stats import (
    RELEASE_KEY,
    ReleaseError,
    distill_from_sums,
    release_bound,
    release_shape,
    validate_release,
)
from fedistill.seeding import derive_seed
from protocol.records import read_json, read_tensors
from strategies.base import Reply, RoundState, register_strategy
from strategies.distill import DistillStrategy
from strategies.secagg import CLIPPING_RANGE, secure_sum, survivors_needed

__all__ = ["DPStats"]


@register_strategy("dp_stats")
class DPStats(DistillStrategy):
    """Record-level DP that uses the whole federation (``strategy=dp_stats``, needs ``method=dp_dm``).

    ``query.release``: every sampled client returns, for the run's shared releases
    (random networks and augmentations fixed by a public seed), Poisson-sampled,
    clipped, noised per-class sums of its embeddings and a noisy count column, accounted
    in its own ledger (:func:`fedistill.federated.client.release_task`). The server sums
    them over clients and rounds and distills ``ipc`` images per class against the
    aggregated noisy class means (:func:`fedistill.federated.dp_stats.distill_from_sums`):
    post-processing, no extra budget. Per-client epsilon is reported as for ``oneshot``.

    With ``secure_aggregation`` the releases go through Flower's SecAgg+
    (:mod:`strategies.secagg`): the server learns only their sum, so each client adds
    ``1 / sqrt(t)`` of the noise (``t``: the clients SecAgg+ needs alive, a
    ``secure_threshold`` fraction of those sampled) and the sum of at least ``t`` carries
    the full noise its ledger accounts (distributed DP; trust model in
    ``docs/secure-aggregation.md``).

    Options (``strategy.*``): ``count_share`` (the share of every record's clip spent
    on its count), ``min_records`` (a class needs that many records over the federation,
    by the noisy count, to get images), ``secure_aggregation``, ``secure_threshold``,
    ``server`` (the global model's recipe).
    """

    name = "dp_stats"
    message_type = "query.release"
    continue_training = False
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "total")
    baseline_fix = (
        "the random subset is real, unprotected data, so some gap is the price of the privacy; to narrow "
        "it raise method.epsilon, sum under secure aggregation (strategy.secure_aggregation=true: each "
        "client adds only its share of the noise) or federate more records per class"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_strategy(self.cfg)  # method=dp_dm, 2 sampled clients for SecAgg+ (refused up front by the CLI)
        self.total: torch.Tensor | None = None
        self.round_sum: torch.Tensor | None = None
        self.secure_total: torch.Tensor | None = None
        self.release_seed = derive_seed(self.seed, "dp-stats-releases")
        self.shape = release_shape(self.cfg["method"], self.cfg["model"], self.bundle.info)

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The method group, the shared release seed, the count share and the client's noise share; no arrays."""
        task = self.engine_task()
        task.update(release_seed=self.release_seed, count_share=float(self.opts["count_share"]), noise_share=1.0)
        return task, None

    def open_round(self, grid: Grid, state: RoundState) -> list[int]:
        """Nothing before the round's ``query.release`` messages, or (``secure_aggregation``) the whole
        round as one SecAgg+ sum over the sampled clients, after which no message is left to send."""
        if not self.opts["secure_aggregation"]:
            return state.nodes
        round_, nodes = state.round, state.nodes
        task, _ = self.configure(round_)
        threshold = survivors_needed(len(nodes), float(self.opts["secure_threshold"]))
        noise_share = 1 / math.sqrt(threshold)
        scale = release_bound(self.cfg["method"], rounds=self.rounds, noise_share=noise_share) / CLIPPING_RANGE
        task.update(noise_share=noise_share, secure_scale=scale, secure_range=CLIPPING_RANGE)
        tasks = {n: self.client_task(task, self.clients[n], round_) for n in nodes}
        out = secure_sum(grid, tasks, threshold=threshold, timeout=float(self.opts["round_timeout"]))
        state.down += out.bytes_down
        state.up += out.bytes_up
        if out.total is None:
            why = f"SecAgg+ halted: fewer than {threshold} of {len(nodes)} clients stayed (strategy.secure_threshold)"
            state.failures += [ClientFailure(n, self.clients[n], "dropped", why) for n in nodes]
            return []
        state.failures += [
            ClientFailure(n, self.clients[n], "dropped", "left SecAgg+ before its masked vector was summed")
            for n in out.dropped
        ]
        self.secure_total = torch.from_numpy(out.total).reshape(self.shape) * scale
        state.replies += [Reply(n, self.clients[n], None, out.metrics[n]) for n in out.nodes]
        self.run.log("secure_aggregation", round=round_, clients=len(out.nodes), threshold=threshold, scale=scale)
        return []

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Check every release (keys, shape, finite values) or the secure sum, and mirror the clients' ledgers."""
        ok, bad, sums = [], [], []
        self.round_empty, self.round_epsilon = 0, {}
        for r in replies:
            try:
                if r.msg is None:  # a SecAgg+ participant: only its plaintext metadata reached the server
                    privacy = json.loads(str(r.metrics.pop("privacy")))
                else:
                    sums.append(
                        validate_release(read_tensors(r.msg.content.array_records["release"]), shape=self.shape)
                    )
                    privacy = read_json(r.msg, "meta", "json")["privacy"]
            except (ReleaseError, KeyError, ValueError) as err:
                bad.append(ClientFailure(r.node, r.client, "rejected", f"release: {err}"))
                continue
            self.round_epsilon[r.client] = round(self.ledgers.record(r.client, privacy), 6)
            ok.append(r)
        if ok and ok[0].msg is None:
            sums = [validate_release({RELEASE_KEY: self.secure_total}, shape=self.shape)]
        self.round_sum = torch.stack(sums).sum(0) if sums else None
        return ok, bad

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Add the round's releases to the total, distill from it on the server, retrain the global model."""
        assert self.round_sum is not None
        self.total = self.round_sum if self.total is None else self.total + self.round_sum
        t0 = time.perf_counter()
        syn = distill_from_sums(
            self.total,
            info=self.bundle.info,
            method=self.cfg["method"],
            model=self.cfg["model"],
            ipc=int(self.cfg["ipc"]),
            count_share=float(self.opts["count_share"]),
            min_records=float(self.opts["min_records"]),
            release_seed=self.release_seed,
            seed=derive_seed(self.seed, "dp-stats-server", round_),
            device=self.device,
        )
        seconds = round(time.perf_counter() - t0, 3)
        result = None if syn is None else self.aggregate(round_, [("server", syn)])
        rec = self.train_global(round_, result)
        counts = {} if syn is None else syn.metadata["noisy_counts"]
        rec.update(clients_released=len(accepted), distill_seconds=seconds, noisy_counts=counts)
        clipped = sum(int(r.metrics.get("secure_clipped", 0)) for r in accepted)
        if clipped:  # SecAgg+ clipped values outside its range: the sum is biased there
            rec["secure_clipped"] = clipped
            self.run.log(
                "warning", message=f"round {round_}: SecAgg+ clipped {clipped} values of the clients' releases"
            )
        return rec

    def chance_hint(self) -> str:
        """The noise on the summed sums against the records per class the server counted."""
        eps = self.ledgers.epsilons()
        counts = list((self.history[-1].get("noisy_counts") or {}).values()) if self.history else []
        held = f" over ~{statistics.median(counts):.0f} records per class (noisy count)" if counts else ""
        how = "each client adding its share" if self.opts["secure_aggregation"] else "each client adding its full noise"
        top = f"epsilon up to {max(eps.values()):.2f} per client, " if eps else ""
        return (
            f"the noise on the summed class sums ({top}{how}){held} swamps the signal; raise method.epsilon, "
            "sum under secure aggregation (strategy.secure_aggregation=true) or federate more records per class"
        )
