"""Fault injection as a Flower mod, for the simulation's ClientApp only (``clients.simulation:app``).

The production handlers (``clients/app.py``) know nothing of faults. :func:`fault_mod` reads the
``fault`` the server planned into a task and acts it out around them:

- ``crash`` answers with an error reply before any work (under SecAgg+ that is a dropout in the
  stage that carries the task, after the key exchange);
- ``slow`` and ``timeout`` sleep ``fault_seconds`` first, then let the handler work;
- any other kind lets the handler work, then corrupts the payload record that
  :data:`fedistill.federated.faults.PAYLOAD_FAULTS` names for the message type.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.app import CLIENT_ERROR
from fedistill.federated import node_split
from fedistill.federated.faults import BEFORE_WORK, PAYLOAD_FAULTS, InjectedFault
from protocol.records import metrics_record, read_metrics, read_tensors, tensor_record

__all__ = ["fault_mod", "planned_task"]

TASK_RECORDS = ("config", "fitins.config")
"""Config records that may carry the task: a plain fedistill message, or SecAgg+'s stage with the fit instructions."""


def planned_task(msg: Message) -> dict[str, Any] | None:
    """The task a message carries (``None`` for messages without one, e.g. SecAgg+'s key exchange)."""
    records = msg.content.config_records
    for name in TASK_RECORDS:
        if name in records and "task" in records[name]:
            return json.loads(str(records[name]["task"]))
    return None


def _error(msg: Message, err: Exception) -> Message:
    return Message(Error(code=CLIENT_ERROR, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def _corrupt(reply: Message, msg_type: str, kind: str, task: dict[str, Any], context: Context) -> None:
    """Apply fault ``kind`` to the reply's payload record, in place (nothing when it has none)."""
    record, registry = PAYLOAD_FAULTS[msg_type]
    arrays = reply.content.array_records.get(record)
    if arrays is None:  # nothing to contribute: nothing to corrupt
        return
    num_classes = node_split(context.node_config, task["data"]).info.num_classes
    metrics = read_metrics(reply)
    tensors, metrics = registry.get(kind)(read_tensors(arrays), metrics, num_classes)
    arrays = tensor_record(tensors)
    if "bytes" in metrics:
        metrics["bytes"] = arrays.count_bytes()
    reply.content[record] = arrays
    reply.content["metrics"] = metrics_record(metrics)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Act out the task's ``fault`` around the handler (see the module docstring)."""
    task = planned_task(msg)
    kind = None if task is None else task.get("fault")  # absent on every client without a planned fault
    if kind is None:
        return call_next(msg, context)
    if kind == "crash":
        return _error(msg, InjectedFault("injected crash (fault=crash)"))
    if kind in BEFORE_WORK:
        time.sleep(float(task["fault_seconds"]))  # the server sets it with slow and timeout
    reply = call_next(msg, context)
    if kind in BEFORE_WORK or reply.has_error() or msg.metadata.message_type not in PAYLOAD_FAULTS:
        return reply
    try:
        _corrupt(reply, msg.metadata.message_type, kind, task, context)
    except Exception as err:  # a fault that cannot apply is the client's error, never the run's
        return _error(msg, err)
    return reply
