"""The fedistill ClientApp: message handlers that move records and call the library.

Handlers
--------
``query.info``
    This node's ``partition-id`` (simulation) so the server can order and sample
    clients deterministically; ``-1`` on a device with its own ``data-path``.
``train.distill``
    Distill this node's data with the engine named in the task; reply with the
    synthetic set (ArrayRecord ``synthetic``), its metadata and metrics. Raw data
    never leaves the node.
``query.stats``
    FedAF: class-wise mean logits and soft labels of the global weights on this
    node's real data (ArrayRecord ``stats``).
``query.release``
    ``strategy=dp_stats``: noisy per-class sums of clipped embeddings for the
    server's shared releases (ArrayRecord ``release``), accounted in the node's ledger.
``train`` (plain, through Flower's ``secaggplus_mod``)
    ``strategy=dp_stats strategy.secure_aggregation=true``: the same release, with this
    node's share of distributed noise, masked by SecAgg+ so the server learns only the
    sum over clients (the task arrives in ``fitins.config``, the reply is a legacy
    ``FitRes`` record; ``num_examples`` 1 makes Flower's average an exact sum).
``train.fit``
    Local SGD from the global weights (the FedAvg baseline); reply with the weights.
``train.generator``
    FedGen phase 1: local epochs of the global generator (ArrayRecord ``global``) on
    this node's data; reply with its weights (ArrayRecord ``model``).
``train.latents``
    FedGen phase 2: latent codes optimized through the given generator; reply with
    latents and labels only (ArrayRecord ``latents``), never pixels.
``evaluate``
    Accuracy and loss of the global weights on this node's data.

Any exception becomes an error reply whose reason names the problem; the server
logs it and the round goes on. On a device the node config's ``threads``, ``device``
and ``max-memory-mb`` bound the handler (:func:`fedistill.federated.node.node_task`);
every reply reports the process's ``peak_rss_mb`` and ``cpu_seconds``.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedistill.data.base import Split
from fedistill.federated import distill_task, encode_synthetic, evaluate_task, fit_task, node_split, stats_task
from fedistill.federated.client import release_task
from fedistill.federated.generator import generator_task, latent_task
from fedistill.federated.node import footprint, node_task, release_gpu_cache
from protocol.records import metrics_record, read_json, read_tensors, reply, tensor_record

__all__ = ["CLIENT_ERROR", "Handlers", "app", "client_app", "error_reply", "node_data", "planned_task"]

CLIENT_ERROR = 1001
"""Error code of a handler that raised (the reason carries the exception)."""

LEDGER = "privacy-ledger"
"""Node state record holding the node's cumulative DP ledger (DP engines)."""


TASK_RECORDS = ("config", "fitins.config")
"""Config records that may carry the task: a plain fedistill message, or SecAgg+'s stage with the fit instructions."""


def planned_task(msg: Message) -> dict[str, Any] | None:
    """The task a message carries (``None`` for messages without one, e.g. SecAgg+'s key exchange)."""
    records = msg.content.config_records
    for name in TASK_RECORDS:
        if name in records and "task" in records[name]:
            return read_json(msg, name)
    return None


def error_reply(msg: Message, reason: str) -> Message:
    """The error reply to ``msg``: the server logs ``reason`` and the round goes on."""
    return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=msg)


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # one failing client must never kill a run: report why
            where = traceback.extract_tb(err.__traceback__)[-1]
            reason = f"{type(err).__name__}: {err} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            return error_reply(msg, reason)
        finally:  # a GPU client keeps no cached blocks between tasks (other actors share the device)
            release_gpu_cache()

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


WeightsTask = Callable[[Split, dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]]
"""``work(split, global_state, task) -> (state, metrics)``: FedAvg's local fit, FedGen's generator epochs."""

DataLoader = Callable[[Mapping[str, Any], Mapping[str, Any]], Split]
"""``load(node_config, task) -> Split``: where a handler gets this node's data."""


def node_data(node_config: Mapping[str, Any], task: Mapping[str, Any]) -> Split:
    """This node's data for ``task`` (its partition in simulation, its own file on a device)."""
    return node_split(node_config, task["data"])


