"""Deliberate client misbehaviour, for tests and robustness studies; acted out in simulation only.

The server plans faults from the seed (``faults`` config, :func:`fedistill.federated.server.assign_faults`)
and names each faulty client's kind in its task (``fault``, and ``fault_seconds`` for a delay). A
Flower mod on the simulation's ClientApp (``clients/faults.py``) acts them out around the real
handlers, which know nothing of faults:

- :data:`BEFORE_WORK` kinds act before the handler runs: ``crash`` answers with an error,
  ``slow`` and ``timeout`` sleep ``fault_seconds`` (``timeout``: past the round's timeout);
- the other kinds corrupt the handler's reply payload, the record :data:`PAYLOAD_FAULTS` names
  for the message type: a synthetic set (``train.distill``), FedAvg weights and counts
  (``train.fit``) or FedGen latent codes (``train.latents``).

Every fault is ``fault(tensors, metrics, num_classes) -> (tensors, metrics)`` on the decoded
payload; the server must reject ``nan``, ``shape``, ``labels``, ``oversize``, ``keys`` and
an inflated ``examples`` count, while ``noise`` passes validation (only a screening server
policy can catch it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedistill.config_faults import FaultOptions
from fedistill.federated.attacks import noise_like, repeat_tensors
from fedistill.registry import Registry

__all__ = ["BEFORE_WORK", "FAULTS", "LATENT_FAULTS", "PAYLOAD_FAULTS", "WEIGHT_FAULTS", "FaultOptions", "InjectedFault"]

Payload = dict[str, torch.Tensor]
Fault = Callable[[Payload, dict[str, Any], int], tuple[Payload, dict[str, Any]]]

BEFORE_WORK = ("crash", "slow", "timeout")
"""Kinds that act before any work, whatever the message."""


class InjectedFault(RuntimeError):
    """The ``crash`` fault's error (its reason reaches the server in the error reply)."""


def _before_work(registry: Registry[Fault]) -> None:
    for kind in BEFORE_WORK:  # plannable for every payload; they never touch one
        registry.register(kind)(lambda tensors, metrics, num_classes: (tensors, metrics))


def _first_float(tensors: Payload, key: str) -> Payload:
    out = dict(tensors)
    out[key] = tensors[key].clone()
    out[key].view(-1)[0] = float("nan")
    return out


FAULTS: Registry[Fault] = Registry("fault")
"""Faults of a synthetic-set reply (``images``, ``labels``, ``soft_labels``), and the plannable kinds of
every strategy whose clients send sets."""
_before_work(FAULTS)


def _nan_in(key: str) -> Fault:
    """The ``nan`` fault of the payload array ``key``: its first value NaN."""
    return lambda tensors, metrics, num_classes: (_first_float(tensors, key), metrics)


FAULTS.register("nan")(_nan_in("images"))


@FAULTS.register("noise")
def _noise(tensors: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    """Well-formed but useless: Gaussian noise images with the set's overall std (seed 0)."""
    return {**tensors, "images": noise_like(tensors["images"], seed=0)}, metrics


@FAULTS.register("shape")
def _shape(tensors: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    return {**tensors, "images": tensors["images"][:, :, :-1, :].contiguous()}, metrics


@FAULTS.register("labels")
def _labels(tensors: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    if "labels" not in tensors:
        return tensors, metrics
    return {**tensors, "labels": tensors["labels"] + num_classes}, metrics


@FAULTS.register("oversize")
def _oversize(tensors: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    """Every row four times (also the shape of a volume attack): the server's size cap answers it."""
    return repeat_tensors(tensors, 4), metrics


WEIGHT_FAULTS: Registry[Fault] = Registry("weight fault")
"""Faults of a FedAvg reply: its weights (``nan``, ``shape``, ``keys``) and its ``examples`` weight."""
_before_work(WEIGHT_FAULTS)


@WEIGHT_FAULTS.register("nan")
def _nan_weights(state: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    key = next(k for k, v in state.items() if v.is_floating_point())
    return _first_float(state, key), metrics


@WEIGHT_FAULTS.register("shape")
def _shape_weights(state: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    key = next(k for k, v in state.items() if v.dim() >= 1)
    value = state[key]
    return {**state, key: value[:-1].clone() if len(value) > 1 else torch.cat([value, value])}, metrics


@WEIGHT_FAULTS.register("keys")
def _extra_key(state: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    return {**state, "backdoor.weight": torch.zeros(3)}, metrics


@WEIGHT_FAULTS.register("examples")
def _inflated(state: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    return state, {**metrics, "examples": int(metrics["examples"]) * 1000}


LATENT_FAULTS: Registry[Fault] = Registry("latent fault")
"""Faults of a FedGen latent-code reply (``latents``, ``labels``)."""
_before_work(LATENT_FAULTS)


LATENT_FAULTS.register("nan")(_nan_in("latents"))


@LATENT_FAULTS.register("shape")
def _shape_latents(tensors: Payload, metrics: dict[str, Any], num_classes: int) -> tuple[Payload, dict[str, Any]]:
    return {**tensors, "latents": tensors["latents"][:, :-1].contiguous()}, metrics


LATENT_FAULTS.register("labels")(_labels)
LATENT_FAULTS.register("oversize")(_oversize)

PAYLOAD_FAULTS: dict[str, tuple[str, Registry[Fault]]] = {
    "train.distill": ("synthetic", FAULTS),
    "train.fit": ("model", WEIGHT_FAULTS),
    "train.latents": ("latents", LATENT_FAULTS),
}
"""Message type -> (the reply's payload record, the faults that corrupt it)."""
