"""Higher-order distribution matching (``method=dm_hom``): DM plus a Gaussian-kernel MMD.

DM matches only the per-class *mean* embedding. This variant adds the squared
maximum mean discrepancy under a Gaussian kernel, a characteristic kernel, so all
moments of the embedding distributions are matched (the M3D idea, Zhang et al.,
AAAI 2024). The MMD is computed with random Fourier features ``phi`` (Rahimi & Recht):
``MMD^2(P, Q) ~ || mean phi(P) - mean phi(Q) ||^2``, which is again a difference of
class means, so the real branch reuses DM's chunked, no-grad, optionally bf16 and
compiled class-mean machinery unchanged. Fresh features (and a median-heuristic
bandwidth from the detached synthetic embeddings) are drawn every iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedistill.engines.base import register_engine
from fedistill.engines.dm import DMConfig, DMEngine
from fedistill.engines.matching import real_class_means, synthetic_class_means
from fedistill.seeding import torch_generator

__all__ = ["DMHomConfig", "DMHomEngine", "random_fourier_features"]


@dataclass(frozen=True)
class DMHomConfig(DMConfig):
    """:class:`~fedistill.engines.dm.DMConfig` plus the MMD term.

    Attributes
    ----------
    mean_weight
        Weight of DM's squared mean distance.
    mmd_weight
        Weight of the Gaussian-kernel MMD^2 (summed over classes), which is scaled by
        the squared bandwidth so that for wide kernels it tends to DM's mean term.
    num_features
        Random Fourier features per iteration (the MMD estimate's resolution).
    bandwidth
        Kernel width as a multiple of the median pairwise distance of the synthetic
        embeddings.
    """

    mean_weight: float = 1.0
    mmd_weight: float = 1.0
    num_features: int = 1024
    bandwidth: float = 1.0


def random_fourier_features(x: torch.Tensor, weight: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``sqrt(2/F) cos(x W + b)``: inner products approximate a Gaussian kernel.

    ``weight`` is ``[D, F]`` with entries ``N(0, 1/sigma^2)``, ``phase`` uniform in
    ``[0, 2 pi)``; then ``phi(x) . phi(y) ~ exp(-||x - y||^2 / (2 sigma^2))``.
    """
    return math.sqrt(2.0 / weight.shape[1]) * torch.cos(x.float() @ weight + phase)


@register_engine("dm_hom")
class DMHomEngine(DMEngine):
    """Distribution matching of means and of all higher moments (``method=dm_hom``)."""

    name = "dm_hom"
    reuses_releases = False  # fresh random Fourier features every iteration
    Config = DMHomConfig

    def setup(self, ctx: dict[str, Any], **inputs: Any) -> None:
        """The random Fourier features draw from their own stream (checkpointed with the loop's)."""
        ctx["generators"]["rff"] = torch_generator(ctx["seed"], "dm_hom-rff")

    def embedding_loss(
        self, net: nn.Module, real: torch.Tensor, syn: torch.Tensor, ctx: dict[str, Any]
    ) -> torch.Tensor:
        """``mean_weight * DM + mmd_weight * MMD^2`` summed over classes."""
        cfg = self.config
        dsa = ctx["dsa"]
        syn_emb = ctx["syn_embed"](syn if dsa is None else dsa.apply(syn, ctx["params"], ctx["syn_aug_groups"]))
        dim = syn_emb.shape[1]
        with torch.no_grad():
            flat = syn_emb.detach().float()
            dists = torch.pdist(flat) if len(flat) > 1 else flat.new_ones(1)
            sigma = cfg.bandwidth * float(dists.median().clamp_min(1e-6))
        weight = (torch.randn(dim, cfg.num_features, generator=ctx["generators"]["rff"]) / sigma).to(syn_emb.device)
        phase = (torch.rand(cfg.num_features, generator=ctx["generators"]["rff"]) * 2 * math.pi).to(syn_emb.device)
        embed = ctx["real_embed"]

        def stats(x: torch.Tensor) -> torch.Tensor:  # [embedding | its Fourier features], one real pass
            emb = embed(x).float()
            return torch.cat([emb, random_fourier_features(emb, weight, phase)], 1)

        real = real_class_means(
            stats,
            real,
            ctx["real_groups"],
            ctx["counts"],
            dsa=dsa,
            params=ctx["params"],
            chunk=cfg.real_chunk,
            dtype=ctx["real_dtype"],
            aug_groups=ctx["real_aug_groups"],
        )
        syn_mean = synthetic_class_means(syn_emb, ctx)
        syn_phi = synthetic_class_means(random_fourier_features(syn_emb, weight, phase), ctx)
        mean_term = ((real[:, :dim] - syn_mean) ** 2).sum()
        # sigma^2 MMD^2 -> the squared mean distance for wide kernels: the weights compare like for like
        mmd_term = sigma**2 * ((real[:, dim:] - syn_phi) ** 2).sum()
        return cfg.mean_weight * mean_term + cfg.mmd_weight * mmd_term
