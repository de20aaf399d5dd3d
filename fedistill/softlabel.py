"""Soft-label evaluation: the random real subset relabelled by the same teacher.

A soft-label synthetic set is only comparable with baselines trained under the same
recipe: the random real subset of the same size gets soft labels from the *same*
teacher at the *same* temperature (the one recorded in the set's metadata) and is
trained with the same KD loss, augmentation and seeds. The subset draws are those of
the hard-label random baseline (seed stream ``subset``), so the two differ only in
their labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedistill.data.base import DataBundle, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.seeding import derive_seed
from fedistill.training import EvalRecipe, TrainingData, random_subset

__all__ = ["TrainingSets", "relabelled_subset", "resolve_teacher", "teacher_report", "training_sets"]


@dataclass
class TrainingSets:
    """What :func:`fedistill.evaluation.evaluate_synthetic` trains on, under one recipe.

    Attributes
    ----------
    synthetic
        The set with its own labels (soft rows when it has them).
    hard
        The set's images with hard labels.
    random
        ``run -> (images, hard labels)``: the random real subset of the same class counts.
    random_soft
        The same subsets labelled by the set's teacher, or ``None`` (no teacher recorded).
    relabel
        Online teacher labels per augmented view (``recipe.online_labels``), or ``None``.
    teacher
        The teacher, or ``None``.
    soft
        Whether the set has soft labels.
    """

    synthetic: TrainingData
    hard: TrainingData
    random: TrainingData
    random_soft: TrainingData | None
    relabel: Callable[[torch.Tensor], torch.Tensor] | None
    teacher: Any
    soft: bool


def training_sets(
    syn: SyntheticSet, bundle: DataBundle, *, recipe: EvalRecipe, seed: int, device: torch.device, teacher: Any = None
) -> TrainingSets:
    """The synthetic set and its baselines: random subsets (seed stream ``subset``), relabelled when soft.

    The teacher's temperature is the one stored with the set (``metadata["teacher"]["temperature"]``),
    else ``recipe.temperature``.
    """
    hard = syn.hard_labels
    soft = syn.soft_labels is not None
    teacher = resolve_teacher(syn, bundle, teacher=teacher, device=device) if soft else None
    temperature = float(syn.metadata.get("teacher", {}).get("temperature", recipe.temperature))

    def subset(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = random_subset(bundle.train, hard, seed=derive_seed(seed, "subset", r))
        return s.images, s.labels

    rdm_soft = relabel = None
    if teacher is not None:
        rdm_soft = relabelled_subset(bundle.train, hard, teacher, temperature=temperature, seed=seed)
        relabel = teacher.relabeller(temperature=temperature) if recipe.online_labels else None
    return TrainingSets(
        synthetic=(syn.images, syn.soft_labels if soft else hard),
        hard=(syn.images, hard),
        random=subset,
        random_soft=rdm_soft,
        relabel=relabel,
        teacher=teacher,
        soft=soft,
    )


def resolve_teacher(
    syn: SyntheticSet, bundle: DataBundle, *, teacher: Any = None, device: torch.device, cache_dir: Any = None
) -> Any:
    """The teacher of a soft-label set: ``teacher`` if given, else the one in ``syn.metadata["teacher"]``.

    Returns ``None`` when the set records no teacher (its random baseline then stays hard-label).
    """
    if teacher is not None or "teacher" not in syn.metadata:
        return teacher
    from fedistill.engines.teacher import teacher_from_metadata

    return teacher_from_metadata(syn.metadata["teacher"], bundle.train, device=device, cache_dir=cache_dir)


def relabelled_subset(
    train: Split, hard: torch.Tensor, teacher: Any, *, temperature: float, seed: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``run -> (images, soft labels)``: run ``r``'s random subset, labelled by ``teacher``.

    The images are exactly those of the hard-label random baseline of run ``r``.
    """

    def data(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = random_subset(train, hard, seed=derive_seed(seed, "subset", r))
        return s.images, teacher.soft_labels(s.images, temperature=temperature)

    return data


def teacher_report(teacher: Any, bundle: DataBundle) -> dict[str, Any]:
    """The teacher's cache key, whether it was cached, and its val/test accuracy (percent)."""
    return {
        "key": teacher.key,
        "arch": teacher.config.model,
        "epochs": teacher.config.epochs,
        "cached": teacher.cached,
        "test": round(100 * teacher.accuracy(bundle.test), 4),
        "val": round(100 * teacher.accuracy(bundle.val), 4),
    }
