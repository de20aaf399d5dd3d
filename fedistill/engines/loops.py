"""Small training loops shared by engines that train networks while distilling.

Gradient matching trains its sampled network on the synthetic set between
matching steps; trajectory matching trains its experts on the real data. Both use
:func:`train_epochs`. (Evaluation models are trained by
:func:`fedistill.training.train_model`, which owns its recipe and schedule.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import DSA

__all__ = ["classification_loss", "train_epochs"]


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels ``[N]`` or soft-label probability rows ``[N, K]``."""
    if targets.ndim == 2:
        return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, targets)


def train_epochs(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    dsa: DSA | None = None,
) -> None:
    """Train ``net`` for ``epochs`` passes over ``(images, targets)`` in shuffled batches.

    Parameters
    ----------
    opt
        Optimizer over ``net``'s parameters (stepped once per batch).
    targets
        Hard labels or soft-label rows (see :func:`classification_loss`).
    generator
        Drives the batch order and the per-image DSA parameters.
    dsa
        Per-image augmentation, or ``None``.
    """
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=generator).to(images.device)
        for i in range(0, len(images), batch_size):
            idx = perm[i : i + batch_size]
            x = images[idx]
            if dsa is not None:
                x = dsa(x, generator)
            loss = classification_loss(net(x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
