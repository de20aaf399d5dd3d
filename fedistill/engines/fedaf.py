"""FedAF's client condensation (Wang et al., CVPR 2024): DM plus local-global logit matching.

Distribution matching around a *re-sampled* copy of the global model the server sent:
each iteration ``w = gamma * w_global + (1 - gamma) * w_fresh`` with a fresh random
initialization ``w_fresh`` (without a global model, plain DM's fresh network). Beside the
class-mean embedding term, ``lambda_loc`` times the sliced Wasserstein distance between
the per-image logits of the synthetic images and the global logit distribution (the
server's class-wise mean logits ``V_c``, one point per synthetic image of class ``c``)
pulls the synthetic set towards what the whole federation's data looks like to the
global model. The SWD is computed in torch so its gradient reaches the images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedistill.engines.base import register_engine
from fedistill.engines.dm import DMConfig, DMEngine
from fedistill.engines.matching import synthetic_class_means
from fedistill.models import reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["FedAFConfig", "FedAFEngine", "sliced_wasserstein"]


@dataclass(frozen=True)
class FedAFConfig(DMConfig):
    """FedAF client hyperparameters (reference: lambda_loc 0.8, gamma 0.9; DM's lr 1, momentum 0.5).

    Attributes
    ----------
    lambda_loc
        Weight of the SWD term between synthetic logits and the global logits.
    gamma
        Model re-sampling: the share of the global weights in each iteration's network.
    projections
        Random directions of the sliced Wasserstein distance.
    """

    lambda_loc: float = 0.8
    gamma: float = 0.9
    projections: int = 64


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, *, projections: int = 64, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sliced Wasserstein-2 distance (squared) between point clouds, differentiable in torch.

    Both clouds are projected onto ``projections`` random unit directions; the sorted
    projections are compared by mean squared difference. Clouds of different sizes are
    compared at the quantiles of the larger one (linear interpolation).

    Parameters
    ----------
    x, y
        ``[N, D]`` and ``[M, D]`` points (gradients flow to both).
    projections
        Number of random directions.
    generator
        Drives the directions (drawn on the CPU, then moved to ``x``'s device).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need [N, D] and [M, D] point clouds, got {tuple(x.shape)} and {tuple(y.shape)}")
    dirs = torch.randn(x.shape[1], projections, generator=generator).to(x.device, x.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    n = max(len(px), len(py))
    return ((_quantiles(px, n) - _quantiles(py, n)) ** 2).mean()


def _quantiles(sorted_proj: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced quantiles of each column of sorted projections (linear interpolation)."""
    m = len(sorted_proj)
    if m == n:
        return sorted_proj
    pos = torch.linspace(0, m - 1, n, device=sorted_proj.device, dtype=sorted_proj.dtype)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


@register_engine("fedaf")
class FedAFEngine(DMEngine):
    """DM around a re-sampled global model plus the SWD logit term (``method=fedaf``)."""

    name = "fedaf"
    Config = FedAFConfig
    accepts = frozenset({"checkpoint", "base_state", "global_logits"})

    def setup(
        self,
        ctx: dict[str, Any],
        *,
        base_state: Mapping[str, torch.Tensor] | None = None,
        global_logits: torch.Tensor | None = None,
    ) -> None:
        """``base_state``: the global model (a state dict) to re-sample around (``None``: plain DM
        networks); ``global_logits``: ``[K, K]`` class-wise mean logits ``V_c`` of the federation
        (``None``: no SWD term)."""
        ctx["base"] = None if base_state is None else {k: v.detach().clone() for k, v in base_state.items()}
        ctx["global_logits"] = None if global_logits is None else global_logits.detach().float()
        ctx["generators"]["swd"] = torch_generator(ctx["seed"], "fedaf-swd")

    def prepare_network(self, net: nn.Module, iteration: int, ctx: dict[str, Any]) -> None:
        """A fresh initialization, mixed with the global weights as ``gamma * w_global + (1 - gamma) * w_fresh``."""
        reinitialize(net, derive_seed(ctx["seed"], "fedaf-net", iteration))
        base = ctx["base"]
        if base is None:
            return
        gamma = float(self.config.gamma)
        with torch.no_grad():
            for name, t in net.state_dict().items():
                if t.is_floating_point():
                    t.mul_(1 - gamma).add_(base[name].to(t.device, t.dtype), alpha=gamma)

    def embedding_loss(
        self, net: nn.Module, real: torch.Tensor, syn: torch.Tensor, ctx: dict[str, Any]
    ) -> torch.Tensor:
        """DM's class-mean embedding term plus ``lambda_loc`` x SWD(synthetic logits, global logits)."""
        real_mean, syn_emb = self._embed_pair(net, real, syn, ctx)
        loss = ((real_mean - synthetic_class_means(syn_emb, ctx)) ** 2).sum()
        if ctx["global_logits"] is None or self.config.lambda_loc <= 0:
            return loss
        logits = net.classifier(syn_emb)
        target = ctx["global_logits"].to(logits.device)[ctx["classes"][ctx["syn_groups"]]]
        swd = sliced_wasserstein(
            logits, target, projections=self.config.projections, generator=ctx["generators"]["swd"]
        )
        return loss + self.config.lambda_loc * swd

    def extra_metadata(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """The re-sampling share and the SWD weight."""
        return {"gamma": self.config.gamma, "lambda_loc": self.config.lambda_loc}
