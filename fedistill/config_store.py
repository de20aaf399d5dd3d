"""The code defaults of the selectable groups, registered in Hydra's ConfigStore: stated once.

An engine's options and their defaults are its config dataclass (:class:`~fedistill.engines.dm_config.DMConfig`
for ``method=dm``); a policy's or a defence's are the keyword-only parameters of its function
(:func:`fedistill.federated.policies.screen`). :func:`register_defaults` stores each of them in
Hydra's ConfigStore as ``defaults/<group>/<name>``, and the group's YAML option extends it::

    # configs/method/dm.yaml
    defaults:
      - /defaults/method/dm@_here_
      - _self_

so the YAML tree holds only what a user picks beyond the code (a dataset's or a preset's
choice, a federated client's budget), while every key still exists for an override
(``method.iterations=50``) and Hydra's struct mode still refuses an unknown one. A group whose
option has no code behind it (Flower's ``krum``'s ``krum_malicious``) states its value in its
YAML, once.

Registering imports the engines, policies and defences (torch); :mod:`fedistill.config` calls it
when it composes, never at import.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["GROUP", "engine_defaults", "function_defaults", "group_defaults", "register_defaults"]

GROUP = "defaults"
"""The ConfigStore group prefix: ``defaults/method/dm`` holds ``DMConfig``'s defaults."""

# fields an engine config gets from other groups (the model group), not from the method group
_FROM_OTHER_GROUPS = frozenset({"model", "model_kwargs"})


def _plain(value: Any) -> Any:
    """A default as OmegaConf stores it: tuples as lists, containers copied."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def engine_defaults(name: str) -> dict[str, Any]:
    """``method=<name>``'s options: ``name`` and every field of the engine's config with its default."""
    from fedistill.engines import ENGINES

    out: dict[str, Any] = {"name": name}
    for f in dataclasses.fields(ENGINES.get(name).Config):
        if f.name in _FROM_OTHER_GROUPS:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out[f.name] = _plain(default)
    return out


def function_defaults(name: str, *fns: Callable[..., Any] | None) -> dict[str, Any]:
    """A policy's or defence's options: ``name`` and the keyword-only parameters of its functions."""
    out: dict[str, Any] = {"name": name}
    for fn in fns:
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                out[p.name] = _plain(p.default)
    return out


def group_defaults() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every ``(group, option, defaults)`` the code states: engines, policies, defences, and the
    training recipe (``defaults/eval/recipe``: :class:`~fedistill.training.EvalRecipe`, which the
    ``eval`` group and the strategies' ``server`` block extend)."""
    from fedistill.engines import ENGINES
    from fedistill.federated.defenses import DEFENSES
    from fedistill.federated.policies import POLICIES
    from fedistill.training import EvalRecipe

    yield "eval", "recipe", _plain(dataclasses.asdict(EvalRecipe()))

    for name in ENGINES.names():
        yield "method", name, engine_defaults(name)
    for name in POLICIES.names():
        yield "policy", name, function_defaults(name, POLICIES.get(name))
    for name in DEFENSES.names():
        yield "defense", name, function_defaults(name, DEFENSES.get(name).sets)


def register_defaults() -> None:
    """Store :func:`group_defaults` in Hydra's ConfigStore as ``defaults/<group>/<option>``
    (again at every call: an engine registered since is included)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, node in group_defaults():
        store.store(group=f"{GROUP}/{group}", name=name, node=node)
