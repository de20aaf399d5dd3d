"""Typed, validated configuration: composed from the Hydra tree, checked before anything starts.

:func:`compose_config` resolves a config of the tree (``configs/``, shipped as
``fedistill/_configs``) with Hydra overrides, without running a job. :func:`validate_config`
checks a composed config against the typed schema of its command (:data:`SCHEMAS`: frozen
dataclasses whose fields carry their type and allowed range, checked by the machinery of
:mod:`fedistill.schema`) and returns the typed view; a bad value raises :class:`ConfigError`
whose one-line message names the key, the value, what is allowed and an example fix. Every
default is stated once: an engine's, policy's or defence's in its code (the config dataclass,
the function's keyword-only parameters; :mod:`fedistill.config_store` registers them for the
YAML options to extend), the rest (top level, strategies, datasets) in the YAML, whose schemas
here state types and ranges only.

No Flower here: ``fedistill simulate``/``central`` validate the user's overrides with this
module before Hydra creates a run directory and before Ray or Flower start (about 2 s for a
refusal on 2 cores; composing imports the engines, whose config dataclasses state the method
group's defaults, :mod:`fedistill.config_store`); the ServerApp validates the config it
composes from a Flower run config too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedistill.config_faults import check_faults
from fedistill.schema import ConfigError, above, at_least, build, check, check_value, choice
from fedistill.tracking import TRACKERS, missing_extra

__all__ = [
    "COMMAND_GROUPS",
    "GROUP_RULES",
    "SCHEMAS",
    "STRATEGY_SCHEMAS",
    "AttackConfig",
    "CentralConfig",
    "ClientResources",
    "ConfigError",
    "DPStatsConfig",
    "DataConfig",
    "SimulateConfig",
    "StrategyConfig",
    "TrackingConfig",
    "check_groups",
    "check_strategy",
    "compose_config",
    "config_dir",
    "hydra_error_line",
    "validate_config",
]


def config_dir() -> Path:
    """The Hydra config tree: packaged copy first, then the source checkout's ``configs/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_configs", here.parent / "configs"):
        if (cand / "central.yaml").is_file():
            return cand
    raise FileNotFoundError(f"fedistill config tree not found in {here / '_configs'} or {here.parent / 'configs'}")


def compose_config(config_name: str, overrides: list[str]) -> dict:
    """Resolve a config of the tree with Hydra overrides, without running a job (for ServerApps)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedistill.config_store import register_defaults

    register_defaults()  # the groups' code defaults, which their YAML options extend
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def hydra_error_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf composition error (unknown key, unknown group choice, bad override) as one line."""
    text = str(exc).split("\nConfig search path:")[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text += "\n" + str(cause).strip().splitlines()[0]
    parts: list[str] = []
    listing = False  # lines after "...:" are the items of a list (e.g. the available options)
    for line in (raw.strip().rstrip(".") for raw in text.splitlines()):
        if not line:
            continue
        if listing:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line)
        listing = listing or line.endswith(":")
    return "; ".join(parts) or type(exc).__name__


@dataclass(frozen=True)
class StrategyConfig:
    """The top level of a ``strategy`` group (``configs/strategy/*.yaml``) every strategy shares."""

    name: str
    rounds: int = field(metadata=at_least(1, 5))
    fraction: float = field(metadata=check("in (0, 1]", lambda v: 0 < v <= 1, 1.0))
    min_success_fraction: float = field(metadata=check("in [0, 1]", lambda v: 0 <= v <= 1, 0.5))
    wait_timeout: float = field(metadata=above(0, 120))
    round_timeout: float = field(metadata=above(0, 3600))


@dataclass(frozen=True)
class DPStatsConfig(StrategyConfig):
    """``strategy=dp_stats`` (``configs/strategy/dp_stats.yaml``): the shared keys plus its own."""

    count_share: float = field(metadata=check("in (0, 1)", lambda v: 0 < v < 1, 0.5))
    min_records: float = field(metadata=at_least(0, 10))
    secure_aggregation: bool
    secure_threshold: float = field(metadata=check("in (0, 1]", lambda v: 0 < v <= 1, 0.8))

    def check(self, cfg: Mapping[str, Any]) -> None:
        """Cross-key rules: the strategy sums ``dp_dm`` releases; SecAgg+ needs 2 sampled clients."""
        method = cfg["method"]["name"]
        if method != "dp_dm":
            raise ConfigError(
                f"method={method}: strategy=dp_stats sums the clients' dp_dm releases and needs method=dp_dm; "
                "use strategy=oneshot for other engines"
            )
        sampled = math.ceil(self.fraction * int(cfg["clients"]))
        if self.secure_aggregation and sampled < 2:
            raise ConfigError(
                f"strategy.secure_aggregation=true needs at least 2 sampled clients per round, got {sampled} "
                "(clients x strategy.fraction); raise clients= or set strategy.secure_aggregation=false"
            )


