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

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.app import error_reply, planned_task
from fedistill.data import dataset_info
from fedistill.federated.faults import BEFORE_WORK, PAYLOAD_FAULTS, InjectedFault
from protocol.records import metrics_record, read_metrics, read_tensors, tensor_record

__all__ = ["fault_mod", "replace_payload"]


def replace_payload(reply: Message, record: str, tensors: Mapping[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    """Put ``tensors`` in the reply's ``record`` and ``metrics`` in its ``metrics``, recounting
    ``bytes`` and ``rows`` as the handler counts them."""
    arrays = tensor_record(tensors)
    if "bytes" in metrics:
        metrics["bytes"] = arrays.count_bytes()
    if "rows" in metrics:
        metrics["rows"] = len(next(iter(tensors.values())))
    reply.content[record] = arrays
    reply.content["metrics"] = metrics_record(metrics)


def _corrupt(reply: Message, msg_type: str, kind: str, task: dict[str, Any]) -> None:
    """Apply fault ``kind`` to the reply's payload record, in place (nothing when it has none)."""
    record, registry = PAYLOAD_FAULTS[msg_type]
    arrays = reply.content.array_records.get(record)
    if arrays is None:  # nothing to contribute: nothing to corrupt
        return
    num_classes = dataset_info(task["data"]["dataset"]).num_classes  # the run's dataset: no data to load
    tensors, metrics = registry.get(kind)(read_tensors(arrays), read_metrics(reply), num_classes)
    replace_payload(reply, record, tensors, metrics)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Act out the task's ``fault`` around the handler (see the module docstring)."""
    task = planned_task(msg)
    kind = None if task is None else task.get("fault")  # absent on every client without a planned fault
    if kind is None:
        return call_next(msg, context)
    if kind == "crash":
        err = InjectedFault("injected crash (fault=crash)")
        return error_reply(msg, f"{type(err).__name__}: {err}")
    if kind in BEFORE_WORK:
        time.sleep(float(task["fault_seconds"]))  # the server sets it with slow and timeout
    reply = call_next(msg, context)
    if kind in BEFORE_WORK or reply.has_error() or msg.metadata.message_type not in PAYLOAD_FAULTS:
        return reply
    try:
        _corrupt(reply, msg.metadata.message_type, kind, task)
    except Exception as err:  # a fault that cannot apply is the client's error, never the run's
        return error_reply(msg, f"{type(err).__name__}: {err}")
    return reply
