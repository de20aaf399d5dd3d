"""Aggregate-then-distill DP (``strategy=dp_stats``), the library side.

Record-level DP where every client distills alone from its own noisy statistics wastes
the federation: each client's class sums carry its own full noise, and a client with a
dozen records per class is swamped by it. Here every client releases noisy per-class
sums of clipped embeddings under *shared* random networks and augmentations (fixed by a
public ``release_seed``: data-independent), accounted in its own ledger exactly as
``dp_dm`` does; the server adds them up over clients (and rounds), where the signal grows
with the number of records while independent noise grows only with the square root of
the number of clients, and distills one synthetic set against the aggregated noisy
class means. Summing and distilling are post-processing: they cost no budget.

A release row of a record is ``[sqrt(1 - w^2) clip(e), w clip]`` (``w`` =
``count_share``): the last column sums to a noisy record count, so the class sizes need
not be public. Without secure aggregation the server sees every client's noisy sums
(each is DP on its own); the noise each client adds is the full noise of its budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedistill.data.base import DatasetInfo
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import build_engine
from fedistill.engines.dp import release_means
from fedistill.models import build_model
from fedistill.privacy.accounting import calibrate_noise
from fedistill.seeding import torch_generator

__all__ = [
    "RELEASE_KEY",
    "ReleaseError",
    "distill_from_sums",
    "release_bound",
    "release_engine",
    "release_shape",
    "validate_release",
]

RELEASE_KEY = "sums"
"""The one array of a client's release reply: ``[R, K, D + 1]`` noisy sums and counts."""


class ReleaseError(ValueError):
    """A client's release reply is malformed (wrong keys, shape or values)."""


def release_engine(method: Mapping[str, Any], model: Mapping[str, Any]) -> Any:
    """The ``dp_dm`` engine of a ``method`` group (its ``name`` ignored) and a ``model`` group."""
    options = {k: v for k, v in method.items() if k != "name"}
    spec = dict(model)
    name = spec.pop("name")
    return build_engine("dp_dm", model=name, model_kwargs=spec, **options)


def release_shape(method: Mapping[str, Any], model: Mapping[str, Any], info: DatasetInfo) -> tuple[int, int, int]:
    """``(R, K, D + 1)``: the releases of one round, the classes, the embedding width plus the count column."""
    engine = release_engine(method, model)
    net = build_model(engine.config.model, info, **engine.config.model_kwargs)
    with torch.no_grad():
        dim = int(net.embed(torch.zeros(1, *info.shape)).shape[1])
    return engine.num_releases(), info.num_classes, dim + 1


def release_bound(method: Mapping[str, Any], *, rounds: int, noise_share: float) -> float:
    """A public bound on every coordinate of one client's release sums (secure aggregation's scale).

    A release sums at most the class's Poisson sample, whose mean is at most ``batch_real``
    when the rate is derived (``sample_rate: null``); each record adds at most ``clip`` to a
    coordinate. The noise std is at most ``sigma x clip x noise_share`` with ``sigma``
    calibrated at sampling rate 1 (the largest any client can need). The bound is that
    sample's mean plus 6 standard deviations, plus 6 noise standard deviations; a client
    counts and reports the values beyond it (``secure_clipped``), which secure aggregation
    would clip.
    """
    cfg = release_engine(method, {"name": "convnet"}).config
    steps = min(cfg.releases or cfg.iterations, cfg.iterations) * max(1, int(cfg.planned_rounds or rounds))
    if cfg.sigma is not None:
        sigma = float(cfg.sigma)
    else:
        rate = 1.0 if cfg.sample_rate is None else float(cfg.sample_rate)
        sigma = calibrate_noise(
            epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=rate, steps=steps, accountant=cfg.accountant
        )
    records = cfg.batch_real + 6 * math.sqrt(cfg.batch_real) + 6
    return float(cfg.clip) * (records + 6 * sigma * noise_share)


def validate_release(tensors: Mapping[str, torch.Tensor], *, shape: Sequence[int]) -> torch.Tensor:
    """A release reply's sums as float64, checked: exactly ``{"sums"}``, the expected shape, finite values.

    Raises
    ------
    ReleaseError
        Naming the problem.
    """
    if set(tensors) != {RELEASE_KEY}:
        raise ReleaseError(f"a release reply needs exactly ['{RELEASE_KEY}'], got {sorted(tensors)}")
    sums = tensors[RELEASE_KEY]
    if tuple(sums.shape) != tuple(shape):
        raise ReleaseError(
            f"release sums have shape {list(sums.shape)}, expected {list(shape)} [releases, classes, D+1]"
        )
    if not sums.is_floating_point() or not bool(torch.isfinite(sums).all()):
        raise ReleaseError("release sums must be finite floating-point values")
    return sums.double()


def distill_from_sums(
    total: torch.Tensor,
    *,
    info: DatasetInfo,
    method: Mapping[str, Any],
    model: Mapping[str, Any],
    ipc: int,
    count_share: float,
    min_records: float,
    release_seed: int,
    seed: int,
    device: torch.device,
) -> SyntheticSet | None:
    """Distill ``ipc`` images per class against the class means of the summed releases ``total``.

    Classes whose noisy record count (averaged over releases) is below ``min_records``
    get no images; ``None`` when no class has that many. Post-processing only: the
    networks and augmentations are the releases' (``release_seed``), the images start
    from noise (``seed``).
    """
    engine = release_engine(method, model)
    clip = float(engine.config.clip)
    raw_counts = (total[..., -1] / (count_share * clip)).mean(0)
    classes = [c for c in range(info.num_classes) if float(raw_counts[c]) >= min_records]
    if not classes:
        return None
    means, _ = release_means(total, clip=clip, count_share=count_share, min_count=min_records)
    labels = torch.tensor(classes).repeat_interleave(ipc)
    images = torch.randn(len(labels), *info.shape, generator=torch_generator(seed, "synthetic-init"))
    syn = engine.match(images, labels, means[:, classes].float(), info=info, release_seed=release_seed, device=device)
    syn.metadata.update(
        init="noise",
        seed=seed,
        noisy_counts={str(c): round(float(raw_counts[c]), 2) for c in range(info.num_classes)},
        count_share=count_share,
        releases=int(total.shape[0]),
    )
    return syn