STRATEGY_SCHEMAS: dict[str, type[StrategyConfig]] = {"dp_stats": DPStatsConfig}
"""Strategies whose group has keys (and cross-key rules) of its own beyond :class:`StrategyConfig`."""


def check_strategy(cfg: Mapping[str, Any]) -> StrategyConfig:
    """The typed ``strategy`` group of a ``simulate`` config, its cross-key rules checked.

    Raises
    ------
    ConfigError
        One line naming the key, the value and the fix.
    """
    schema = STRATEGY_SCHEMAS.get(str(cfg["strategy"]["name"]), StrategyConfig)
    typed = build(schema, cfg["strategy"], "strategy.", "simulate")
    if hasattr(typed, "check"):
        typed.check(cfg)
    return typed


@dataclass(frozen=True)
class DataConfig:
    """``data``: where dataset files are searched first, and the validation hold-out."""

    root: str | None
    val_fraction: float = field(metadata=check("in [0, 1)", lambda v: 0 <= v < 1, 0.1))


@dataclass(frozen=True)
class ClientResources:
    """``client``: the resources of one virtual client (a Ray actor)."""

    num_cpus: float = field(metadata=above(0, 1))
    num_gpus: float = field(metadata=at_least(0, 0.1))
    device: str | None = field(metadata=choice(("cpu", "cuda")))

    def __post_init__(self) -> None:
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ConfigError(
                "client.device=cuda: clients get a GPU only with a GPU share; set client.num_gpus, e.g. "
                "client.num_gpus=0.1 (10 clients per GPU), or client.device=null"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """``tracking`` (``configs/tracking/*.yaml``): the experiment tracker; its library must be installed."""

    name: str = field(metadata=choice(tuple(TRACKERS.names())))

    def __post_init__(self) -> None:
        fix = missing_extra(self.name)
        if fix:
            raise ConfigError(fix)


@dataclass(frozen=True)
class CentralConfig:
    """``fedistill central`` (``configs/central.yaml``), top level."""

    ipc: int = field(metadata=at_least(1, 10))
    seed: int = field(metadata=at_least(0, 0))
    checkpoint_every: int = field(metadata=at_least(0, 0))
    resume: str | None
    device: str
    init: str = field(metadata=choice(("auto", "real", "noise")))
    data: DataConfig
    tracking: TrackingConfig


@dataclass(frozen=True)
class AttackConfig:
    """``attack``: hostile clients (which kinds exist is checked when the server plans them)."""

    kind: str | None
    fraction: float = field(metadata=check("in [0, 1]", lambda v: 0 <= v <= 1, 0.2))
    target: int = field(metadata=at_least(0, 0))
    poison_rate: float = field(metadata=check("in [0, 1]", lambda v: 0 <= v <= 1, 0.3))
    trigger_size: int = field(metadata=at_least(1, 2))
    copies: int = field(metadata=at_least(1, 4))
    scale: float = field(metadata=above(0, 10.0))
    clean_run: bool


@dataclass(frozen=True)
class SimulateConfig:
    """``fedistill simulate`` (``configs/simulate.yaml``): the top level and its typed groups."""

    clients: int = field(metadata=at_least(1, 10))
    alpha: float = field(metadata=above(0, 0.5))
    rounds: int = field(metadata=at_least(1, 5))
    ipc: int = field(metadata=at_least(1, 10))
    init: str = field(metadata=choice(("auto", "real", "noise")))
    seed: int = field(metadata=at_least(0, 0))
    resume: str | None
    device: str
    verbose: bool
    max_in_flight: int | None = field(metadata=at_least(1, 16))
    strategy: StrategyConfig
    data: DataConfig
    client: ClientResources
    attack: AttackConfig
    tracking: TrackingConfig


def _fraction(allowed: str, ok: Callable[[float], bool], example: float) -> tuple[Any, dict[str, Any]]:
    return float, check(allowed, ok, example)


# the screening keys policy=screen and defense=screen|robust_proto share
_SCREENING: dict[str, tuple[Any, dict[str, Any]]] = {
    "threshold": (float, above(0, 3.5)),
    "min_holders": (int, at_least(1, 3)),
    "val_epochs": (int, at_least(0, 0)),
    "val_lr": (float, above(0, 0.1)),
    "val_margin": (float, at_least(0, 0.02)),
}
#: Type and range of the keys of the selectable groups, checked wherever a key occurs in its
#: group (a group's options differ in which keys they have: ``model=lenet`` has no ``depth``).
#: The values stay stated once: in the code for engines, policies and defences
#: (:mod:`fedistill.config_store`), in each option's YAML for models.
GROUP_RULES: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {
    "model": {
        "width": (int, at_least(1, 32)),
        "depth": (int, at_least(1, 3)),
        "norm": (str, choice(("instance", "batch", "none"))),
        "pooling": (str, choice(("avg", "max", "none"))),
    },
    "method": {
        "iterations": (int, at_least(1, 200)),
        "lr_img": (float, above(0, 1.0)),
        "batch_real": (int, at_least(1, 64)),
        "releases": (int | None, at_least(1, 50)),
        "real_per_image": (int, at_least(1, 10)),
        "equal_image_steps": (bool, {}),
        "epsilon": (float | None, above(0, 10.0)),
        "delta": _fraction("in (0, 1)", lambda v: 0 < v < 1, 1e-5),
        "clip": (float, above(0, 3.0)),
        "sigma": (float | None, above(0, 1.0)),
        "sample_rate": (float | None, check("in (0, 1]", lambda v: 0 < v <= 1, 0.1)),
    },
    "policy": {**_SCREENING, "budget_ipc": (int | None, at_least(1, 10))},
    "defense": {
        **_SCREENING,
        "trim": _fraction("in [0, 0.5)", lambda v: 0 <= v < 0.5, 0.2),
        "trim_beta": _fraction("in [0, 0.5)", lambda v: 0 <= v < 0.5, 0.2),
        "max_ratio": _fraction("in (0, 1]", lambda v: 0 < v <= 1, 0.5),
        "krum_malicious": (int, at_least(0, 1)),
        "per_class_cap": (int | None, at_least(1, 10)),
        "decimals": (int, at_least(0, 3)),
    },
    "eval": {
        "runs": (int, at_least(1, 3)),
        "epochs": (int, at_least(1, 300)),
        "lr": (float, above(0, 0.01)),
        "batch_size": (int, at_least(1, 256)),
        "whole_epochs": (int, at_least(1, 300)),
    },
}
#: The groups :data:`GROUP_RULES` checks in each command's config.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "simulate": ("model", "method", "policy", "defense"),
    "central": ("model", "method", "eval"),
}


