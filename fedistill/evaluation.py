"""Honest evaluation of synthetic sets: train fresh models on them, test on real data.

The literature's recipe (REFERENCE.md section 2): SGD lr 0.01, momentum 0.9, weight
decay 5e-4, batch 256, lr x0.1 at half the epochs, DSA augmentation on by default;
the *final* epoch's test accuracy is reported (never the best epoch), as mean and
std over runs with fixed seeds. Baselines use the same recipe and the same seeds:
the random real subset of the same size (always) and the whole training set
(optional, cached on disk). Soft labels (KD at a temperature) are always reported
beside the hard-label and random-subset numbers.

The trainer, the recipe and the random subset live one layer down, in
:mod:`fedistill.training` (engines, the federated server and the audit use them too);
they are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from fedistill import softlabel
from fedistill.data.base import DataBundle
from fedistill.data.synthetic import SyntheticSet
from fedistill.ranking import evaluate_ranking
from fedistill.seeding import derive_seed
from fedistill.training import (
    EvalRecipe,
    ModelSpec,
    TrainingData,
    accuracy,
    random_subset,
    random_subset_indices,
    test_metrics,
    train_model,
)

__all__ = [
    "EvalRecipe",
    "ModelSpec",
    "TrainingData",
    "accuracy",
    "evaluate_images",
    "evaluate_synthetic",
    "random_subset",
    "random_subset_indices",
    "summarize",
    "test_metrics",
    "train_model",
    "whole_set_recipe",
]

EvalProgress = Callable[[str, int, int], None]
"""``progress(label, done, total)`` called after each trained model."""


def summarize(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "runs"}`` of accuracies in percent."""
    vals = [round(100 * v, 4) for v in values]
    std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return {"mean": round(statistics.fmean(vals), 4), "std": round(std, 4), "runs": vals}


