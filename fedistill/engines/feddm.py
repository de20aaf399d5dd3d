"""FedDM's client-side matching (Xiong et al., CVPR 2023).

Distribution matching around a *given* network instead of fresh random ones: each
iteration perturbs the base weights ``w`` (in federated training, the global model
the server sent) to ``w' = w + g * min(1, rho / ||g||)`` with ``g ~ N(0, I)`` and
matches, per class, the mean embeddings *and* the mean logits of real and synthetic
images under ``w'``. Without a base (``fedistill central method=feddm``) the base is
one random initialization, fixed for the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedistill.engines.base import register_engine
from fedistill.engines.dm import DMConfig, DMEngine
from fedistill.models import reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["FedDMConfig", "FedDMEngine"]


@dataclass(frozen=True)
class FedDMConfig(DMConfig):
    """FedDM hyperparameters (reference: rho 5, lr 1, momentum 0.5, ~1000 steps).

    Attributes
    ----------
    rho
        Radius of the weight perturbation around the base network.
    logit_weight
        Weight of the class-mean logit term beside the embedding term.
    min_class_samples
        Classes with fewer local samples are dropped (the reference uses 10).
    """

    rho: float = 5.0
    logit_weight: float = 1.0
    min_class_samples: int = 10


@register_engine("feddm")
class FedDMEngine(DMEngine):
    """Distribution matching around a perturbed base network (``method=feddm``)."""

    name = "feddm"
    Config = FedDMConfig
    accepts = frozenset({"checkpoint", "base_state"})

    def features(self, net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Embeddings concatenated with ``sqrt(logit_weight)``-scaled logits."""
        scale = float(self.config.logit_weight) ** 0.5

        def both(x: torch.Tensor) -> torch.Tensor:
            emb = net.embed(x)
            return torch.cat([emb, scale * net.classifier(emb)], dim=1)

        return both

    def setup(self, ctx: dict[str, Any], *, base_state: Mapping[str, torch.Tensor] | None = None) -> None:
        """``base_state``: the network to match around (a state dict); ``None``: one random initialization."""
        ctx["base"] = None if base_state is None else {k: v.detach().clone() for k, v in base_state.items()}

    def prepare_network(self, net: nn.Module, iteration: int, ctx: dict[str, Any]) -> None:
        """Load the base weights and add a Gaussian perturbation of norm at most ``rho``."""
        if ctx["base"] is None:
            reinitialize(net, derive_seed(ctx["seed"], "feddm-base"))
            ctx["base"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(ctx["base"])
        params = list(net.parameters())
        g = torch_generator(ctx["seed"], "feddm-perturb", iteration)
        noise = [torch.randn(p.shape, generator=g).to(p.device) for p in params]
        norm = torch.sqrt(sum((n**2).sum() for n in noise))
        scale = min(1.0, self.config.rho / max(float(norm), 1e-12))
        with torch.no_grad():
            for p, n in zip(params, noise, strict=True):
                p.add_(n, alpha=scale)

    def extra_metadata(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """The perturbation radius."""
        return {"rho": self.config.rho}