def check_groups(config_name: str, cfg: Mapping[str, Any]) -> None:
    """Check the keys of the selectable groups (:data:`GROUP_RULES`) in a composed config.

    Raises
    ------
    ConfigError
        One line naming the key, the value, what is allowed and an example.
    """
    for group in COMMAND_GROUPS.get(config_name, ()):
        values = cfg.get(group)
        if not isinstance(values, Mapping):
            continue
        for key, (hint, meta) in GROUP_RULES[group].items():
            if key in values:
                check_value(f"{group}.{key}", values[key], hint, meta)


SCHEMAS: dict[str, type] = {"simulate": SimulateConfig, "central": CentralConfig}
"""The typed schema of each command's config (commands without one are not checked)."""


def validate_config(config_name: str, cfg: Mapping[str, Any]) -> Any:
    """Check a composed, resolved config of command ``config_name``; return its typed view.

    Only the keys of the command's schema (:data:`SCHEMAS`) are checked; other keys pass
    (Hydra's struct mode already refuses keys the tree does not have). Commands without a
    schema return ``None``.

    Raises
    ------
    ConfigError
        On the first value of the wrong type or out of range; the one-line message names
        the key, the value, what is allowed and an example, e.g.
        ``clients=0: clients must be an integer >= 1; e.g. clients=10``.
    """
    schema = SCHEMAS.get(config_name)
    if schema is None:
        return None
    typed = build(schema, cfg, "", config_name)
    check_groups(config_name, cfg)
    if config_name == "simulate":  # the strategy's own keys and cross-key rules
        typed = dataclasses.replace(typed, strategy=check_strategy(cfg))
        check_faults(cfg)
    return typed