def evaluate_images(
    data: TrainingData,
    bundle: DataBundle,
    *,
    spec: ModelSpec,
    recipe: EvalRecipe,
    runs: int,
    seed: int,
    device: torch.device,
    label: str = "",
    progress: EvalProgress | None = None,
    relabel: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``runs`` fresh models and report test (and validation) accuracy.

    ``data`` is ``(images, targets)`` (targets: hard labels or soft-label rows) or a
    function ``run -> (images, targets)`` for data drawn per run (a fresh random subset).
    Run ``r`` always uses the seed stream ``(seed, "eval", spec.name, r)``, so different
    training sets see identical seeds.
    """
    test, val = [], []
    for r in range(runs):
        x, y = data(r) if callable(data) else data
        run_seed = derive_seed(seed, "eval", spec.name, r)
        model = train_model(spec, bundle.info, x, y, recipe=recipe, seed=run_seed, device=device, relabel=relabel)
        test.append(accuracy(model, bundle.test, device=device))
        val.append(accuracy(model, bundle.val, device=device))
        if progress is not None:
            progress(label, r + 1, runs)
    out = summarize(test)
    out["val"] = summarize(val)
    return out


def _whole_dataset(bundle: DataBundle, *, cache_dir: Path | None, **common: Any) -> dict[str, Any]:
    """The whole-training-set baseline (with the ``epochs`` it trained), cached on disk by what determines it."""
    spec, recipe = common["spec"], common["recipe"]
    key = json.dumps(
        {"dataset": bundle.info.name, "n": len(bundle.train), "model": asdict(spec), "recipe": asdict(recipe)}
        | {"runs": common["runs"], "seed": common["seed"]},
        sort_keys=True,
    )
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"whole-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())["result"]
            except (OSError, ValueError, KeyError, TypeError):  # a damaged cache entry: rebuild it
                pass
    data = (bundle.train.images, bundle.train.labels)
    res = {**evaluate_images(data, bundle, label=f"whole set {spec.label}", **common), "epochs": recipe.epochs}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": json.loads(key), "result": res}, indent=2))
    return res


def whole_set_recipe(recipe: EvalRecipe, whole: EvalRecipe | None, *, synthetic: int, real: int) -> EvalRecipe:
    """The whole-training-set baseline's recipe under the same rules as the set it is compared with.

    ``whole`` (``eval.whole_epochs``; default ``recipe``) with its epochs raised, where needed, so
    the whole set gets at least the optimizer steps ``recipe`` gives ``synthetic`` images: a
    baseline that trains less than the set inflates the label-robust score (digits, ConvNet-128:
    20 epochs of the whole set reach 85.8% test, 50 reach 93.0%, while a 100-image set gets 300
    steps). On large sets ``whole``'s epochs already give more steps and stay as they are.
    """
    whole = whole or recipe
    steps = recipe.epochs * math.ceil(synthetic / recipe.batch_size)
    if recipe.max_steps is not None:
        steps = min(steps, recipe.max_steps)
    return replace(whole, epochs=max(whole.epochs, math.ceil(steps / math.ceil(real / whole.batch_size))))


def evaluate_synthetic(
    syn: SyntheticSet,
    bundle: DataBundle,
    *,
    models: list[ModelSpec],
    recipe: EvalRecipe,
    runs: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    whole_dataset: bool = False,
    whole_recipe: EvalRecipe | None = None,
    cache_dir: Path | None = None,
    progress: EvalProgress | None = None,
    teacher: Any = None,
    ranking: bool | str = False,
) -> dict[str, Any]:
    """Evaluate ``syn`` against its baselines under the same recipe and seeds.

    Parameters
    ----------
    teacher
        The teacher of a soft-label set (default: reloaded from ``syn.metadata["teacher"]``);
        it relabels the random subset at the set's temperature (:mod:`fedistill.softlabel`).
    ranking
        DD-Ranking scores of the first model (:mod:`fedistill.ranking`): ``True`` for LRS
        and ARS (ARS trains both sets again under the other augmentation setting);
        ``"auto"`` for LRS of soft-label sets only (it needs the whole-set baseline,
        cached on disk); ``False`` for none.

    Returns
    -------
    dict
        ``accuracy`` (the first model; soft labels when the set has them),
        ``hard_label`` (only for soft-label sets: the same images with hard labels),
        ``baselines`` {``random_subset``, ``random_subset_soft``?, ``whole_dataset``?},
        ``per_model`` {label: {"synthetic", "random_subset", "hard_label"?, "random_subset_soft"?}}
        for cross-architecture, ``teacher``? (its accuracy) and ``ranking``? {``lrs``, ``ars``, ...}.
    """
    syn.validate(bundle.info)
    device = torch.device(device)
    sets = softlabel.training_sets(syn, bundle, recipe=recipe, seed=seed, device=device, teacher=teacher)
    ars = ranking is True
    ranking = sets.soft if ranking == "auto" else bool(ranking)
    base = {"runs": runs, "seed": seed, "device": device, "progress": progress, "relabel": sets.relabel}
    per_model: dict[str, dict[str, Any]] = {}
    for spec in models:
        common = {"spec": spec, "recipe": recipe, **base}
        res = {"synthetic": evaluate_images(sets.synthetic, bundle, label=f"synthetic {spec.label}", **common)}
        if sets.soft:
            res["hard_label"] = evaluate_images(sets.hard, bundle, label=f"hard {spec.label}", **common)
        res["random_subset"] = evaluate_images(sets.random, bundle, label=f"random subset {spec.label}", **common)
        if sets.random_soft is not None:
            label = f"random soft {spec.label}"
            res["random_subset_soft"] = evaluate_images(sets.random_soft, bundle, label=label, **common)
        per_model[spec.label] = res
    first = per_model[models[0].label]
    out: dict[str, Any] = {
        "accuracy": first["synthetic"],
        "labels": "soft" if syn.soft_labels is not None else "hard",
        "baselines": {"random_subset": first["random_subset"]},
        "per_model": per_model,
        "recipe": asdict(recipe),
    }
    if "hard_label" in first:
        out["hard_label"] = first["hard_label"]
    if "random_subset_soft" in first:
        out["baselines"]["random_subset_soft"] = first["random_subset_soft"]
    if sets.teacher is not None:
        out["teacher"] = softlabel.teacher_report(sets.teacher, bundle)
    common = {"spec": models[0], **base}
    if whole_dataset or ranking:
        rules = whole_set_recipe(recipe, whole_recipe, synthetic=len(syn), real=len(bundle.train))
        whole = _whole_dataset(bundle, recipe=rules, cache_dir=cache_dir, **common)
        out["baselines"]["whole_dataset"] = whole
    if ranking:
        rdm = sets.random_soft if sets.random_soft is not None else sets.random
        out["ranking"] = evaluate_ranking(
            first, sets.synthetic, rdm, whole, bundle, recipe=recipe, evaluate=evaluate_images, ars=ars, **common
        )
    return out
