"""Flower run config -> the ServerApp's Hydra overrides (``[tool.flwr.app.config]`` in pyproject.toml).

Every key of the run config is a Hydra override of the ``simulate`` config
(``strategy``, ``method.iterations`` ...), except the deployment keys in
:data:`DEPLOY_KEYS`. An empty string keeps the Hydra default, so pyproject.toml can
list a key (Flower only accepts overrides of keys it lists) without pinning it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DEPLOY_KEYS", "NODE_DATA", "hydra_overrides"]

DEPLOY_KEYS = ("run-dir", "node-data")
"""Run-config keys that are not Hydra overrides: the results directory and where nodes get data."""

NODE_DATA = ("own", "partition")
"""``own``: SuperNodes read ``--node-config data-path``; ``partition``: nodes carry partition-id/num-partitions."""


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and any(c in v for c in " ,:=[]{}'\"\\"):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def hydra_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides of a Flower run config (deployment keys and empty strings dropped).

    Examples
    --------
    >>> hydra_overrides({"strategy": "feddm", "rounds": "", "method.iterations": 20, "run-dir": "/tmp/r"})
    ['strategy=feddm', 'method.iterations=20']
    """
    return [f"{k}={_value(v)}" for k, v in run_config.items() if k not in DEPLOY_KEYS and v != ""]
