"""DD-Ranking scores: label-robust (LRS) and augmentation-robust (ARS) scores.

DD-Ranking (Li et al., 2025) separates what a synthetic set contributes from what
soft labels and augmentation contribute, with accuracies as fractions:

- HLR = acc(real, hard) - acc(syn, hard) (hard-label recovery: lower is better);
  IOR = acc(syn, any) - acc(random subset, same recipe) (improvement over random);
  LRS = norm((w IOR - (1 - w) HLR)), ``w = 0.5``.
- ARS = norm(g (acc(syn, aug) - acc(rdm, aug)) + (1 - g) (acc(syn, no aug) - acc(rdm, no aug))),
  ``g = 0.5``, with the random subset trained under the same labels and teacher.

``norm(x) = (e^x - e^-1) / (e - e^-1)`` maps ``[-1, 1]`` onto ``[0, 1]``; scores are
reported in percent (``x = 0``, e.g. a set exactly as good as the random subset
without augmentation, scores 26.9).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

__all__ = ["augmentation_robust_score", "evaluate_ranking", "label_robust_score", "normalized_score"]


def normalized_score(x: float) -> float:
    """``(e^x - e^-1) / (e - e^-1)`` in percent: ``-1 -> 0``, ``0 -> 26.9``, ``1 -> 100``."""
    return 100 * (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def _frac(v: float | dict[str, Any]) -> float:
    """A fraction from a fraction, or from an ``evaluate_images`` result (mean in percent)."""
    return float(v["mean"]) / 100 if isinstance(v, dict) else float(v)


def label_robust_score(
    *,
    real_hard: float | dict[str, Any],
    syn_hard: float | dict[str, Any],
    syn_any: float | dict[str, Any],
    rdm_any: float | dict[str, Any],
    weight: float = 0.5,
) -> dict[str, float]:
    """LRS and its parts.

    Parameters
    ----------
    real_hard, syn_hard
        Accuracy of models trained on the whole real set and on the synthetic images,
        both with hard labels (fractions, or result dicts with ``mean`` in percent).
    syn_any, rdm_any
        The synthetic set under its own recipe (e.g. soft labels) and the random real
        subset under the same recipe (same teacher).
    weight
        ``w`` of IOR against HLR.

    Returns
    -------
    dict
        ``hlr``, ``ior`` (percentage points), ``alpha`` and ``lrs`` (percent, 0-100).
    """
    hlr = _frac(real_hard) - _frac(syn_hard)
    ior = _frac(syn_any) - _frac(rdm_any)
    alpha = weight * ior - (1 - weight) * hlr
    return {
        "hlr": round(100 * hlr, 4),
        "ior": round(100 * ior, 4),
        "alpha": round(alpha, 6),
        "lrs": round(normalized_score(alpha), 4),
    }


def augmentation_robust_score(
    *,
    syn_aug: float | dict[str, Any],
    rdm_aug: float | dict[str, Any],
    syn_naug: float | dict[str, Any],
    rdm_naug: float | dict[str, Any],
    gamma: float = 0.5,
) -> dict[str, float]:
    """ARS and its parts (arguments as in :func:`label_robust_score`).

    Returns
    -------
    dict
        ``gain_aug``, ``gain_naug`` (percentage points), ``beta`` and ``ars`` (percent, 0-100).
    """
    aug = _frac(syn_aug) - _frac(rdm_aug)
    naug = _frac(syn_naug) - _frac(rdm_naug)
    beta = gamma * aug + (1 - gamma) * naug
    return {
        "gain_aug": round(100 * aug, 4),
        "gain_naug": round(100 * naug, 4),
        "beta": round(beta, 6),
        "ars": round(normalized_score(beta), 4),
    }


def evaluate_ranking(
    res: dict[str, Any],
    syn_data: Any,
    rdm_data: Any,
    whole: dict[str, Any],
    bundle: Any,
    *,
    recipe: Any,
    evaluate: Callable[..., dict[str, Any]],
    ars: bool = True,
    **common: Any,
) -> dict[str, Any]:
    """LRS and (with ``ars``) ARS of one evaluator's results.

    ARS trains the synthetic set and the random subset again under the other
    augmentation setting (without DSA when the recipe has it, else with it).

    Parameters
    ----------
    res
        The evaluator's results: ``synthetic``, ``random_subset`` (hard),
        ``hard_label`` and ``random_subset_soft`` for soft-label sets.
    syn_data, rdm_data
        Training data of the synthetic set and of the same-recipe random subset
        (see :data:`fedistill.training.TrainingData`).
    whole
        The whole-training-set result (hard labels).
    recipe, **common
        As for :func:`fedistill.evaluation.evaluate_images`.
    evaluate
        The evaluator that trains and tests (``evaluate(data, bundle, recipe=..., label=...,
        **common)``, e.g. :func:`fedistill.evaluation.evaluate_images`); passed in, so this
        module stays below the evaluation that calls it.
    """
    rdm = res.get("random_subset_soft", res["random_subset"])
    lrs = label_robust_score(
        real_hard=whole, syn_hard=res.get("hard_label", res["synthetic"]), syn_any=res["synthetic"], rdm_any=rdm
    )
    if not ars:
        return {"lrs": lrs}
    other = dataclasses.replace(recipe, dsa=not recipe.dsa)
    tag = "no aug" if recipe.dsa else "aug"
    syn_other = evaluate(syn_data, bundle, recipe=other, label=f"synthetic {tag}", **common)
    rdm_other = evaluate(rdm_data, bundle, recipe=other, label=f"random subset {tag}", **common)
    aug, naug = (res["synthetic"], rdm), (syn_other, rdm_other)
    if not recipe.dsa:
        aug, naug = naug, aug
    return {
        "lrs": lrs,
        "ars": augmentation_robust_score(syn_aug=aug[0], rdm_aug=aug[1], syn_naug=naug[0], rdm_naug=naug[1]),
        "synthetic_" + tag.replace(" ", ""): syn_other,
        "random_subset_" + tag.replace(" ", ""): rdm_other,
    }
