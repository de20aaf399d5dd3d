"""A secure sum over clients with Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

Flower 1.42 ships SecAgg+ only on its legacy surface: the server workflow needs a
:class:`~flwr.server.LegacyContext` with a legacy :class:`~flwr.server.strategy.Strategy`
and client manager, and the client mod acts on plain ``train`` messages whose reply is a
legacy ``FitRes`` record. :func:`secure_sum` builds that context around the run's grid and
a :class:`_SumStrategy` that sends each sampled node its own task (in ``fitins.config``)
and keeps what the protocol hands back. The strategy only ever receives the unmasked
*aggregate*: every client weighs 1 (``num_examples == max_weight == 1``), so Flower's
weighted average times the number of summed clients is the exact sum (up to the
quantization step). Values are divided by ``scale`` before masking so they stay inside
``clipping_range`` (Flower clips silently outside it). See ``docs/secure-aggregation.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from protocol.records import content_bytes

__all__ = ["CLIPPING_RANGE", "SecureSum", "quantization_steps", "secure_sum", "survivors_needed"]

#: SecAgg+ clips every (scaled) value to +-CLIPPING_RANGE and quantizes that range into at most
#: QUANTIZATION_RANGE steps; the masked sum of n clients lives modulo MODULUS_RANGE, so
#: n * steps < MODULUS_RANGE (fewer steps above 1023 clients).
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


@dataclass
class SecureSum:
    """What the server learned from one SecAgg+ round: the sum, whose it is, and the clients' plaintext metadata."""

    total: np.ndarray | None
    nodes: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    seen: list[list[np.ndarray]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0


def quantization_steps(clients: int) -> int:
    """Quantization levels for ``clients``: :data:`QUANTIZATION_RANGE`, fewer where their sum would wrap."""
    return min(QUANTIZATION_RANGE, (MODULUS_RANGE - 1) // max(1, clients))


def survivors_needed(sampled: int, fraction: float) -> int:
    """The SecAgg+ reconstruction threshold: at least ``fraction`` of the sampled clients, and 2."""
    return max(2, math.ceil(fraction * sampled))


class _SumStrategy(LegacyStrategy):
    """The legacy strategy SecAgg+ drives: per-node tasks out, the unmasked aggregate in."""

    def __init__(self, proxies: list[GridClientProxy], tasks: dict[int, dict[str, Any]], out: SecureSum) -> None:
        self.proxies, self.tasks, self.out = proxies, tasks, out

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, FitIns]]:
        empty = Parameters(tensors=[], tensor_type="")
        return [(p, FitIns(empty, {"task": json.dumps(self.tasks[p.node_id])})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        n = len(results)
        arrays = [parameters_to_ndarrays(res.parameters) for _, res in results]
        self.out.seen = arrays  # what this server code was handed: n copies of the aggregate, never a client's own
        self.out.total = arrays[0][0].astype(np.float64) * n
        self.out.nodes = sorted(proxy.node_id for proxy, _ in results)
        self.out.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}

    def configure_evaluate(self, *args: Any) -> list:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class _CountingGrid:
    """The run's grid, counting the bytes of every message SecAgg+ sends and receives."""

    def __init__(self, grid: Grid, out: SecureSum) -> None:
        self._grid, self._out = grid, out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        self._out.bytes_down += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._out.bytes_up += sum(content_bytes(r.content) for r in replies if not r.has_error())
        return replies


def secure_sum(grid: Grid, tasks: dict[int, dict[str, Any]], *, threshold: int, timeout: float) -> SecureSum:
    """Sum the clients' vectors with SecAgg+; the server learns only the sum (and per-client metrics).

    Parameters
    ----------
    tasks
        Node id -> that client's task (sent as JSON in ``fitins.config["task"]``).
    threshold
        Reconstruction threshold: the protocol completes only while at least this many
        clients are alive; fewer halt it (``total is None``).
    timeout
        Seconds each of the four stages waits for replies.
    """
    out = SecureSum(total=None)
    counting = _CountingGrid(grid, out)
    proxies = [GridClientProxy(node_id=n, grid=counting, run_id=grid.run.run_id) for n in tasks]  # type: ignore[arg-type]
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, ServerConfig(num_rounds=1), _SumStrategy(proxies, tasks, out), manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=len(tasks),
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=CLIPPING_RANGE,
        quantization_range=quantization_steps(len(tasks)),
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(counting, ctx)  # type: ignore[arg-type]
    out.dropped = sorted(set(tasks) - set(out.nodes))
    return out
