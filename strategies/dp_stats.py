"""Aggregate-then-distill DP: clients release noisy class sums, the server distills once from their sum."""

from __future__ import annotations

import time
from typing import Any

import torch

from fedistill.federated import ClientFailure
from fedistill.federated.dp_stats import ReleaseError, distill_from_sums, release_shape, validate_release
from fedistill.registry import UnknownNameError
from fedistill.seeding import derive_seed
from protocol.records import read_json, read_tensors
from strategies.base import Reply, register_strategy
from strategies.distill import DistillStrategy

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

    Options (``strategy.*``): ``count_share`` (the share of every record's clip spent
    on its count), ``min_records`` (a class needs that many records over the federation,
    by the noisy count, to get images), ``server`` (the global model's recipe).
    """

    name = "dp_stats"
    message_type = "query.release"
    continue_training = False
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "total")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        method = self.cfg["method"]["name"]
        if method != "dp_dm":
            raise UnknownNameError(
                f"strategy=dp_stats sums the clients' dp_dm releases and needs method=dp_dm (got method={method}); "
                "use strategy=oneshot for other engines"
            )
        self.total: torch.Tensor | None = None
        self.release_seed = derive_seed(self.seed, "dp-stats-releases")
        self.shape = release_shape(self.cfg["method"], self.cfg["model"], self.bundle.info)

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The method group, the shared release seed and the count share; no arrays."""
        task = self.engine_task()
        task.update(release_seed=self.release_seed, count_share=float(self.opts["count_share"]))
        return task, None

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Check every release (keys, shape, finite values) and mirror the client's ledger."""
        ok, bad = [], []
        self.round_empty, self.round_epsilon = 0, {}
        for r in replies:
            try:
                sums = validate_release(read_tensors(r.msg.content.array_records["release"]), shape=self.shape)
                privacy = read_json(r.msg, "meta", "json")["privacy"]
            except (ReleaseError, KeyError, ValueError) as err:
                bad.append(ClientFailure(r.node, r.client, "rejected", f"release: {err}"))
                continue
            self.round_epsilon[r.client] = round(self.ledgers.record(r.client, privacy), 6)
            r.metrics["release"] = sums
            ok.append(r)
        return ok, bad

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Add the round's releases to the total, distill from it on the server, retrain the global model."""
        round_sum = torch.stack([r.metrics["release"] for r in accepted]).sum(0)
        self.total = round_sum if self.total is None else self.total + round_sum
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
        return {**rec, "clients_released": len(accepted), "distill_seconds": seconds, "noisy_counts": counts}
