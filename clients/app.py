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
from collections.abc import Callable, Sequence

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

__all__ = ["CLIENT_ERROR", "app", "client_app"]

CLIENT_ERROR = 1001
"""Error code of a handler that raised (the reason carries the exception)."""

LEDGER = "privacy-ledger"
"""Node state record holding the node's cumulative DP ledger (DP engines)."""


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # one failing client must never kill a run: report why
            where = traceback.extract_tb(err.__traceback__)[-1]
            reason = f"{type(err).__name__}: {err} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=msg)
        finally:  # a GPU client keeps no cached blocks between tasks (other actors share the device)
            release_gpu_cache()

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def _task(msg: Message, context: Context) -> tuple[dict, Split]:
    """The task with the node's limits applied, and the node's data."""
    task = node_task(context.node_config, read_json(msg))
    return task, node_split(context.node_config, task["data"])


def _done(metrics: dict, context: Context) -> dict:
    metrics.update({"partition-id": _partition_id(context), **footprint()})
    return metrics


def _ledger(context: Context) -> dict | None:
    """The node's own cumulative DP ledger (``None`` before its first DP release)."""
    saved = context.state.config_records.get(LEDGER)
    return json.loads(str(saved["json"])) if saved else None


def _keep_ledger(context: Context, privacy: dict) -> None:
    context.state[LEDGER] = ConfigRecord({"json": json.dumps(privacy["ledger"])})


@_guard
def info(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id."""
    return reply(msg, metrics=metrics_record({"partition-id": _partition_id(context)}))


@_guard
def stats(msg: Message, context: Context) -> Message:
    """FedAF's class statistics of the global weights on the node's data."""
    task, split = _task(msg, context)
    tensors, metrics = stats_task(split, read_tensors(msg.content.array_records["global"]), task)
    _done(metrics, context)
    return reply(msg, stats=tensor_record(tensors), metrics=metrics_record(metrics))


@_guard
def release(msg: Message, context: Context) -> Message:
    """``strategy=dp_stats``: noisy class sums for the shared releases; the node keeps its ledger."""
    task, split = _task(msg, context)
    tensors, privacy, metrics = release_task(split, task, ledger_state=_ledger(context))
    _keep_ledger(context, privacy)
    _done(metrics, context)
    arrays = tensor_record(tensors)
    metrics["bytes"] = arrays.count_bytes()
    return reply(
        msg,
        release=arrays,
        meta=ConfigRecord({"json": json.dumps({"privacy": privacy}, default=str)}),
        metrics=metrics_record(metrics),
    )


@_guard
def secure_release(msg: Message, context: Context) -> Message:
    """``dp_stats`` under SecAgg+: the release, divided by the task's ``secure_scale``, goes out masked."""
    task = node_task(context.node_config, json.loads(str(msg.content.config_records["fitins.config"]["task"])))
    split = node_split(context.node_config, task["data"])
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


@_guard
def distill(msg: Message, context: Context) -> Message:
    """Distill the node's data; reply with the synthetic set (and FedAF's class statistics when asked)."""
    t0 = time.perf_counter()
    task, split = _task(msg, context)
    data_seconds = time.perf_counter() - t0
    records = msg.content.array_records
    base = read_tensors(records["global"]) if "global" in records else None
    inputs = read_tensors(records["inputs"]) if "inputs" in records else None
    syn, metrics = distill_task(split, task, base_state=base, inputs=inputs, ledger_state=_ledger(context))
    metrics["data_seconds"] = round(data_seconds, 4)  # loading the node's data (cached per Ray actor after the first)
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
    arrays = tensor_record(tensors)
    metrics["bytes"] = arrays.count_bytes()
    return reply(
        msg,
        synthetic=arrays,
        meta=ConfigRecord({"json": json.dumps(meta, default=str)}),
        metrics=metrics_record(metrics),
        **records,
    )


@_guard
def fit(msg: Message, context: Context) -> Message:
    """Local SGD from the global weights; reply with the new weights."""
    task, split = _task(msg, context)
    state, metrics = fit_task(split, read_tensors(msg.content.array_records["global"]), task)
    return reply(msg, model=tensor_record(state), metrics=metrics_record(_done(metrics, context)))


@_guard
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on the node's data."""
    task, split = _task(msg, context)
    metrics = evaluate_task(split, read_tensors(msg.content.array_records["global"]), task)
    return reply(msg, metrics=metrics_record(_done(metrics, context)))


@_guard
def generator(msg: Message, context: Context) -> Message:
    """Train the global generator locally; reply with its weights."""
    task, split = _task(msg, context)
    state, metrics = generator_task(split, read_tensors(msg.content.array_records["global"]), task)
    return reply(msg, model=tensor_record(state), metrics=metrics_record(_done(metrics, context)))


@_guard
def latents(msg: Message, context: Context) -> Message:
    """Optimize latent codes through the given generator; reply with latents and labels."""
    task, split = _task(msg, context)
    tensors, meta, metrics = latent_task(split, read_tensors(msg.content.array_records["global"]), task)
    _done(metrics, context)
    if tensors is None:  # no class with enough samples: succeed with nothing to contribute
        return reply(msg, metrics=metrics_record(metrics))
    arrays = tensor_record(tensors)
    metrics["bytes"] = arrays.count_bytes()
    return reply(
        msg,
        latents=arrays,
        meta=ConfigRecord({"json": json.dumps(meta, default=str)}),
        metrics=metrics_record(metrics),
    )


HANDLERS: tuple[tuple[str, str, Callable[[Message, Context], Message], tuple[Mod, ...]], ...] = (
    ("query", "info", info, ()),
    ("query", "stats", stats, ()),
    ("query", "release", release, ()),
    ("train", "default", secure_release, (secaggplus_mod,)),
    ("train", "distill", distill, ()),
    ("train", "fit", fit, ()),
    ("evaluate", "default", evaluate, ()),
    ("train", "generator", generator, ()),
    ("train", "latents", latents, ()),
)
"""(message category, action, handler, the handler's own mods): every message type the ClientApp answers."""


def client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp answering :data:`HANDLERS`, with ``mods`` around every handler.

    The production app (:data:`app`) has none; the simulation adds fault injection
    (``clients.simulation:app``), so that production code never branches on a fault.
    """
    new = ClientApp(mods=list(mods))
    for category, action, handler, own in HANDLERS:
        getattr(new, category)(action, mods=list(own))(handler)
    return new


app = client_app()
"""The ClientApp that SuperNodes run (``[tool.flwr.app.components] clientapp``)."""
