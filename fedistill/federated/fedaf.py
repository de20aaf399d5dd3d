"""FedAF (Wang et al., CVPR 2024): aggregation-free federated learning, the library side.

Per round the server sends the global model; every client computes, on its real
data, class-wise mean logits ``V_kc`` and class-wise soft labels
``R_kc = mean softmax(z / tau)`` (:func:`class_stats`); the server averages them over
the clients that hold each class (:func:`aggregate_stats`) and sends ``V_c`` back;
clients condense with distribution matching plus ``lambda_loc`` times the sliced
Wasserstein distance between their synthetic images' logits and the global logit
distribution (:func:`sliced_wasserstein`, engine ``fedaf``); the server trains the
global model on the synthetic sets with cross-entropy plus ``lambda_glob`` times the
symmetric KL between ``R_c`` and the global model's class-wise soft predictions on
synthetic data (:func:`knowledge_matching`). No client weights are ever averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.data.base import Split
from fedistill.engines.fedaf import sliced_wasserstein

__all__ = [
    "STATS_KEYS",
    "StatsError",
    "aggregate_stats",
    "class_stats",
    "knowledge_matching",
    "sliced_wasserstein",
    "validate_stats",
]

STATS_KEYS = ("class_logits", "class_soft", "class_counts")
"""The arrays of a client's statistics reply (``[K, K]``, ``[K, K]``, ``[K]``)."""


class StatsError(ValueError):
    """A client's class statistics are malformed (wrong keys, shapes or values)."""


@torch.no_grad()
def class_stats(
    model: nn.Module, split: Split, *, temperature: float = 2.0, device: torch.device, batch_size: int = 512
) -> dict[str, torch.Tensor]:
    """Class-wise mean logits and mean soft labels of ``model`` on a client's real data.

    Returns
    -------
    dict
        ``class_logits`` ``[K, K]`` (row ``c``: mean logits of class ``c``, zero when
        absent), ``class_soft`` ``[K, K]`` (mean ``softmax(z / temperature)``) and
        ``class_counts`` ``[K]`` (float32 sample counts).
    """
    k = split.info.num_classes
    model = model.to(device).eval()
    logits_sum = torch.zeros(k, k)
    soft_sum = torch.zeros(k, k)
    for i in range(0, len(split), batch_size):
        x, y = split.images[i : i + batch_size].to(device), split.labels[i : i + batch_size]
        z = model(x).float().cpu()
        logits_sum.index_add_(0, y, z)
        soft_sum.index_add_(0, y, F.softmax(z / temperature, dim=1))
    counts = split.class_counts().float()
    denom = counts.clamp(min=1).unsqueeze(1)
    return {"class_logits": logits_sum / denom, "class_soft": soft_sum / denom, "class_counts": counts}


def validate_stats(stats: Mapping[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Check a statistics reply (keys, shapes, finite values, probability rows); return float32 copies.

    Raises
    ------
    StatsError
        Naming the offending array.
    """
    if set(stats) != set(STATS_KEYS):
        raise StatsError(f"class statistics need exactly {list(STATS_KEYS)}, got {sorted(stats)}")
    k = num_classes
    shapes = {"class_logits": (k, k), "class_soft": (k, k), "class_counts": (k,)}
    out = {}
    for key, shape in shapes.items():
        t = stats[key]
        if tuple(t.shape) != shape:
            raise StatsError(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        t = t.detach().cpu().float()
        if not torch.isfinite(t).all():
            raise StatsError(f"{key} contains NaN or infinite values")
        out[key] = t
    counts = out["class_counts"]
    if (counts < 0).any():
        raise StatsError("class_counts has negative entries")
    rows = out["class_soft"][counts > 0]
    if (rows < 0).any() or not torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-3):
        raise StatsError("class_soft rows of held classes must be probability vectors")
    return out


def aggregate_stats(stats: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average clients' class statistics over the clients that hold each class (weighted by counts).

    Returns
    -------
    dict
        ``class_logits`` ``V_c`` and ``class_soft`` ``R_c`` (``[K, K]``; zero rows for
        classes no client holds), ``class_counts`` (summed) and ``holders`` (clients
        holding each class, ``[K]``).
    """
    if not stats:
        raise ValueError("no client statistics to aggregate")
    counts = torch.stack([s["class_counts"] for s in stats])  # [C, K]
    total = counts.sum(0)
    weights = counts / total.clamp(min=1)
    out = {key: (weights.unsqueeze(2) * torch.stack([s[key] for s in stats])).sum(0) for key in STATS_KEYS[:2]}
    out["class_counts"] = total
    out["holders"] = (counts > 0).sum(0).float()
    return out


def knowledge_matching(
    class_soft: torch.Tensor, *, weight: float = 0.8, temperature: float = 2.0, eps: float = 1e-8
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """FedAF's server-side local-global knowledge matching term, as a training regularizer.

    For the classes present in a batch, ``T_c`` is the mean ``softmax(z / temperature)``
    of the global model over the batch's rows of class ``c``; the term is ``weight``
    times the mean over those classes of ``KL(R_c || T_c) + KL(T_c || R_c)``.

    Parameters
    ----------
    class_soft
        ``[K, K]`` aggregated client soft labels ``R_c``.

    Returns
    -------
    callable
        ``regularizer(logits, targets)`` for :func:`fedistill.training.train_model`
        (targets: hard labels, or soft rows whose argmax is used).
    """
    ref = class_soft.float()

    def regularizer(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.argmax(1) if targets.ndim == 2 else targets
        probs = F.softmax(logits / temperature, dim=1)
        k = probs.shape[1]
        sums = torch.zeros(k, k, device=probs.device, dtype=probs.dtype).index_add(0, y, probs)
        counts = torch.bincount(y, minlength=k)
        present = counts > 0
        t = sums[present] / counts[present].unsqueeze(1).to(probs.dtype)
        r = ref.to(probs.device)[present]
        t, r = t.clamp(min=eps), r.clamp(min=eps)
        sym = ((r - t) * (r.log() - t.log())).sum(1)  # KL(r||t) + KL(t||r)
        return weight * sym.mean()

    return regularizer
