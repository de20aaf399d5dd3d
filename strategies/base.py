"""The shared round of every fedistill strategy, as a Flower Message-API strategy.

:class:`Strategy` subclasses Flower's :class:`flwr.serverapp.strategy.Strategy`:
``configure_train`` samples the round's clients (deterministically, :mod:`strategies.planning`)
and builds their messages; ``aggregate_train`` validates the replies, accounts bytes and
failures, enforces ``min_success_fraction``, updates the global model and evaluates it on
the server's test split; ``configure_evaluate`` sends nothing (clients never evaluate).
So a Flower user can put a strategy in their own ServerApp::

    strategy = FedDM.create(["clients=10", "dataset=fashion_mnist"], run_dir="out/feddm")
    result = strategy.start(grid=grid, initial_arrays=strategy.arrays(), num_rounds=strategy.rounds)
    strategy.conclude()  # summary.json, the global model, plots and the random-subset control

fedistill's ServerApp drives the same methods in :meth:`Strategy.run_rounds`, its own small
loop that adds what Flower's lacks: round checkpoints and resume (:meth:`Strategy.state_dict`),
a windowed exchange with live progress (:mod:`strategies.exchange`), the summary and controls.

A strategy is a small class over :class:`Strategy`: it says what a round sends
(:meth:`Strategy.configure`, :meth:`Strategy.round_inputs`), what happens before (
:meth:`Strategy.open_round`: a second exchange, a secure sum, a DP reservation), which
replies it accepts (:meth:`Strategy.accept`) and how it updates the global model from
them (:meth:`Strategy.update`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedistill.data.base import DataBundle
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import resolve_device
from fedistill.federated import ClientFailure, FederationError, GlobalModel
from fedistill.federated.client import model_spec
from fedistill.federated.defenses import check_defense
from fedistill.federated.server import state_problem
from fedistill.registry import Registry
from fedistill.reporting import RunDir
from fedistill.training import EvalRecipe
from strategies.exchange import Reply, RoundState, Transport
from strategies.lifecycle import Lifecycle
from strategies.planning import ClientPlanning, client_order

__all__ = ["STRATEGIES", "Reply", "RoundState", "Strategy", "register_strategy"]

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
register_strategy = STRATEGIES.register


class Strategy(Lifecycle, Transport, ClientPlanning, FlowerStrategy):
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
        self._round: RoundState | None = None
        self._bars: Any = None
        self.history: list[dict[str, Any]] = []
        self.defense_options = dict(cfg["defense"])  # the defense group (simulate.yaml: none)
        self.defense_name = str(self.defense_options.pop("name"))
        self.defense = check_defense(self.defense_name, self.name, self.defense_acts_on)
        if self.device.type == "cuda" and not float(cfg["client"]["num_gpus"]):  # client.device=cuda needs a share
            msg = "the server trains on CUDA but clients distill on the CPU; give them a GPU share: client.num_gpus=0.1"
            print(f"fedistill: warning: {msg}")
            run.log("warning", message=msg)

    @classmethod
    def create(cls, overrides: Sequence[str] = (), *, run_dir: str | Path) -> Self:
        """This strategy on the ``simulate`` config plus Hydra ``overrides``, validated, with its run directory.

        For a strategy in a user's own ServerApp (``strategy.start(grid=...)``); the config is
        checked before anything starts (:func:`fedistill.config.validate_config`).
        """
        from omegaconf import OmegaConf

        from fedistill.config import compose_config, validate_config
        from strategies.rundata import open_run

        cfg = compose_config("simulate", [f"strategy={cls.name}", *overrides])
        validate_config("simulate", cfg)
        run = RunDir(run_dir)
        run.write_config(OmegaConf.to_yaml(cfg))
        return cls(cfg, run, open_run(cfg, run))

    # ----------------------------------------------------------------- hooks
    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The round's task (shared part) and the arrays to send (e.g. global weights)."""
        raise NotImplementedError

    def round_inputs(self, round_: int) -> dict[str, torch.Tensor] | None:
        """Engine inputs the round's messages carry as their ``inputs`` record (none by default)."""
        return None

    def open_round(self, grid: Grid, state: RoundState) -> list[int]:
        """What happens before the round's messages go out; returns the nodes that get them.

        The default sends to every sampled node. A strategy with a second exchange per round
        (FedAF's statistics), a secure sum (SecAgg+) or a reservation (Flower's DP wrapper)
        does it here, adding what it gathered to ``state``.
        """
        return state.nodes

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Validate replies; return the accepted ones and a failure per rejected one."""
        return replies, []

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Update the global model from accepted replies; return extra round metrics."""
        raise NotImplementedError

    def describe(self, syn: SyntheticSet) -> None:
        """Record what a set saved by this run is: dataset, strategy, IPC and the model it trains
        (``fedistill evaluate`` evaluates with that model unless told otherwise)."""
        syn.metadata.update(
            dataset=self.bundle.info.name, strategy=self.name, ipc=int(self.cfg["ipc"]), model=dict(self.cfg["model"])
        )

    def round_message_type(self, round_: int) -> str:
        """The message type of ``round_``'s tasks (:attr:`message_type`; a phased strategy overrides this)."""
        return self.message_type

    # ------------------------------------------------ Flower's Strategy API
    def summary(self) -> None:
        """Log the strategy's configuration (Flower calls this when :meth:`start` begins)."""
        log = logging.getLogger("flwr")
        log.info("\t├── fedistill strategy=%s method=%s", self.name, self.cfg["method"]["name"])
        log.info("\t├── dataset=%s clients=%s ipc=%s", self.bundle.info.name, self.cfg["clients"], self.cfg["ipc"])
        log.info("\t└── seed=%s run directory %s", self.seed, self.run.path)

    def arrays(self) -> ArrayRecord:
        """The global model's weights, as Flower's ``initial_arrays`` and what ``aggregate_train`` returns."""
        return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in self.global_model.state.items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's clients, run :meth:`open_round`, and build one message per target node.

        ``arrays``, when not empty, replace the global model's weights first (Flower passes
        the last aggregate; fedistill's own loop passes an empty record). The tasks come from
        the strategy's config; ``config`` (Flower's ``train_config``) rides beside each task in
        the message's ``config`` record, as Flower's own strategies send it, for a user's mods.

        Raises
        ------
        ValueError
            When ``config`` has a ``task`` key (the record's key for fedistill's task).
        """
        if "task" in config:
            raise ValueError("train_config key 'task' is reserved for fedistill's client task; rename that key")
        self.connect(grid)
        if len(arrays):
            self.load_arrays(arrays)
        nodes = self.sample(server_round)
        state = self._round = RoundState(server_round, nodes, time.perf_counter())
        state.targets = self.open_round(grid, state)
        if not state.targets:
            return []
        task, weights = self.configure(server_round)
        msgs, down = self.messages(
            server_round,
            state.targets,
            self.round_message_type(server_round),
            task,
            weights,
            self.round_inputs(server_round),
            config=dict(config),
        )
        state.down += down
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, update and evaluate the global model; its weights and the round's metrics."""
        state = self._round
        if state is None or state.round != server_round:
            raise FederationError(f"aggregate_train({server_round}) without configure_train({server_round})")
        got, failures, up = self.collect(state.targets, list(replies))
        state.replies += got
        state.failures += failures
        state.up += up
        rec = self.close_round(state)
        self._round = None
        return self.arrays(), MetricRecord(_scalars(rec))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client evaluates: the server evaluates the global model on its test split in ``aggregate_train``."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def load_arrays(self, arrays: ArrayRecord) -> None:
        """Replace the global model's weights with ``arrays`` (refused when keys or shapes differ)."""
        state = arrays.to_torch_state_dict()
        problem = state_problem(state, self.global_model.state)
        if problem:
            raise FederationError(f"initial_arrays do not fit the global model ({problem}); pass strategy.arrays()")
        self.global_model.state = {k: v.to(self.global_model.state[k].dtype) for k, v in state.items()}

    def run_round(self, grid: Grid, round_: int) -> dict[str, Any]:
        """One round through Flower's Strategy methods: configure, exchange (windowed), aggregate; its record."""
        msgs = list(self.configure_train(round_, ArrayRecord(), ConfigRecord(), grid))
        self.aggregate_train(round_, self.transmit(grid, round_, msgs))
        return self.history[-1]

    def close_round(self, state: RoundState) -> dict[str, Any]:
        """Accept, check, update, evaluate and log a round whose replies are all in ``state``; its record."""
        round_, nodes = state.round, state.nodes
        t_exchange = time.perf_counter()
        replies = sorted(state.replies, key=lambda r: client_order(r.client))
        accepted, rejected = self.accept(round_, replies)
        t_accept = time.perf_counter()
        failures = state.failures + rejected
        if state.watch is not None:  # the live count's last word: every failure of the round
            state.watch.settle(len(failures))
        self.bytes_up += state.up
        self.bytes_down += state.down
        self.failed_total += len(failures)
        rec: dict[str, Any] = {
            "round": round_,
            "clients_sampled": len(nodes),
            "clients_succeeded": len(accepted),
            "clients_failed": len(failures),
            "failures": [f.to_dict() for f in failures],
            "bytes_up": state.up,
            "bytes_down": state.down,
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
            seconds=round(time.perf_counter() - state.t0, 3),
            # where the round's time went: messages out and back (client work, Ray, serialization),
            # decoding and validating replies, the strategy's update (server training), evaluation
            timing={
                "exchange": round(t_exchange - state.t0, 3),
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
