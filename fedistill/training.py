"""The one training loop: train a fresh model on images and targets, test it on real data.

Everything that trains a model on a set of images goes through :func:`train_model`:
the evaluation of synthetic sets (:mod:`fedistill.evaluation`), the teachers of the
decoupled engines (:mod:`fedistill.engines.teacher`), the federated server and
clients (:mod:`fedistill.federated`) and the membership-inference audit
(:mod:`fedistill.privacy.audit`). The recipe (:class:`EvalRecipe`) is the literature's:
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half the epochs,
DSA augmentation on by default. The random real subset with given class counts
(:func:`random_subset`) lives here too, since the baselines, the soft-label relabelling
and the audit all draw it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import DatasetInfo, Split
from fedistill.models import build_model
from fedistill.seeding import derive_seed, torch_generator

__all__ = [
    "EvalRecipe",
    "ModelSpec",
    "TrainingData",
    "accuracy",
    "random_subset",
    "random_subset_indices",
    "test_metrics",
    "train_model",
]


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


TrainingData = tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``(images, targets)``, or a function ``run -> (images, targets)`` for data drawn per run."""
