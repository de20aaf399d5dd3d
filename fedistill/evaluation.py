"""Honest evaluation of synthetic sets: train fresh models on them, test on real data.

The literature's recipe (REFERENCE.md section 2): SGD lr 0.01, momentum 0.9, weight
decay 5e-4, batch 256, lr x0.1 at half the epochs, DSA augmentation on by default;
the *final* epoch's test accuracy is reported (never the best epoch), as mean and
std over runs with fixed seeds. Baselines use the same recipe and the same seeds:
the random real subset of the same size (always) and the whole training set
(optional, cached on disk). Soft labels (KD at a temperature) are always reported
beside the hard-label and random-subset numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import DataBundle, DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.models import build_model
from fedistill.seeding import derive_seed, torch_generator

__all__ = [
    "EvalRecipe",
    "ModelSpec",
    "accuracy",
    "evaluate_images",
    "evaluate_synthetic",
    "random_subset",
    "random_subset_indices",
    "summarize",
    "test_metrics",
    "train_model",
]

EvalProgress = Callable[[str, int, int], None]
"""``progress(label, done, total)`` called after each trained model."""


@dataclass(frozen=True)
class EvalRecipe:
    """Training recipe for evaluation models.

    Attributes
    ----------
    epochs
        Training epochs (papers: 300 without, 1000 with DSA; CPU presets use fewer).
    max_steps
        ``None``: train ``epochs`` passes over the data. A number caps the training at
        that many mini-batch steps (the lr then drops x0.1 at half of them), whatever the
        data's size: a server's cost fits its budget, not the size of an ever-larger
        union of client sets. Below the cap, training is exactly ``epochs`` passes.
    lr, momentum, weight_decay, batch_size
        SGD settings; the lr drops x0.1 at half the epochs.
    dsa
        Per-image DSA augmentation during training.
    temperature
        KD temperature for soft labels.
    lr_decay
        Drop the lr x0.1 at half the epochs (off for short local training).
    soft_lr
        The lr of KD runs (soft-label targets), or ``None`` for ``lr``. With few steps
        (one batch per epoch) KD at temperature 4 learns far slower than cross-entropy
        at lr 0.01; the synthetic set and its random baseline always share it.
    online_labels
        Soft-label runs take their targets from the teacher on every augmented view
        (as SRe2L/RDED relabel) instead of the rows stored per image.
    """

    epochs: int = 300
    max_steps: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    temperature: float = 4.0
    lr_decay: bool = True
    soft_lr: float | None = None
    online_labels: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name and its options."""

    name: str = "convnet"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short display name, e.g. ``convnet-w32``."""
        return f"{self.name}-w{self.kwargs['width']}" if "width" in self.kwargs else self.name


def train_model(
    spec: ModelSpec,
    info: DatasetInfo,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    recipe: EvalRecipe,
    seed: int,
    device: torch.device,
    init_state: dict[str, torch.Tensor] | None = None,
    relabel: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sample_weights: torch.Tensor | None = None,
    regularizer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Train a fresh ``spec`` model on ``images`` (or continue from ``init_state``).

    Parameters
    ----------
    targets
        ``[N]`` int64 hard labels (cross-entropy) or ``[N, K]`` probabilities (KD with
        ``recipe.temperature``).
    seed
        Drives initialization, batch order and augmentation.
    init_state
        Start from these weights (a state dict) instead of a fresh initialization.
    relabel
        For soft targets: ``relabel(augmented batch) -> probabilities`` replaces the stored
        rows on every view (online teacher labels).
    sample_weights
        ``[N]`` per-row loss weights (e.g. a server policy's class reweighting), or ``None``.
    regularizer
        ``regularizer(logits, targets)`` of each batch, added to the loss (e.g. FedAF's
        knowledge-matching term), or ``None``.
    """
    model = build_model(spec.name, info, seed=derive_seed(seed, "init"), **spec.kwargs).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    soft = targets.ndim == 2
    lr = recipe.soft_lr if soft and recipe.soft_lr is not None else recipe.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    per_epoch = max(1, math.ceil(len(images) / recipe.batch_size))
    total = recipe.epochs * per_epoch
    # the lr drops x0.1 after half the epochs (as MultiStepLR would), or at half a binding step cap
    decay_at = max(1, recipe.epochs // 2) * per_epoch if recipe.lr_decay else -1
    if recipe.max_steps is not None and recipe.max_steps < total:
        total = recipe.max_steps
        decay_at = total // 2 if recipe.lr_decay else -1
    gen = torch_generator(seed, "batches")
    dsa = DSA(DSAConfig(flip=info.flip)) if recipe.dsa else None
    images, targets = images.to(device), targets.to(device)
    weights = None if sample_weights is None else sample_weights.to(device, torch.float32)
    t = recipe.temperature
    model.train()
    step = 0
    while step < total and len(images):
        perm = torch.randperm(len(images), generator=gen).to(device)
        for i in range(0, len(images), recipe.batch_size):
            if step == total:
                break
            if step == decay_at:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            step += 1
            idx = perm[i : i + recipe.batch_size]
            x, y = images[idx], targets[idx]
            if dsa is not None:
                x = dsa(x, gen)
            if soft and relabel is not None:
                y = relabel(x)
            out = model(x)
            if weights is not None:
                loss = (_per_row_loss(out, y, t) * weights[idx]).mean()
            elif soft:
                loss = F.kl_div(F.log_softmax(out / t, 1), y, reduction="batchmean") * t * t
            else:
                loss = F.cross_entropy(out, y)
            if regularizer is not None:
                loss = loss + regularizer(out, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def _per_row_loss(out: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """Cross-entropy (hard ``y``) or KD at temperature ``t`` (soft ``y``), one value per row."""
    if y.ndim == 2:
        return F.kl_div(F.log_softmax(out / t, 1), y, reduction="none").sum(1) * t * t
    return F.cross_entropy(out, y, reduction="none")


@torch.no_grad()
def test_metrics(
    model: nn.Module, split: Split, *, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``model`` on ``split``."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(split), batch_size):
        x, y = split.images[i : i + batch_size].to(device), split.labels[i : i + batch_size].to(device)
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
    n = max(1, len(split))
    return correct / n, loss / n


def accuracy(model: nn.Module, split: Split, *, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``split``."""
    return test_metrics(model, split, device=device, batch_size=batch_size)[0]


def random_subset_indices(train: Split, labels: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Positions of random real images with the per-class counts of ``labels`` (capped by what ``train`` has)."""
    g = torch_generator(seed, "random-subset")
    picks = [torch.zeros(0, dtype=torch.long)]
    for c, n in enumerate(torch.bincount(labels, minlength=train.info.num_classes).tolist()):
        if n:
            idx = torch.nonzero(train.labels == c).flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picks)


def random_subset(train: Split, labels: torch.Tensor, *, seed: int) -> Split:
    """Random real images with the same per-class counts as ``labels``."""
    return train.subset(random_subset_indices(train, labels, seed=seed))


def summarize(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "runs"}`` of accuracies in percent."""
    vals = [round(100 * v, 4) for v in values]
    std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return {"mean": round(statistics.fmean(vals), 4), "std": round(std, 4), "runs": vals}


TrainingData = tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``(images, targets)``, or a function ``run -> (images, targets)`` for data drawn per run."""


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
    """The whole-training-set baseline, cached on disk by what determines it."""
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
    res = evaluate_images(data, bundle, label=f"whole set {spec.label}", **common)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": json.loads(key), "result": res}, indent=2))
    return res


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
    from fedistill import softlabel

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
        whole = _whole_dataset(bundle, recipe=whole_recipe or recipe, cache_dir=cache_dir, **common)
        out["baselines"]["whole_dataset"] = whole
    if ranking:
        from fedistill.ranking import evaluate_ranking

        rdm = sets.random_soft if sets.random_soft is not None else sets.random
        out["ranking"] = evaluate_ranking(first, sets.synthetic, rdm, whole, bundle, recipe=recipe, ars=ars, **common)
    return out
