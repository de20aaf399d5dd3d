"""Hostile clients for robustness studies: data poisoning before distillation, poisoned sets after.

An attack is registered by name (``attack.kind``); the server picks ``attack.fraction``
of the clients from the seed and puts the attack in their tasks. ``before`` attacks
change the client's real data (label flipping, a backdoor trigger) and so poison
whatever the client computes from it, distillation or local SGD alike; ``after``
attacks change the synthetic set the client uploads (flipped labels, duplicated rows).
:func:`attack_success_rate` measures a backdoor on triggered test images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedistill.data.base import DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.registry import Registry
from fedistill.seeding import torch_generator

__all__ = ["ATTACKS", "Attack", "add_trigger", "attack_success_rate", "poison_split", "poison_synthetic"]


@dataclass(frozen=True)
class Attack:
    """``before(split, options, seed)`` poisons the real data; ``after(syn, options)`` the upload."""

    before: Callable[[Split, Mapping[str, Any], int], Split] | None = None
    after: Callable[[SyntheticSet, Mapping[str, Any]], SyntheticSet] | None = None


ATTACKS: Registry[Attack] = Registry("attack")


def _flip(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (num_classes - 1) - labels  # every class mapped to another (the classic "flip" attack)


def add_trigger(images: torch.Tensor, info: DatasetInfo, *, size: int = 2) -> torch.Tensor:
    """Stamp a white ``size x size`` square in the bottom-right corner (in normalized space)."""
    out = images.clone()
    white = info.normalize(torch.ones(1, info.channels, 1, 1))
    out[:, :, -size:, -size:] = white.to(out.dtype)
    return out


def _label_flip(split: Split, options: Mapping[str, Any], seed: int) -> Split:
    return Split(split.images, _flip(split.labels, split.info.num_classes), split.info)


def _backdoor(split: Split, options: Mapping[str, Any], seed: int) -> Split:
    """Trigger ``poison_rate`` of the client's images and relabel them to ``target``."""
    g = torch_generator(seed, "backdoor")
    n = len(split)
    pick = torch.randperm(n, generator=g)[: max(1, round(float(options.get("poison_rate", 0.3)) * n))]
    images, labels = split.images.clone(), split.labels.clone()
    images[pick] = add_trigger(images[pick], split.info, size=int(options.get("trigger_size", 2)))
    labels[pick] = int(options.get("target", 0))
    return Split(images, labels, split.info)


def _syn_label_flip(syn: SyntheticSet, options: Mapping[str, Any]) -> SyntheticSet:
    if syn.labels is not None:
        syn.labels = _flip(syn.labels, syn.info.num_classes)
    if syn.soft_labels is not None:
        syn.soft_labels = syn.soft_labels.flip(1).contiguous()
    return syn


def _duplicate(syn: SyntheticSet, options: Mapping[str, Any]) -> SyntheticSet:
    """Volume attack: the same rows ``copies`` times (the server's size cap and de-duplication answer it)."""
    k = int(options.get("copies", 4))
    syn.images = syn.images.repeat(k, 1, 1, 1)
    syn.labels = None if syn.labels is None else syn.labels.repeat(k)
    syn.soft_labels = None if syn.soft_labels is None else syn.soft_labels.repeat(k, 1)
    return syn


ATTACKS.register("label_flip")(Attack(before=_label_flip))
ATTACKS.register("backdoor")(Attack(before=_backdoor))
ATTACKS.register("syn_label_flip")(Attack(after=_syn_label_flip))
ATTACKS.register("duplicate")(Attack(after=_duplicate))


def poison_split(split: Split, attack: Mapping[str, Any] | None, seed: int) -> Split:
    """The client's data after a ``before`` attack (unchanged without one)."""
    if not attack:
        return split
    fn = ATTACKS.get(str(attack["kind"])).before
    return split if fn is None else fn(split, attack, seed)


def poison_synthetic(syn: SyntheticSet | None, attack: Mapping[str, Any] | None) -> SyntheticSet | None:
    """The upload after an ``after`` attack (unchanged without one)."""
    if not attack or syn is None:
        return syn
    fn = ATTACKS.get(str(attack["kind"])).after
    return syn if fn is None else fn(syn, attack)


@torch.no_grad()
def attack_success_rate(
    model: nn.Module, test: Split, *, target: int, device: torch.device, trigger_size: int = 2
) -> float:
    """Fraction of triggered test images of other classes that ``model`` assigns to ``target``."""
    keep = test.labels != target
    x = add_trigger(test.images[keep], test.info, size=trigger_size).to(device)
    model.eval()
    preds = torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return float((preds == target).float().mean()) if len(preds) else 0.0
