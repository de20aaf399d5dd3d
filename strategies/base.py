"""The shared round loop of every fedistill strategy.

A strategy is a small class over :class:`Strategy`: it says what a round sends
(:meth:`Strategy.configure`), which replies it accepts (:meth:`Strategy.accept`)
and how it updates the global model from them (:meth:`Strategy.update`). The base
class does the rest: wait for the nodes, learn their partition ids, sample clients
deterministically and plan their tasks (:mod:`strategies.planning`), exchange messages,
account bytes and failures, enforce ``min_success_fraction``, evaluate the global model
on the real test set every round, and write ``metrics.jsonl``, plots and ``summary.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedistill.checkpoint import Checkpoint, CheckpointError, config_key
from fedistill.data.base import DataBundle
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import resolve_device
from fedistill.federated import ClientFailure, FederationError, GlobalModel
from fedistill.federated.client import model_spec
from fedistill.federated.defenses import check_defense
from fedistill.federated.state import get_path, pack, set_path, unpack
from fedistill.registry import Registry
from fedistill.reporting import RunDir, chance_warning, progress_bars, save_accuracy_plot
from fedistill.training import EvalRecipe
from protocol.records import content_bytes, read_metrics, task_content, tensor_record
from strategies.exchange import RoundWatch, push_and_pull
from strategies.planning import ClientPlanning, client_order

__all__ = ["STRATEGIES", "Reply", "Strategy", "register_strategy"]

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
register_strategy = STRATEGIES.register


@dataclass
class Reply:
    """A successful reply: the node, its client key, the message (``None`` when the client's
    payload reached the server only inside a secure sum) and its metrics."""

    node: int
    client: str
    msg: Message | None
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(ClientPlanning):
    """Base class of server strategies (see the module docstring).

    Parameters
    ----------
    cfg
        The resolved run config (``strategy``, ``rounds``, ``clients``, ``method``,
        ``model``, ``ipc``, ``seed``, ``device``, ``client``, ``partition``, ``data``, ``faults``).
    run
        The run directory.
    bundle
        The server's dataset (test split for evaluation, train split for baselines).
    """

    name: ClassVar[str] = ""
    message_type: ClassVar[str] = "train.distill"
    continue_training: ClassVar[bool] = True
    #: Where a ``defense`` may act in this strategy (:mod:`fedistill.federated.defenses`).
    defense_acts_on: ClassVar[tuple[str, ...]] = ()
    #: Attributes (dotted paths) a round checkpoint saves and a resumed run restores;
    #: subclasses extend it with their own state.
    checkpoint_attrs: ClassVar[tuple[str, ...]] = (
        "history",
        "bytes_up",
        "bytes_down",
        "failed_total",
        "global_model.state",
    )

    def __init__(self, cfg: dict[str, Any], run: RunDir, bundle: DataBundle) -> None:
        self.cfg, self.run, self.bundle = cfg, run, bundle
        self.opts: dict[str, Any] = dict(cfg["strategy"])
        self.rounds = int(cfg["rounds"])
        self.seed = int(cfg["seed"])
        self.device = resolve_device(cfg["device"])
        self.global_model = GlobalModel(
            model_spec(cfg["model"]),
            bundle,
            recipe=EvalRecipe(**self.opts.get("server", {})),
            device=self.device,
            seed=self.seed,
            continue_training=self.continue_training,
        )
        self.clients: dict[int, str] = {}
        self.bytes_up = self.bytes_down = self.failed_total = 0
        self._faults: dict[str, str] | None = None
        self._attackers: list[str] | None = None
        self.history: list[dict[str, Any]] = []
        self.defense_options = dict(cfg["defense"])  # the defense group (simulate.yaml: none)
        self.defense_name = str(self.defense_options.pop("name"))
        self.defense = check_defense(self.defense_name, self.name, self.defense_acts_on)
        if self.device.type == "cuda" and not float(cfg["client"]["num_gpus"]):  # client.device=cuda needs a share
            msg = "the server trains on CUDA but clients distill on the CPU; give them a GPU share: client.num_gpus=0.1"
            print(f"fedistill: warning: {msg}")
            run.log("warning", message=msg)

    # ----------------------------------------------------------------- hooks
    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The round's task (shared part) and the arrays to send (e.g. global weights)."""
        raise NotImplementedError

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Validate replies; return the accepted ones and a failure per rejected one."""
        return replies, []

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Update the global model from accepted replies; return extra round metrics."""
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """Save strategy outputs after the last round; return extra summary fields."""
        return {}

    def control(self) -> dict[str, Any]:
        """Controls (e.g. the random-real subset) run after the main result is on disk; extra summary fields."""
        return {}

    def chance_hint(self) -> str:
        """The likely cause of a global model at chance level, and where to look (strategies add theirs)."""
        return (
            "it learned nothing from the clients' uploads; see clients_failed and the round failures in metrics.jsonl"
        )

    def describe(self, syn: SyntheticSet) -> None:
        """Record what a set saved by this run is: dataset, strategy, IPC and the model it trains
        (``fedistill evaluate`` evaluates with that model unless told otherwise)."""
        syn.metadata.update(
            dataset=self.bundle.info.name, strategy=self.name, ipc=int(self.cfg["ipc"]), model=dict(self.cfg["model"])
        )

    # ------------------------------------------------------------- machinery
    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Block until the expected number of nodes registered (or time out with a clear error)."""
        expected = int(self.cfg["clients"])
        timeout = float(self.opts["wait_timeout"])
        start = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            if time.monotonic() - start > timeout:
                raise FederationError(
                    f"only {len(nodes)} of {expected} nodes registered within {timeout:.0f} s; "
                    "start more SuperNodes or lower clients="
                )
            time.sleep(0.5)
        return nodes

    def discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask every node for its partition id; key clients ``p{id}`` (``n{node}`` without one).

        Waits up to ``wait_timeout`` (the nodes' start-up, e.g. Ray actors importing torch), not
        the round's ``round_timeout``: a short round timeout must not cost nodes their stable keys.
        """
        msgs = [Message(task_content({}), dst_node_id=n, message_type="query.info") for n in nodes]
        self.clients = {n: f"n{n}" for n in nodes}
        for rep in grid.send_and_receive(msgs, timeout=float(self.opts["wait_timeout"])):
            if not rep.has_error():
                pid = int(read_metrics(rep).get("partition-id", -1))
                if pid >= 0:
                    self.clients[rep.metadata.src_node_id] = f"p{pid}"

    def exchange(self, grid: Grid, round_: int, nodes: list[int]) -> tuple[list[Reply], list[ClientFailure], int, int]:
        """Send the round's messages, gather replies; returns replies, failures, bytes down, bytes up."""
        task, arrays = self.configure(round_)
        return self.send(grid, round_, nodes, self.round_message_type(round_), task, arrays)

    def round_message_type(self, round_: int) -> str:
        """The message type of ``round_``'s tasks (:attr:`message_type`; a phased strategy overrides this)."""
        return self.message_type

    def send(
        self,
        grid: Grid,
        round_: int,
        nodes: list[int],
        message_type: str,
        task: dict[str, Any],
        arrays: dict[str, torch.Tensor] | None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[Reply], list[ClientFailure], int, int]:
        """One message of ``message_type`` to each node; returns replies, failures, bytes down, bytes up.

        ``arrays`` go as the ``global`` record (the global weights), ``inputs`` as the
        ``inputs`` record (engine inputs); each is serialized once for all nodes. While the
        replies come in, a live line under the round bar (when :meth:`run_rounds` drives)
        and ``round_progress`` events in ``metrics.jsonl`` show clients done, failures so
        far, elapsed seconds and an ETA (see :class:`~strategies.exchange.RoundWatch`).
        """
        record = tensor_record(arrays) if arrays is not None else None
        extra = tensor_record(inputs) if inputs is not None else None
        msgs, down = [], 0
        for n in nodes:
            content = task_content(self.client_task(task, self.clients[n], round_), record, extra)
            down += content_bytes(content)
            msgs.append(Message(content, dst_node_id=n, message_type=message_type))
        replies, failures, up, seen = [], [], 0, set()
        watch = RoundWatch(round_, len(msgs), run=self.run, bars=getattr(self, "_bars", None), label=message_type)
        timeout = float(self.opts["round_timeout"])
        window = self.cfg["max_in_flight"]
        for rep in push_and_pull(grid, msgs, timeout=timeout, on_poll=watch, window=window):
            node = rep.metadata.src_node_id
            seen.add(node)
            client = self.clients.get(node, f"n{node}")
            if rep.has_error():
                failures.append(ClientFailure(node, client, "error", str(rep.error.reason)))
                continue
            up += content_bytes(rep.content)
            replies.append(Reply(node, client, rep, read_metrics(rep)))
        for n in nodes:
            if n not in seen:
                failures.append(ClientFailure(n, self.clients[n], "timeout", "no reply within round_timeout"))
        replies.sort(key=lambda r: client_order(r.client))
        return replies, failures, down, up

    # ---------------------------------------------------------- checkpoints
    def checkpoint(self) -> Checkpoint:
        """This run's round checkpoint (keyed by the config, so another config cannot resume it)."""
        skip = ("resume", "device", "verbose", "ray", "client", "max_in_flight", "tracking")
        key = config_key({k: v for k, v in self.cfg.items() if k not in skip})
        return Checkpoint(self.run.path / "checkpoint.safetensors", key=key)

    def save_checkpoint(self) -> Path:
        """Atomically save everything the next round needs (after every completed round); returns its path."""
        tensors: dict[str, torch.Tensor] = {}
        state = {attr: pack(get_path(self, attr), tensors, attr) for attr in self.checkpoint_attrs}
        return self.checkpoint().save(tensors, state)

    def restore_checkpoint(self) -> int:
        """Load the last round checkpoint, if any; returns the number of completed rounds."""
        loaded = self.checkpoint().load()
        if loaded is None:
            return 0
        tensors, state = loaded
        for attr in self.checkpoint_attrs:
            try:
                set_path(self, attr, unpack(state[attr], tensors, get_path(self, attr)))
            except (KeyError, ValueError, TypeError) as err:
                path = self.checkpoint().path
                raise CheckpointError(
                    f"{path}: field {attr!r} of strategy={self.name} cannot be restored ({err}); the file is from "
                    "another fedistill version or damaged: delete it to start the run over"
                ) from err
        return len(self.history)

    def run_rounds(self, grid: Grid, *, resume: bool = False) -> dict[str, Any]:
        """Run every round (after the last checkpointed one when ``resume``); returns the summary."""
        start = time.perf_counter()
        done = self.restore_checkpoint() if resume else 0
        if resume:
            self.run.log("resumed", completed_rounds=done)
        nodes = self.wait_for_nodes(grid)
        self.discover(grid, nodes)
        self.run.log("nodes", count=len(nodes), clients=sorted(self.clients.values(), key=client_order))
        with progress_bars() as bars:
            self._bars = bars  # send() shows each round's replies as they arrive on a line of its own
            bar = bars.add_task(f"{self.name} rounds", total=self.rounds, info="", completed=done)
            ckpt: dict[str, Any] = {}  # this process's checkpoint cost: total seconds, size of the last one
            for r in range(done + 1, self.rounds + 1):
                rec = self.run_round(grid, r)
                t0 = time.perf_counter()
                size = self.save_checkpoint().stat().st_size
                seconds = time.perf_counter() - t0
                ckpt = {"seconds": round(ckpt.get("seconds", 0.0) + seconds, 4), "bytes": size}
                self.run.log("checkpoint", round=r, seconds=round(seconds, 4), bytes=size)
                bars.update(bar, advance=1, info=f"acc {rec['accuracy']:.2f}%  failed {rec['clients_failed']}")
            self._bars = None
        extra = self.finish() | self.attack_summary()
        self.global_model.save(self.run.path / "global_model.safetensors")
        save_accuracy_plot(
            self.history, self.run.path / "accuracy.png", title=f"{self.name} on {self.bundle.info.name}"
        )
        chance = chance_warning(
            self.history[-1]["accuracy"], self.bundle.info.num_classes, what="the global model", why=self.chance_hint()
        )
        if chance:
            extra["warnings"] = [chance]
        summary = self.run.update_summary(
            final_accuracy=self.history[-1]["accuracy"],
            final_loss=self.history[-1]["loss"],
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            clients_failed=self.failed_total,
            checkpoint=ckpt,
            wall_seconds=round(time.perf_counter() - start, 3),
            status="done",
            **extra,
        )
        controls = self.control()
        if not controls:
            return summary
        return self.run.update_summary(
            **controls, control_seconds=round(time.perf_counter() - start - summary["wall_seconds"], 3)
        )

    def run_round(self, grid: Grid, round_: int) -> dict[str, Any]:
        """One round: sample, exchange, accept, check, update, evaluate, log."""
        t0 = time.perf_counter()
        nodes = self.sample(round_)
        replies, failures, down, up = self.exchange(grid, round_, nodes)
        t_exchange = time.perf_counter()
        accepted, rejected = self.accept(round_, replies)
        t_accept = time.perf_counter()
        failures += rejected
        self.bytes_up += up
        self.bytes_down += down
        self.failed_total += len(failures)
        rec: dict[str, Any] = {
            "round": round_,
            "clients_sampled": len(nodes),
            "clients_succeeded": len(accepted),
            "clients_failed": len(failures),
            "failures": [f.to_dict() for f in failures],
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_total": self.bytes_up,
            "bytes_down_total": self.bytes_down,
            # what each client reported about itself: examples, seconds, peak_rss_mb (the edge footprint)
            "client_metrics": {r.client: _scalars(r.metrics) for r in replies},
        }
        for f in failures:
            self.run.log("client_failed", round=round_, **f.to_dict())
        needed = math.ceil(float(self.opts["min_success_fraction"]) * len(nodes))
        if len(accepted) < max(1, needed):
            reasons = "; ".join(f"{f.client}: {f.reason}" for f in failures[:5])
            msg = (
                f"round {round_}: only {len(accepted)} of {len(nodes)} sampled clients succeeded, "
                f"min_success_fraction={self.opts['min_success_fraction']} needs {needed} ({reasons})"
            )
            self.run.log("round_failed", **rec, error=msg)
            self.run.update_summary(status="failed", error=msg, rounds_completed=round_ - 1)
            raise FederationError(msg)
        t1 = time.perf_counter()
        rec.update(self.update(round_, accepted))
        t_update = time.perf_counter()
        acc, loss = self.global_model.evaluate()
        rec.update(
            accuracy=round(100 * acc, 4),
            loss=round(loss, 6),
            server_seconds=round(time.perf_counter() - t1, 3),
            seconds=round(time.perf_counter() - t0, 3),
            # where the round's time went: messages out and back (client work, Ray, serialization),
            # decoding and validating replies, the strategy's update (server training), evaluation
            timing={
                "exchange": round(t_exchange - t0, 3),
                "accept": round(t_accept - t_exchange, 3),
                "update": round(t_update - t1, 3),
                "evaluate": round(time.perf_counter() - t_update, 3),
            },
        )
        self.history.append(rec)
        self.run.log("round", **rec)
        self.run.update_summary(rounds_completed=round_, accuracy_history=[h["accuracy"] for h in self.history])
        return rec


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric scalars of a client's metrics (drops lists and decoded payloads)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
