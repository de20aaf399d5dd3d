"""Server state <-> one checkpoint: a codec for the values strategies keep between rounds.

:func:`pack` turns a value into JSON plus named tensors: tensors, synthetic sets,
dicts, lists, tuples, JSON scalars, and objects with ``state_dict()`` (ledgers,
accountants). :func:`unpack` reverses it; an object with ``load_state_dict`` is
restored in place (the strategy already built it with the right configuration).
"""

from __future__ import annotations

from typing import Any

import torch

from fedistill.data.base import DatasetInfo
from fedistill.data.synthetic import SyntheticSet

__all__ = ["get_path", "pack", "set_path", "unpack"]


def pack(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON form of ``value``; its tensors are added to ``tensors`` under keys starting with ``prefix``."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(value, SyntheticSet):
        out = {"info": value.info.to_dict(), "metadata": value.metadata}
        for name in ("images", "labels", "soft_labels"):
            t = getattr(value, name)
            out[name] = None if t is None else pack(t, tensors, f"{prefix}.{name}")
        return {"__synthetic__": out}
    if isinstance(value, tuple):
        return {"__tuple__": [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"__dict__": {str(k): pack(v, tensors, f"{prefix}.{k}") for k, v in value.items()}}
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return {"__state__": pack(value.state_dict(), tensors, prefix)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {prefix!r}")


def unpack(data: Any, tensors: dict[str, torch.Tensor], current: Any = None) -> Any:
    """Rebuild a value packed by :func:`pack`; ``current`` is restored in place when it has ``load_state_dict``."""
    if isinstance(data, list):
        return [unpack(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        if data["__tensor__"] not in tensors:
            raise ValueError(f"checkpoint entry names tensor {data['__tensor__']!r}, which the file does not hold")
        return tensors[data["__tensor__"]]
    if "__tuple__" in data:
        return tuple(unpack(v, tensors) for v in data["__tuple__"])
    if "__dict__" in data:
        return {k: unpack(v, tensors) for k, v in data["__dict__"].items()}
    if "__synthetic__" in data:
        d = data["__synthetic__"]
        parts = {k: None if d[k] is None else unpack(d[k], tensors) for k in ("images", "labels", "soft_labels")}
        info = DatasetInfo.from_dict(d["info"])
        return SyntheticSet(parts["images"], parts["labels"], info, parts["soft_labels"], metadata=d["metadata"])
    if "__state__" in data:
        state = unpack(data["__state__"], tensors)
        if current is None:
            raise ValueError("a checkpointed object needs an instance to load its state into")
        current.load_state_dict(state)
        return current
    raise ValueError(f"unknown checkpoint entry with keys {sorted(data)}")


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path="a.b"``."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    """Set ``obj.a.b = value`` for ``path="a.b"``."""
    *head, last = path.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)
