"""The ``faults`` group of ``fedistill simulate``: its options and its checks, before anything starts.

A key of the group is an option (:class:`FaultOptions`), a partition id below ``clients``
(``+faults.3=crash``) or a fault kind whose value is the fraction of clients that get it
(``+faults.crash=0.2``). Which kinds exist, and how the server plans them, is
:mod:`fedistill.federated.faults` and :func:`fedistill.federated.server.assign_faults`.
No Flower and no torch here (the CLI checks the group before anything starts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedistill.schema import ConfigError, above, at_least, check_value, refusal, shown, type_ok

__all__ = ["FAULT_OPTIONS", "FaultOptions", "check_faults", "fault_fraction"]


@dataclass(frozen=True)
class FaultOptions:
    """The options of the ``faults`` group; its other keys plan the faults themselves
    (:func:`fedistill.federated.server.assign_faults` skips these fields).

    Attributes
    ----------
    start_round
        The first round in which planned faults act (earlier rounds run clean).
    slow_seconds
        How long a ``slow`` client sleeps before it works.
    """

    start_round: int = field(default=1, metadata=at_least(1, 2))
    slow_seconds: float = field(default=3.0, metadata=above(0, 3.0))

    @classmethod
    def of(cls, faults: Mapping[str, Any]) -> FaultOptions:
        """The options given in a ``faults`` group (a Flower run config's strings cast to the field's
        type), checked; defaults for the rest.

        Raises
        ------
        ConfigError
            One line naming the option, its value, the allowed range and an example.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in faults:
                tp, raw = type(f.default), faults[f.name]
                try:
                    value = tp(raw) if isinstance(raw, str) else raw
                except ValueError:
                    value = raw
                values[f.name] = check_value(f"faults.{f.name}", value, tp, f.metadata)
        return cls(**values)


#: Reserved keys of the ``faults`` group (:class:`FaultOptions`' fields), not partition ids or kinds.
FAULT_OPTIONS = tuple(f.name for f in fields(FaultOptions))


def fault_fraction(kind: str, value: Any) -> float:
    """The value of ``faults.<kind>``: the fraction of clients that get fault ``kind``, a number in [0, 1].

    Raises
    ------
    ConfigError
        One line naming the key, the value, the range and an example.
    """
    if not (type_ok(value, float) and 0 <= value <= 1):
        raise refusal(
            f"faults.{kind}",
            value,
            f"faults.{kind} is the fraction of clients with fault {kind} "
            "and must be a number in [0, 1] (or a partition id as the key)",
            f"e.g. +faults.{kind}=0.2",
        )
    return float(value)


def check_faults(cfg: Mapping[str, Any]) -> FaultOptions:
    """The ``faults`` group of a ``simulate`` config, checked before anything starts; its options.

    Besides the options (:class:`FaultOptions`), a key is a partition id below ``clients``
    (``+faults.3=crash``) or a fault kind whose value is the fraction of clients that get it,
    in [0, 1] (``+faults.crash=0.2``); the fractions sum to at most 1, since a client gets at
    most one fault. Which kinds the strategy's clients can act out is checked when the server
    plans them (:func:`fedistill.federated.server.assign_faults`).

    Raises
    ------
    ConfigError
        One line naming the key, the value, the problem and the fix.
    """
    faults = cfg["faults"] or {}
    if not isinstance(faults, Mapping):
        raise refusal("faults", faults, "faults must be a group of keys", "e.g. +faults.crash=0.2 or +faults.3=crash")
    options = FaultOptions.of(faults)
    clients, total = int(cfg["clients"]), 0.0
    for key, value in faults.items():
        key = str(key)
        if key in FAULT_OPTIONS:
            continue
        if key.isdigit():
            if int(key) >= clients:
                raise refusal(
                    f"faults.{key}",
                    value,
                    f"no client has partition id {key} with clients={clients}",
                    f"give an id in [0, {clients}) or a fraction of clients, e.g. +faults.{shown(value)}=0.2",
                )
        else:
            total += fault_fraction(key, value)
    if total > 1 + 1e-9:
        raise ConfigError(
            f"faults: the fractions of clients sum to {total:g}, but a client gets at most one fault; "
            "lower them to a sum of at most 1"
        )
    return options