def _done(metrics: dict, context: Context) -> dict:
    metrics.update({"partition-id": _partition_id(context), **footprint()})
    return metrics


def _ledger(context: Context) -> dict | None:
    """The node's own cumulative DP ledger (``None`` before its first DP release)."""
    saved = context.state.config_records.get(LEDGER)
    return json.loads(str(saved["json"])) if saved else None


def _keep_ledger(context: Context, privacy: dict) -> None:
    context.state[LEDGER] = ConfigRecord({"json": json.dumps(privacy["ledger"])})


def _payload_reply(
    msg: Message, name: str, tensors: dict, meta: dict, metrics: dict, **records: ArrayRecord
) -> Message:
    """A reply carrying the payload ``tensors`` as record ``name``, its ``meta`` and ``metrics`` (with ``bytes``)."""
    arrays = tensor_record(tensors)
    metrics["bytes"] = arrays.count_bytes()
    meta_record = ConfigRecord({"json": json.dumps(meta, default=str)})
    return reply(msg, **{name: arrays}, meta=meta_record, metrics=metrics_record(metrics), **records)


class Handlers:
    """The message handlers, reading the node's data through ``load``.

    Parameters
    ----------
    load
        ``load(node_config, task) -> Split``: this node's data for a task
        (:func:`node_data`; the simulation's ClientApp poisons it for planned attackers).
    """

    def __init__(self, load: DataLoader = node_data) -> None:
        self.load = load

    def task(self, msg: Message, context: Context) -> tuple[dict, Split]:
        """The task with the node's limits applied, and the node's data."""
        task = node_task(context.node_config, read_json(msg))
        return task, self.load(context.node_config, task)

    def info(self, msg: Message, context: Context) -> Message:
        """Reply with this node's partition id."""
        return reply(msg, metrics=metrics_record({"partition-id": _partition_id(context)}))

    def stats(self, msg: Message, context: Context) -> Message:
        """FedAF's class statistics of the global weights on the node's data."""
        task, split = self.task(msg, context)
        tensors, metrics = stats_task(split, read_tensors(msg.content.array_records["global"]), task)
        _done(metrics, context)
        return reply(msg, stats=tensor_record(tensors), metrics=metrics_record(metrics))

    def release(self, msg: Message, context: Context) -> Message:
        """``strategy=dp_stats``: noisy class sums for the shared releases; the node keeps its ledger."""
        task, split = self.task(msg, context)
        tensors, privacy, metrics = release_task(split, task, ledger_state=_ledger(context))
        _keep_ledger(context, privacy)
        _done(metrics, context)
        return _payload_reply(msg, "release", tensors, {"privacy": privacy}, metrics)

    def secure_release(self, msg: Message, context: Context) -> Message:
        """``dp_stats`` under SecAgg+: the release, divided by the task's ``secure_scale``, goes out masked."""
        raw = planned_task(msg)
        if raw is None:
            raise ValueError("the secure release's task is missing from 'fitins.config'")
        task = node_task(context.node_config, raw)
        split = self.load(context.node_config, task)
        tensors, privacy, metrics = release_task(split, task, ledger_state=_ledger(context))
        _keep_ledger(context, privacy)
        _done(metrics, context)
        vector = (tensors["sums"].double() / float(task["secure_scale"])).numpy()
        # values beyond SecAgg+'s clipping range would be clipped silently: say how many
        metrics["secure_clipped"] = int((abs(vector) > float(task["secure_range"])).sum())
        content = RecordDict(
            {
                "fitres.parameters": ArrayRecord({"sums": Array(vector)}),
                "fitres.num_examples": MetricRecord({"num_examples": 1}),
                "fitres.metrics": ConfigRecord({"privacy": json.dumps(privacy, default=str), **metrics}),
                "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            }
        )
        return Message(content, reply_to=msg)

    def distill(self, msg: Message, context: Context) -> Message:
        """Distill the node's data; reply with the synthetic set (and FedAF's class statistics when asked)."""
        t0 = time.perf_counter()
        task, split = self.task(msg, context)
        data_seconds = time.perf_counter() - t0
        records = msg.content.array_records
        base = read_tensors(records["global"]) if "global" in records else None
        inputs = read_tensors(records["inputs"]) if "inputs" in records else None
        syn, metrics = distill_task(split, task, base_state=base, inputs=inputs, ledger_state=_ledger(context))
        metrics["data_seconds"] = round(data_seconds, 4)  # cached per Ray actor after the first
        _done(metrics, context)
        if syn is not None and "privacy" in syn.metadata:  # the node keeps its own cumulative ledger
            _keep_ledger(context, syn.metadata["privacy"])
        records = {}
        if "stats_temperature" in task:  # FedAF with stats_exchange=piggyback: class statistics ride along
            if base is None:
                raise ValueError("class statistics need the global model ('global' record)")
            stats_tensors, _ = stats_task(split, base, {**task, "temperature": task["stats_temperature"]})
            records["stats"] = tensor_record(stats_tensors)
        if syn is None:  # no class with enough samples: succeed with nothing to contribute
            return reply(msg, metrics=metrics_record(metrics), **records)
        tensors, meta = encode_synthetic(syn)
        return _payload_reply(msg, "synthetic", tensors, meta, metrics, **records)

    def _weights(self, msg: Message, context: Context, work: WeightsTask) -> Message:
        """Run ``work`` from the global weights on the node's data; reply with the new weights."""
        task, split = self.task(msg, context)
        state, metrics = work(split, read_tensors(msg.content.array_records["global"]), task)
        return reply(msg, model=tensor_record(state), metrics=metrics_record(_done(metrics, context)))

    def fit(self, msg: Message, context: Context) -> Message:
        """Local SGD from the global weights; reply with the new weights."""
        return self._weights(msg, context, fit_task)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Evaluate the global weights on the node's data."""
        task, split = self.task(msg, context)
        metrics = evaluate_task(split, read_tensors(msg.content.array_records["global"]), task)
        return reply(msg, metrics=metrics_record(_done(metrics, context)))

    def generator(self, msg: Message, context: Context) -> Message:
        """Train the global generator locally; reply with its weights."""
        return self._weights(msg, context, generator_task)

    def latents(self, msg: Message, context: Context) -> Message:
        """Optimize latent codes through the given generator; reply with latents and labels."""
        task, split = self.task(msg, context)
        tensors, meta, metrics = latent_task(split, read_tensors(msg.content.array_records["global"]), task)
        _done(metrics, context)
        if tensors is None:  # no class with enough samples: succeed with nothing to contribute
            return reply(msg, metrics=metrics_record(metrics))
        return _payload_reply(msg, "latents", tensors, meta, metrics)


HANDLERS: tuple[tuple[str, str, str, tuple[Mod, ...]], ...] = (
    ("query", "info", "info", ()),
    ("query", "stats", "stats", ()),
    ("query", "release", "release", ()),
    ("train", "default", "secure_release", (secaggplus_mod,)),
    ("train", "distill", "distill", ()),
    ("train", "fit", "fit", ()),
    ("evaluate", "default", "evaluate", ()),
    ("train", "generator", "generator", ()),
    ("train", "latents", "latents", ()),
)
"""(message category, action, :class:`Handlers` method, the handler's own mods): every message type
the ClientApp answers."""


def client_app(*, mods: Sequence[Mod] = (), load: DataLoader = node_data) -> ClientApp:
    """A ClientApp answering :data:`HANDLERS`, with ``mods`` around every handler and ``load`` as its data.

    The production app (:data:`app`) has neither; the simulation adds fault and attack injection
    (``clients.simulation:app``), so that production code never branches on a fault or an attack.
    """
    new, handlers = ClientApp(mods=list(mods)), Handlers(load)
    for category, action, name, own in HANDLERS:
        getattr(new, category)(action, mods=list(own))(_guard(getattr(handlers, name)))
    return new


app = client_app()
"""The ClientApp that SuperNodes run (``[tool.flwr.app.components] clientapp``)."""
