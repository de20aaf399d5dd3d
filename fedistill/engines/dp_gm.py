"""DP gradient matching engines, ``dp_dc`` and ``dp_dsa`` (PSG style).

The real gradient of every class is a DP-SGD release: per-sample gradients by ``torch.func``,
clipped, summed and noised once for all classes; matching it and training the network on the
synthetic set between steps are post-processing. Configs, the Poisson sampler and the sample
rate are shared with ``dp_dm`` (:mod:`fedistill.engines.dp`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedistill.augment import DSA
from fedistill.data.base import Split
from fedistill.engines.base import register_engine
from fedistill.engines.dp import DPDSAGMConfig, DPGMConfig, PoissonClassSampler, class_sample_rate
from fedistill.engines.gm import DCEngine
from fedistill.privacy import PrivacyLedger, PrivateRelease, check_private_setup
from fedistill.seeding import torch_generator

__all__ = ["DPDCEngine", "DPDSAEngine"]


@register_engine("dp_dc")
class DPDCEngine(DCEngine):
    """Gradient matching against DP-SGD real gradients (``method=dp_dc``)."""

    name = "dp_dc"
    Config = DPGMConfig
    default_init = "noise"
    accepts = frozenset({"ledger"})

    def setup(self, ctx: dict[str, Any], data: Split, *, ledger: PrivacyLedger | None = None) -> None:
        """Check the private setup and reserve every release in ``ledger`` (a holder's budget) before a
        record is read: one per outer step of every iteration, Poisson-sampled at one rate."""
        cfg = self.config
        check_private_setup(init=ctx["init"], net=ctx["net"], engine=self.name)
        ctx["rate"] = class_sample_rate(cfg, cfg.batch_real, data, ctx["classes"])
        ctx["release"] = PrivateRelease(
            cfg,
            ledger=ledger,
            releases=cfg.iterations * ctx["outer"],
            sample_rate=ctx["rate"],
            generator=torch_generator(ctx["seed"], "dp-noise"),
        )

    def extra_metadata(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """The privacy report of the releases made."""
        return {"privacy": ctx["release"].report()}

    def real_sampler(
        self, data: Split, classes: list[int], device: torch.device, ctx: dict[str, Any]
    ) -> PoissonClassSampler:
        """Poisson samples at the release's rate."""
        gen = torch_generator(ctx["seed"], f"{self.name}-real")
        return PoissonClassSampler(data, classes, ctx["rate"], device, gen)

    def real_targets(
        self, net: nn.Module, sampler: Any, classes: list[int], *, dsa: DSA | None, params: Any, ctx: dict[str, Any]
    ) -> list[tuple[Any, torch.Tensor | None]]:
        """Per class, the DP-SGD estimate of the real gradient (one release for all classes)."""
        real, groups = sampler.sample()
        if dsa is not None and len(real):
            real = dsa.apply(real, params, groups)
        labels = torch.tensor(classes, device=real.device)[groups]
        named = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

        def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(net, p, (x.unsqueeze(0),)), y.unsqueeze(0))

        per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))
        chunk = self.config.per_sample_chunk
        size = sum(p.numel() for p in named.values())
        # per-sample gradients of one chunk at a time, clipped into the [K, P] class sums
        sums = torch.zeros(len(classes), size, dtype=torch.float32, device=real.device)
        for i in range(0, len(real), chunk):
            g = per_sample(named, real[i : i + chunk], labels[i : i + chunk])
            flat = torch.cat([v.flatten(1) for v in g.values()], 1)
            ctx["release"].clipped_sums(flat, groups[i : i + chunk], len(classes), out=sums)
        means = ctx["release"].noised(sums) / sampler.expected
        shapes = [p.shape for p in named.values()]
        return [
            ([g.reshape(s) for g, s in zip(row.split([s.numel() for s in shapes]), shapes, strict=True)], None)
            for row in means
        ]


@register_engine("dp_dsa")
class DPDSAEngine(DPDCEngine):
    """DP gradient matching with siamese augmentation (``method=dp_dsa``)."""

    name = "dp_dsa"
    Config = DPDSAGMConfig
