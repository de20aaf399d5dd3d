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
from typing import Any

import torch

from fedistill.data.base import DataBundle, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.seeding import derive_seed

__all__ = ["relabelled_subset", "resolve_teacher", "teacher_report"]


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
    from fedistill.evaluation import random_subset

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
