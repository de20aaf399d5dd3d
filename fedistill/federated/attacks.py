"""Hostile clients for robustness studies: data poisoning before distillation, poisoned sets after.

An attack is registered by name (``attack.kind``); the server picks ``attack.fraction``
of the clients from the seed and puts the attack in their tasks. ``before`` attacks
change the client's real data (label flipping, a backdoor trigger) and so poison
whatever the client computes from it, distillation or local SGD alike; ``after``
attacks change the synthetic set the client uploads (flipped labels, noise images,
duplicated rows); ``stats`` attacks change the class statistics a FedAF client sends.
:func:`attack_success_rate` measures a backdoor on triggered test images.

An attack's options are the task's ``attack``: the whole ``attack`` block of the
``simulate`` config (``target``, ``poison_rate``, ``trigger_size``, ``copies``, ``scale``),
so the attacks read them without restating defaults.
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
from fedistill.seeding import derive_seed, torch_generator

__all__ = [
    "ATTACKS",
    "Attack",
    "add_trigger",
    "attack_success_rate",
    "noise_images",
    "noise_like",
    "poison_split",
    "poison_stats",
    "poison_synthetic",
    "repeat_rows",
    "repeat_tensors",
]


@dataclass(frozen=True)
class Attack:
    """``before(split, options, seed)`` poisons the real data; ``after(syn, options)`` the upload;
    ``stats(stats, options)`` FedAF's class statistics."""

    before: Callable[[Split, Mapping[str, Any], int], Split] | None = None
    after: Callable[[SyntheticSet, Mapping[str, Any]], SyntheticSet] | None = None
    stats: Callable[[dict[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]] | None = None


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
    pick = torch.randperm(n, generator=g)[: max(1, round(float(options["poison_rate"]) * n))]
    images, labels = split.images.clone(), split.labels.clone()
    images[pick] = add_trigger(images[pick], split.info, size=int(options["trigger_size"]))
    labels[pick] = int(options["target"])
    return Split(images, labels, split.info)


def _syn_label_flip(syn: SyntheticSet, options: Mapping[str, Any]) -> SyntheticSet:
    if syn.labels is not None:
        syn.labels = _flip(syn.labels, syn.info.num_classes)
    if syn.soft_labels is not None:
        syn.soft_labels = syn.soft_labels.flip(1).contiguous()
    return syn


def repeat_tensors(tensors: Mapping[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """Every named tensor's rows ``copies`` times (the ``oversize`` fault of any payload)."""
    return {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in tensors.items()}


def repeat_rows(syn: SyntheticSet, copies: int) -> SyntheticSet:
    """The set's rows ``copies`` times (a volume attack)."""
    fields = {"images": syn.images, "labels": syn.labels, "soft_labels": syn.soft_labels}
    repeated = repeat_tensors({k: v for k, v in fields.items() if v is not None}, copies)
    syn.images, syn.labels, syn.soft_labels = (repeated.get(k) for k in fields)
    return syn


def _duplicate(syn: SyntheticSet, options: Mapping[str, Any]) -> SyntheticSet:
    """Volume attack: the same rows ``copies`` times (the server's size cap and de-duplication answer it)."""
    return repeat_rows(syn, int(options["copies"]))


def noise_like(images: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Gaussian noise of ``images``' shape and overall std: well-formed but useless (the ``noise`` fault)."""
    return torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * images.std()


def noise_images(syn: SyntheticSet, *, seed: int = 0) -> SyntheticSet:
    """A well-formed but useless set: :func:`noise_like` images."""
    syn.images = noise_like(syn.images, seed=seed)
    return syn


def _noise(syn: SyntheticSet, options: Mapping[str, Any]) -> SyntheticSet:
    """Each attacker's own noise, from its distillation seed: attackers that all sent one pattern
    would be caught as cross-client duplicates (``defense=dedup``), which real noise is not."""
    return noise_images(syn, seed=derive_seed(int(syn.metadata["seed"]), "noise-attack"))


def _stats_poison(stats: dict[str, torch.Tensor], options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Poisoned FedAF statistics: every held class's logits and soft labels point at the flipped
    class, scaled by ``scale``, and the class counts inflated ``scale``-fold to dominate a
    count-weighted mean (the statistics still pass validation)."""
    k = stats["class_logits"].shape[0]
    held = stats["class_counts"] > 0
    flip = (k - 1) - torch.arange(k)
    scale = float(options["scale"])
    out = dict(stats)
    logits = torch.zeros(k, k)
    logits[torch.arange(k), flip] = scale
    out["class_logits"] = torch.where(held[:, None], logits, stats["class_logits"])
    out["class_soft"] = torch.where(held[:, None], torch.eye(k)[flip], stats["class_soft"])
    out["class_counts"] = stats["class_counts"] * int(scale)
    return out


ATTACKS.register("label_flip")(Attack(before=_label_flip))
ATTACKS.register("backdoor")(Attack(before=_backdoor))
ATTACKS.register("syn_label_flip")(Attack(after=_syn_label_flip))
ATTACKS.register("duplicate")(Attack(after=_duplicate))
ATTACKS.register("noise")(Attack(after=_noise))
ATTACKS.register("stats_poison")(Attack(stats=_stats_poison))


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


def poison_stats(stats: dict[str, torch.Tensor], attack: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """FedAF class statistics after a ``stats`` attack (unchanged without one)."""
    fn = ATTACKS.get(str(attack["kind"])).stats if attack else None
    return stats if fn is None else fn(stats, attack)


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
