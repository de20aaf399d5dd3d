"""Shared base of the strategies whose clients send synthetic sets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from fedistill.data.synthetic import SyntheticSet, SyntheticSetError
from fedistill.federated import ClientFailure, decode_synthetic
from fedistill.federated.defenses import apply_defense
from fedistill.federated.policies import PolicyContext, PolicyResult, apply_policy
from fedistill.federated.server import random_baseline
from fedistill.privacy import ClientLedgers
from fedistill.registry import UnknownNameError
from fedistill.reporting import baseline_warning, save_grid
from protocol.records import read_json, read_tensors
from strategies.base import Reply, Strategy

__all__ = ["DistillStrategy"]


class DistillStrategy(Strategy):
    """Clients distill (``train.distill``); the server validates, merges and trains on the union.

    Options (``strategy.*``): ``max_client_images`` (per-client size cap; default
    ``ipc x classes``), ``server`` (the global model's training recipe). The ``policy``
    group chooses how the server turns the sets into training data
    (:mod:`fedistill.federated.policies`).
    """

    message_type = "train.distill"
    defense_acts_on = ("sets",)
    #: What the below-the-random-subset warning suggests.
    baseline_fix: ClassVar[str] = (
        "the synthetic sets add nothing over sending real images; try more client iterations "
        "(method.iterations) or a fresh release every iteration (method.releases=null)"
    )
    checkpoint_attrs = (*Strategy.checkpoint_attrs, "synthetic", "ledgers")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.synthetic: SyntheticSet | None = None
        self.round_empty = 0
        self.ledgers = ClientLedgers()
        self.round_epsilon: dict[str, float] = {}

    def client_task(self, task: dict[str, Any], client: str, round_: int) -> dict[str, Any]:
        """The base task plus the server's copy of this client's privacy ledger (DP engines)."""
        out = super().client_task(task, client, round_)
        if client in self.ledgers.ledgers:
            out["privacy_ledger"] = self.ledgers.ledgers[client]
        return out

    def engine_task(self) -> dict[str, Any]:
        """The clients' engine task: the ``method`` group as configured (FedDM and FedAF run their
        own DM variant, :meth:`dm_engine_task`)."""
        return self.method_task()

    def method_task(self) -> dict[str, Any]:
        """Engine name and options from the ``method`` group."""
        method = dict(self.cfg["method"])
        name = method.pop("name")
        return {
            "method": name,
            "method_options": method,
            "ipc": int(self.cfg["ipc"]),
            "init": str(self.cfg["init"]),
            "rounds": self.rounds,
        }

    def dm_engine_task(self, engine: str, options: tuple[str, ...], why: str) -> dict[str, Any]:
        """The ``method`` group's DM settings run by the strategy's own DM variant ``engine``.

        ``options`` are strategy keys (``strategy.*``) that override the engine's; ``why``
        says in the error why another ``method`` cannot be used.
        """
        task = self.method_task()
        if task["method"] not in ("dm", engine):
            raise UnknownNameError(
                f"strategy={self.name} {why} and needs method=dm (got method={task['method']}); "
                "use strategy=oneshot for other engines"
            )
        task["method"] = engine
        for key in options:
            if key in self.opts:
                task["method_options"][key] = self.opts[key]
        return task

    def max_client_images(self) -> int:
        """Per-client size cap on a synthetic-set reply."""
        cap = self.opts["max_client_images"]
        return int(cap) if cap else int(self.cfg["ipc"]) * self.bundle.info.num_classes

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Decode and validate every synthetic set; reject malformed ones with the reason."""
        ok, bad = [], []
        self.round_empty = 0
        self.round_epsilon = {}
        for r in replies:
            try:
                if "synthetic" not in r.msg.content.array_records:
                    if int(r.metrics.get("rows", -1)) == 0:  # nothing to distill on this client
                        r.metrics["synthetic"] = None
                        self.round_empty += 1
                        ok.append(r)
                        continue
                    raise SyntheticSetError("payload", "reply has no 'synthetic' ArrayRecord")
                meta = read_json(r.msg, "meta", "json")
                syn = decode_synthetic(
                    read_tensors(r.msg.content.array_records["synthetic"]),
                    meta,
                    self.bundle.info,
                    max_size=self.max_client_images(),
                )
            except (SyntheticSetError, ValueError, KeyError) as err:
                bad.append(ClientFailure(r.node, r.client, "rejected", str(err)))
                continue
            if "privacy" in syn.metadata:
                self.round_epsilon[r.client] = round(self.ledgers.record(r.client, syn.metadata["privacy"]), 6)
            r.metrics["synthetic"] = syn
            ok.append(r)
        return ok, bad

    def parts(self, accepted: list[Reply]) -> list[tuple[str, SyntheticSet]]:
        """``(client, set)`` of this round's accepted, non-empty replies, in client order."""
        return [(r.client, r.metrics["synthetic"]) for r in accepted if r.metrics["synthetic"] is not None]

    def aggregate(self, round_: int, parts: list[tuple[str, SyntheticSet]]) -> PolicyResult | None:
        """The configured ``defense`` then server policy (``policy=union|balance|redistill|screen``) on ``parts``.

        Clients a defence or the policy dropped are logged (``defense_dropped`` /
        ``policy_dropped`` events) with the reason, and rows a defence removed are counted
        per client (``defense_rows_removed``). ``None`` when no client sent anything.
        """
        if not parts:
            return None
        opts = dict(self.cfg["policy"])  # the policy group (simulate.yaml: union)
        name = str(opts.pop("name"))
        ctx = PolicyContext(
            info=self.bundle.info,
            model=self.global_model.spec,
            ipc=int(self.cfg["ipc"]),
            seed=self.seed,
            round_=round_,
            device=self.device,
            state=self.global_model.state,
            val=self.bundle.val,
        )
        defended = apply_defense(self.defense_name, parts, ctx, **self.defense_options)
        for d in defended.dropped:
            self.run.log("defense_dropped", round=round_, defense=self.defense_name, **d)
        if not defended.parts:
            self.run.log("no_synthetic_data", round=round_, reason=f"defense={self.defense_name} dropped every client")
            return None
        result = apply_policy(name, defended.parts, ctx, **opts)
        for d in result.dropped:
            self.run.log("policy_dropped", round=round_, policy=name, **d)
        result.metrics["policy"] = name
        if self.defense_name != "none":
            scores = {k: v for k, v in defended.metrics.items() if k != "rows_removed"}
            self.run.log("defense", round=round_, defense=self.defense_name, **scores)
            result.metrics.update(
                defense=self.defense_name,
                defense_dropped=[d["client"] for d in defended.dropped],
                defense_rows_removed=defended.metrics.get("rows_removed", {}),
            )
            result.dropped = defended.dropped + result.dropped
        return result

    def merge(self, round_: int, accepted: list[Reply]) -> PolicyResult | None:
        """This round's accepted sets through the server policy."""
        return self.aggregate(round_, self.parts(accepted))

    def train_global(
        self,
        round_: int,
        result: PolicyResult | None,
        *,
        regularizer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Train the global model on a policy's output (skipped when no client had anything to send).

        Returns the round's metrics: images, empty clients, training and policy seconds,
        the clients the policy dropped, and with a DP engine every replying client's
        cumulative ``epsilon``.
        """
        rec: dict[str, Any] = {"clients_empty": self.round_empty}
        if self.round_epsilon:
            rec["epsilon"] = dict(self.round_epsilon)
        if result is None:
            self.run.log("no_synthetic_data", round=round_)
            return {"synthetic_images": 0, **rec, "train_seconds": 0.0}
        syn = result.synthetic
        self.synthetic = syn
        seconds = self.global_model.train_on(syn, round_=round_, weights=result.weights, regularizer=regularizer)
        return {
            "synthetic_images": len(syn),
            **rec,
            "train_seconds": round(seconds, 3),
            "policy_dropped": [d["client"] for d in result.dropped],
            **{k: v for k, v in result.metrics.items() if k != "scores"},
        }

    def random_baseline(self) -> dict[str, Any]:
        """A fresh global model trained on random real images with the last set's class counts.

        Rows a policy duplicated (``balance``) are not counted. It gets the training budget
        the global model had in total (``rounds x steps`` when it continues training).
        """
        assert self.synthetic is not None
        unique = len(self.synthetic) - int(self.synthetic.metadata.get("duplicates", 0))
        rounds = len(self.history) if self.continue_training else 1
        return random_baseline(self.global_model, self.synthetic.hard_labels[:unique], rounds=rounds)

    def finish(self) -> dict[str, Any]:
        """Save the last merged set and its grid."""
        privacy = {"privacy": self.ledgers.summary()} if self.ledgers.ledgers else {}
        if self.synthetic is None:
            return privacy
        self.describe(self.synthetic)
        path = self.synthetic.save(self.run.path / "synthetic.safetensors")
        save_grid(self.synthetic, self.run.path / "synthetic.png")
        return {
            "synthetic_path": str(path.resolve()),
            "synthetic_images": len(self.synthetic),
            "provenance": json.loads(json.dumps(self.synthetic.metadata.get("clients") or [])),
            **privacy,
        }

    def chance_hint(self) -> str:
        """With record-level DP clients: the noise each client added against the records it holds per class."""
        eps = self.ledgers.epsilons()
        if not eps:
            return super().chance_hint()
        held = self.median_records_per_class()
        over = f" over a median of {held:g} records per class" if held is not None else ""
        return (
            f"every client noised its own class sums (record-level DP, epsilon up to {max(eps.values()):.2f} per "
            f"client){over}: the noise swamps the signal; raise method.epsilon, give each client more data (fewer "
            "clients, partition=iid), or use a non-DP method"
        )

    def median_records_per_class(self) -> float | None:
        """Median records per held class over the simulated clients (``None`` on devices with their own data)."""
        hist = self.simulated_histogram
        return None if hist is None else float(np.median(hist[hist > 0]))

    def control(self) -> dict[str, Any]:
        """The random-real control (``strategy.random_baseline``), run after the main result is written."""
        if self.synthetic is None or not self.opts["random_baseline"]:
            return {}
        baseline = self.random_baseline()
        self.run.log("baseline", random_subset=baseline)
        out: dict[str, Any] = {"baselines": {"random_subset": baseline}}
        below = baseline_warning(
            self.history[-1]["accuracy"],
            baseline["accuracy"],
            what="the global model",
            baseline_name=f"the random real subset of the same {baseline['images']} images under the same "
            "server recipe",
            fix=self.baseline_fix,
        )
        if below:
            out["warnings"] = [*self.run.summary.get("warnings", []), below]
        return out
