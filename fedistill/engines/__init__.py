"""Distillation engines: registry and implementations."""

from fedistill.engines import dm, dm_hom, dp, dp_gm, fedaf, feddm, gen, gm, mtt, rded, sre2l  # noqa: F401  (registration)
from fedistill.engines.base import (
    ENGINES,
    DistillRequest,
    Engine,
    build_engine,
    register_engine,
    resolve_device,
)

__all__ = ["ENGINES", "DistillRequest", "Engine", "build_engine", "register_engine", "resolve_device"]
