"""Codec between Flower records and fedistill's plain values (tasks, tensors, metrics).

The server sends a task as one JSON string in a ConfigRecord (``config["task"]``),
model weights as an ArrayRecord (``global``); clients reply with an ArrayRecord
(``synthetic`` or ``model``), a ConfigRecord (``meta``: the synthetic set's metadata
as JSON) and a MetricRecord (``metrics``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = [
    "as_flower_train_replies",
    "content_bytes",
    "metrics_record",
    "read_json",
    "read_metrics",
    "read_tensors",
    "reply",
    "task_content",
    "tensor_record",
]


def tensor_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of named CPU tensors."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def read_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Named tensors of an ArrayRecord."""
    return dict(record.to_torch_state_dict())


def task_content(
    task: Mapping[str, Any],
    arrays: Mapping[str, torch.Tensor] | ArrayRecord | None = None,
    inputs: Mapping[str, torch.Tensor] | ArrayRecord | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> RecordDict:
    """A message body: the task as JSON and, optionally, the global weights (``global``) and
    other server arrays for the client's engine (``inputs``, e.g. FedAF's global logits),
    each given as tensors or a built record. ``config`` entries (a Flower user's
    ``train_config``) ride beside the task in the ``config`` record; the handlers read only ``task``."""
    content = RecordDict({"config": ConfigRecord({**dict(config or {}), "task": json.dumps(task)})})
    for name, value in (("global", arrays), ("inputs", inputs)):
        if value is not None:
            content[name] = value if isinstance(value, ArrayRecord) else tensor_record(value)
    return content


def read_json(msg: Message, record: str = "config", key: str = "task") -> dict[str, Any]:
    """Decode a JSON string stored in a ConfigRecord of ``msg``."""
    return json.loads(str(msg.content.config_records[record][key]))


def metrics_record(metrics: Mapping[str, Any]) -> MetricRecord:
    """A MetricRecord from numbers and lists of numbers."""
    return MetricRecord({k: v for k, v in metrics.items() if v is not None})


def read_metrics(msg: Message) -> dict[str, Any]:
    """The ``metrics`` MetricRecord of a reply as a dict (empty when absent)."""
    rec = msg.content.metric_records.get("metrics")
    return dict(rec) if rec is not None else {}


def reply(msg: Message, **records: ArrayRecord | ConfigRecord | MetricRecord) -> Message:
    """A reply to ``msg`` carrying ``records``."""
    return Message(RecordDict(records), reply_to=msg)


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message body: array bytes plus the JSON size of config and metric records."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
        else:
            total += len(json.dumps(dict(rec), default=str))
    return total


def as_flower_train_replies(replies: list[Any], weights: list[float]) -> list[Message]:
    """Reshape fedistill's FedAvg replies (``model`` + ``metrics``) into what Flower's
    strategies aggregate: one ArrayRecord ``arrays`` and one MetricRecord ``{"weight": w}``.

    ``replies`` are the strategies' ``Reply`` objects (``.msg``: the reply message); their
    messages are changed in place.
    """
    for r, w in zip(replies, weights, strict=True):
        r.msg.content = RecordDict(
            {"arrays": r.msg.content.array_records["model"], "metrics": MetricRecord({"weight": w})}
        )
    return [r.msg for r in replies]
