"""Nested mappings as dotted keys (``{"method": {"iterations": 5}}`` -> ``{"method.iterations": 5}``).

Torch-free and Flower-free: the config checks, the tracker and the report all use it before
(or without) any heavy import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["flatten_mapping"]


def flatten_mapping(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a resolved config) as dotted keys; an empty group stays ``{}`` under its key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= flatten_mapping(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
