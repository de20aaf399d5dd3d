"""Membership-inference attacks: per-example scores, loss threshold, offline LiRA, ROC metrics.

Scores are "higher = more likely a member". The loss-threshold attack (Yeom et al.)
scores ``-loss``. The LiRA-style attack (Carlini et al., offline variant) compares the
target model's logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` on an example with
its distribution under shadow models that never trained on it, ``(phi - mu_out) /
sigma_out`` with a global sigma (the paper's choice for few shadows), so examples that
are easy for every model stop looking like members.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["example_scores", "lira_offline", "roc_metrics"]


@torch.no_grad()
def example_scores(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example cross-entropy loss and logit-scaled confidence ``phi`` of ``model``."""
    model.eval()
    losses, phis = [], []
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        z = model(x).double()
        losses.append(F.cross_entropy(z, y, reduction="none"))
        # log p_y - log(1 - p_y) = z_y - logsumexp(z_{k != y}), stable for confident models
        others = z.scatter(1, y.unsqueeze(1), float("-inf"))
        phis.append(z.gather(1, y.unsqueeze(1)).squeeze(1) - torch.logsumexp(others, 1))
    return torch.cat(losses).cpu().numpy(), torch.cat(phis).cpu().numpy()


def lira_offline(target_phi: np.ndarray, shadow_phi: np.ndarray) -> np.ndarray:
    """Offline LiRA scores: ``(phi - mean_out) / global_std_out`` per example.

    Parameters
    ----------
    target_phi
        ``[n]`` confidences of the audited model.
    shadow_phi
        ``[k, n]`` confidences of ``k >= 2`` shadow models that did not train on any of the n examples.
    """
    if shadow_phi.ndim != 2 or len(shadow_phi) < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got shape {shadow_phi.shape}")
    mu = shadow_phi.mean(0)
    sigma = float((shadow_phi - mu).std()) + 1e-8
    return (target_phi - mu) / sigma


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    ok = fpr <= limit
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_metrics(members: np.ndarray, nonmembers: np.ndarray, *, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """AUC and TPR at 1% and 0.1% FPR of scores (higher = member), the curve, and their uncertainty.

    TPR at a FPR is the best TPR among thresholds whose FPR does not exceed it (with
    fewer than 1000 non-members, 0.1% FPR means no false positive at all). ``auc_ci95`` and
    ``tpr_at_1pct_fpr_ci95``: 2.5th and 97.5th percentiles over ``bootstrap`` resamples of
    the members and of the non-members (each with replacement, from a ``seed``-ed stream).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    members, nonmembers = np.asarray(members), np.asarray(nonmembers)
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    s = np.r_[members, nonmembers]
    fpr, tpr, _ = roc_curve(y, s)
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(bootstrap):
        m = members[rng.integers(len(members), size=len(members))]
        n = nonmembers[rng.integers(len(nonmembers), size=len(nonmembers))]
        bf, bt, _ = roc_curve(y, np.r_[m, n])
        aucs.append(roc_auc_score(y, np.r_[m, n]))
        tprs.append(_tpr_at(bf, bt, 0.01))

    def interval(values: list[float]) -> list[float] | None:
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None

    return {
        "auc": float(roc_auc_score(y, s)),
        "auc_ci95": interval(aucs),
        "tpr_at_1pct_fpr": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_1pct_fpr_ci95": interval(tprs),
        "tpr_at_0.1pct_fpr": _tpr_at(fpr, tpr, 0.001),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "curve": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }
