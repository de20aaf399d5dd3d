"""Per-client planning of a strategy: what each client is told, who misbehaves, who is sampled.

:class:`ClientPlanning` is the part of :class:`~strategies.base.Strategy` that decides per
client, from the run's seed and config alone: the full task a client receives (its seed, data
spec, resources, and any injected fault or attack), the hostile and faulty clients (drawn once
from the seed), the simulated split's class counts, and each round's sample. Everything here is
deterministic for a seed, whatever the order in which nodes registered.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fedistill.federated.faults import FAULTS, FaultOptions
from fedistill.federated.node import data_spec, partition_histogram
from fedistill.federated.server import assign_faults
from fedistill.seeding import derive_seed, numpy_rng

if TYPE_CHECKING:
    from fedistill.data.base import DataBundle
    from fedistill.federated import GlobalModel
    from fedistill.reporting import RunDir

__all__ = ["ClientPlanning", "client_order"]


def client_order(client: str) -> tuple[int, int]:
    """Sort key: partition clients (``p3``) by id first, then nodes (``n123``) by node id."""
    return (0 if client.startswith("p") else 1, int(client[1:]))


class ClientPlanning:
    """Mixin of :class:`~strategies.base.Strategy`: per-client tasks, fault and attack plans, sampling.

    Reads the strategy's ``cfg``, ``opts``, ``seed``, ``run``, ``bundle``, ``clients`` (node id ->
    client key, filled by discovery), ``history``, ``global_model`` and ``defense_name``.
    """

    cfg: dict[str, Any]
    opts: dict[str, Any]
    seed: int
    run: RunDir
    bundle: DataBundle
    clients: dict[int, str]
    history: list[dict[str, Any]]
    global_model: GlobalModel
    defense_name: str
    _faults: dict[str, str] | None
    _attackers: list[str] | None

    def client_task(self, task: dict[str, Any], client: str, round_: int) -> dict[str, Any]:
        """The full task for one client: the shared part plus its seed, data spec and fault."""
        out = dict(task)
        out["seed"] = derive_seed(self.seed, "client", client, round_)
        out["data"] = data_spec(self.cfg, self.bundle.info.name)
        out["model"] = dict(self.cfg["model"])
        client_res = self.cfg["client"]
        out["threads"] = max(1, int(client_res["num_cpus"]))
        gpu_share = float(client_res["num_gpus"])
        out["device"] = client_res["device"] or ("cuda" if gpu_share > 0 else "cpu")
        if out["device"] == "cuda":
            out["gpu_fraction"] = gpu_share  # the node caps its process's GPU memory at this share
        attack = dict(self.cfg["attack"])
        if client in self.attackers():
            out["attack"] = attack
        options = FaultOptions.of(self.cfg["faults"] or {})
        fault = self.fault_plan().get(client)
        if fault and round_ >= options.start_round:
            out["fault"] = fault
            if fault == "slow":
                out["fault_seconds"] = options.slow_seconds
            elif fault == "timeout":  # reply only after the server stopped waiting
                out["fault_seconds"] = float(self.opts["round_timeout"]) + 2.0
        return out

    def attackers(self) -> list[str]:
        """The hostile clients: ``attack.fraction`` of all, chosen from the seed (``attack.kind``)."""
        if self._attackers is None:
            attack = dict(self.cfg["attack"])
            self._attackers = []
            if attack["kind"]:
                clients = sorted(self.clients.values(), key=client_order)
                plan = assign_faults({"attack": attack["fraction"]}, clients, seed=self.seed, kinds=["attack"])
                self._attackers = sorted(plan, key=client_order)
                self.run.log("attack_planned", kind=attack["kind"], clients=self._attackers)
        return self._attackers

    def attack_summary(self) -> dict[str, Any]:
        """``attack`` fields of the summary: kind, hostile clients, a backdoor's success rate."""
        attack = dict(self.cfg["attack"])
        if not attack["kind"]:
            return {}
        out: dict[str, Any] = {
            "kind": attack["kind"],
            "fraction": attack["fraction"],
            "clients": self.attackers(),
            "defense": self.defense_name,
            "accuracy": self.history[-1]["accuracy"] if self.history else None,
        }
        if attack["kind"] == "backdoor":
            out["target"] = int(attack["target"])
            out["attack_success_rate"] = round(100 * self.global_model.backdoor_success(attack), 4)
        return {"attack": out}

    def fault_plan(self) -> dict[str, str]:
        """Injected faults per client (``faults`` config: by partition id or by fraction of clients)."""
        if self._faults is None:
            clients = sorted(self.clients.values(), key=client_order)
            kinds = self.fault_kinds()
            self._faults = assign_faults(self.cfg["faults"] or {}, clients, seed=self.seed, kinds=kinds)
            for client, kind in sorted(self._faults.items(), key=lambda kv: client_order(kv[0])):
                self.run.log("fault_planned", client=client, kind=kind)
        return self._faults

    def fault_kinds(self) -> list[str]:
        """The injectable faults of this strategy's clients (synthetic-set faults; FedAvg: weight faults)."""
        return FAULTS.names()

    @functools.cached_property
    def simulated_histogram(self) -> np.ndarray | None:
        """``[clients, classes]`` records of each simulated client (``p<id>``: row ``id``), as the
        server derives the split; ``None`` on devices with their own data (``node_data`` other
        than ``partition``)."""
        if self.run.summary.get("node_data") != "partition":
            return None
        spec = data_spec(self.cfg, self.bundle.info.name)
        return partition_histogram(spec, int(self.cfg["clients"]), self.bundle.train)

    def simulated_partitions(self) -> dict[str, int] | None:
        """Records per simulated client (``p<id>``); ``None`` on devices with their own data."""
        hist = self.simulated_histogram
        return None if hist is None else {f"p{i}": int(n) for i, n in enumerate(hist.sum(1))}

    def sample(self, round_: int) -> list[int]:
        """This round's nodes: ``fraction`` of all, drawn from the seed stream, in client order."""
        ordered = sorted(self.clients, key=lambda n: client_order(self.clients[n]))
        k = max(1, math.ceil(float(self.opts["fraction"]) * len(ordered)))
        if k >= len(ordered):
            return ordered
        pick = numpy_rng(self.seed, "client-sampling", round_).choice(len(ordered), size=k, replace=False)
        return [ordered[i] for i in sorted(pick)]
