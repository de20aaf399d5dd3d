"""Expert trajectories for trajectory matching (MTT, TESLA; DynaFed reuses them on the server).

An expert is a network trained on real data whose parameters are saved, as one flat
vector, before training and after every epoch. :func:`expert_trajectories` trains
``num_experts`` of them and caches the stacked vectors on disk (safetensors), keyed by
the data's fingerprint, the architecture, the seed and the training settings, so a
client or a rerun with the same data reuses them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import Split
from fedistill.engines.loops import train_epochs
from fedistill.io import cache_path, cached_tensors
from fedistill.models import build_model
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["FlatModel", "data_fingerprint", "expert_trajectories", "experts_cached"]


class FlatModel:
    """Calls ``net`` with its parameters taken from one flat vector (``functional_call``)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.sizes = [p.numel() for p in net.parameters()]

    def vector(self) -> torch.Tensor:
        """The module's current parameters as one detached vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = theta.split(self.sizes)
        params = {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}
        return functional_call(self.net, params, (x,))


def data_fingerprint(data: Split) -> str:
    """SHA-256 of the images and labels: different client partitions get different experts."""
    h = hashlib.sha256()
    h.update(data.images.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def expert_trajectories(data: Split, config: Any, *, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"expert_i": [expert_train_epochs + 1, P]}`` parameter vectors, from the disk cache when present.

    Expert ``i`` starts from a seeded initialization and trains with SGD and
    (optionally) per-image DSA; its parameters are saved before training and after
    every epoch. ``config`` is an :class:`~fedistill.engines.mtt.MTTConfig` (or anything
    with its ``num_experts``, ``expert_*``, ``model``, ``model_kwargs``, ``dsa`` and
    ``cache_dir`` fields).
    """
    cfg = config

    def build() -> dict[str, torch.Tensor]:
        images, labels = data.images.to(device), data.labels.to(device)
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        out = {}
        for i in range(cfg.num_experts):
            net = build_model(cfg.model, data.info, seed=derive_seed(seed, "mtt-expert", i), **cfg.model_kwargs)
            net = net.to(device)
            flat = FlatModel(net)
            opt = torch.optim.SGD(net.parameters(), lr=cfg.expert_lr, momentum=cfg.expert_momentum)
            gen = torch_generator(seed, "mtt-expert-batches", i)
            snaps = [flat.vector()]
            for _ in range(cfg.expert_train_epochs):
                train_epochs(net, opt, images, labels, epochs=1, batch_size=cfg.expert_batch, generator=gen, dsa=dsa)
                snaps.append(flat.vector())
            out[f"expert_{i}"] = torch.stack(snaps).cpu()
        return out

    return cached_tensors("experts", build, root=cfg.cache_dir, **_cache_parts(data, cfg, seed))


def _cache_parts(data: Split, cfg: Any, seed: int) -> dict[str, Any]:
    return {
        "dataset": data.info.name,
        "data": data_fingerprint(data),
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "seed": seed,
        "num_experts": cfg.num_experts,
        "epochs": cfg.expert_train_epochs,
        "lr": cfg.expert_lr,
        "momentum": cfg.expert_momentum,
        "batch": cfg.expert_batch,
        "dsa": cfg.dsa,
    }


def experts_cached(data: Split, config: Any, *, seed: int) -> bool:
    """Whether :func:`expert_trajectories` would load these experts from the disk cache."""
    return cache_path("experts", config.cache_dir, **_cache_parts(data, config, seed)).is_file()
