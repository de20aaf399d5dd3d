"""Differentially private distillation engines: DP distribution and gradient matching.

``dp_dm`` (NDPDC / Dosser style): every release Poisson-samples the real records of
each class, embeds them with the iteration's random network, clips every embedding to
``clip`` and adds ``N(0, sigma^2 clip^2)`` to each class sum; all classes together are
one release. The synthetic set matches the noisy class means (sum over the expected
sample size) with its own *clipped* embeddings, so both sides estimate the same
statistic. ``releases`` below ``iterations`` precomputes that many releases (network,
augmentation, noisy means) and cycles through them: reuse is post-processing, so the
budget depends on the releases, not on the optimisation steps.

``dp_dc`` / ``dp_dsa`` (PSG style): the real gradient of every class is a DP-SGD
release (per-sample gradients by ``torch.func``, clipped, summed, noised); matching it
and training the network on the synthetic set between steps are post-processing.

Both start from noise, refuse BatchNorm, and account every release in the data holder's
:class:`~fedistill.privacy.PrivacyLedger` (pass ``ledger=`` to continue a holder's
budget across rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import Progress, StepLog, init_synthetic, register_engine, resolve_device
from fedistill.engines.dm import DMConfig, DMEngine, synthetic_class_means
from fedistill.engines.gm import DCEngine, GMConfig, loop_schedule
from fedistill.models import build_model
from fedistill.privacy import PrivacyConfig, PrivacyLedger, PrivateRelease, check_private_setup, clip_rows
from fedistill.privacy.mechanisms import poisson_indices
from fedistill.seeding import torch_generator

__all__ = [
    "DPDCEngine",
    "DPDMConfig",
    "DPDMEngine",
    "DPDSAEngine",
    "DPDSAGMConfig",
    "DPGMConfig",
    "PoissonClassSampler",
]


@dataclass(frozen=True)
class DPDMConfig(PrivacyConfig, DMConfig):
    """:class:`DMConfig` plus :class:`~fedistill.privacy.PrivacyConfig` (``dsa_groups`` is always ``class``)."""


@dataclass(frozen=True)
class DPGMConfig(PrivacyConfig, GMConfig):
    """:class:`GMConfig` plus :class:`~fedistill.privacy.PrivacyConfig`.

    ``per_sample_chunk`` records have their per-sample gradients (``[chunk, parameters]``)
    in memory at once; each chunk is clipped and added into the ``[classes, parameters]``
    sums before the next, so memory does not grow with the sample and the release does
    not depend on the chunk.
    """

    per_sample_chunk: int = 256


@dataclass(frozen=True)
class DPDSAGMConfig(DPGMConfig):
    """:class:`DPGMConfig` with siamese augmentation on (``method=dp_dsa``)."""

    dsa: bool = True


class PoissonClassSampler:
    """Per-class Poisson samples of real records at one rate (the DP releases' sampling).

    ``counts`` (the class sizes) are public side information: the noisy sums are divided
    by the expected sample size ``rate * count``.
    """

    def __init__(self, data: Split, classes: list[int], rate: float, device: torch.device, generator: torch.Generator):
        self.images = data.images.to(device)
        self.index = [torch.nonzero(data.labels == c).flatten() for c in classes]
        self.rate, self.generator = rate, generator
        self.expected = torch.tensor([rate * len(ix) for ix in self.index], device=device).unsqueeze(1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled images (class-ordered) and their class positions."""
        picks = [poisson_indices(ix, self.rate, self.generator) for ix in self.index]
        groups = torch.repeat_interleave(torch.arange(len(picks)), torch.tensor([len(p) for p in picks]))
        return self.images[torch.cat(picks).to(self.images.device)], groups.to(self.images.device)


def _sample_rate(config: PrivacyConfig, batch_real: int, data: Split, classes: list[int]) -> float:
    if config.sample_rate is not None:
        return float(config.sample_rate)
    largest = max(int(data.class_counts()[c]) for c in classes)
    return min(1.0, batch_real / largest)


def _private_start(
    engine: str, data: Split, ipc: int, config: Any, init: str, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int], nn.Module]:
    """Noise-initialized synthetic set, its classes and the (checked) matching network."""
    net = build_model(config.model, data.info, **config.model_kwargs).to(device)
    check_private_setup(init=init, net=net, engine=engine)
    images, labels = init_synthetic(data, ipc, init=init, seed=seed, min_class_samples=config.min_class_samples)
    return images, labels, torch.unique_consecutive(labels).tolist(), net


@register_engine("dp_dm")
class DPDMEngine(DMEngine):
    """Distribution matching with record-level DP (``method=dp_dm``)."""

    name = "dp_dm"
    Config = DPDMConfig
    default_init = "noise"
    private = True
    resumable = False  # releases are reserved in the ledger up front; a resumed run would spend them twice

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "noise",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        ledger: PrivacyLedger | None = None,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`; ``ledger`` continues a data holder's budget."""
        cfg = self.config
        dev = resolve_device(device)
        images, labels, classes, net = _private_start(self.name, data, ipc, cfg, init, seed, dev)
        net.requires_grad_(False)
        k = len(classes)
        rate = _sample_rate(cfg, cfg.batch_real, data, classes)
        num_releases = min(cfg.releases or cfg.iterations, cfg.iterations)
        release = PrivateRelease(
            cfg, ledger=ledger, releases=num_releases, sample_rate=rate, generator=torch_generator(seed, "dp-noise")
        )
        sampler = PoissonClassSampler(data, classes, rate, dev, torch_generator(seed, "dp-sample"))
        syn = images.to(dev).requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
        aug_gen = torch_generator(seed, "dm-dsa")
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        _, syn_counts = torch.unique_consecutive(labels, return_counts=True)
        ctx = {"num_classes": k, "syn_counts": syn_counts.to(dev, torch.float32)}
        ctx["syn_groups"] = torch.arange(k, device=dev).repeat_interleave(syn_counts.to(dev))
        cache: dict[int, tuple[torch.Tensor, Any]] = {}
        embed = self.synthetic_features(net, dev, data.info.image_size)
        steps = StepLog(cfg.iterations, every=cfg.log_every, progress=progress)
        for it in range(cfg.iterations):
            r = it % num_releases
            self.prepare_network(net, r, seed)
            if r in cache:
                means, params = cache[r]
            else:
                params = dsa.sample(k, aug_gen, image_size=data.info.image_size) if dsa else None
                means = self._release(net, sampler, release, k, dsa, params) / sampler.expected
                if num_releases < cfg.iterations:
                    cache[r] = (means, params)
            syn_in = syn if dsa is None else dsa.apply(syn, params, ctx["syn_groups"])
            syn_mean = synthetic_class_means(clip_rows(embed(syn_in), cfg.clip), ctx)
            loss = ((means - syn_mean) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.log(it, loss=loss.detach() / k)
        meta = {"method": self.name, "ipc": ipc, "init": init, "seed": seed, "iterations": cfg.iterations}
        meta |= {"loss_history": steps.history, "privacy": release.report()}
        return SyntheticSet(syn.detach().cpu().contiguous(), labels, data.info, metadata=meta)

    def _release(
        self,
        net: nn.Module,
        sampler: PoissonClassSampler,
        release: PrivateRelease,
        k: int,
        dsa: DSA | None,
        params: Any,
    ) -> torch.Tensor:
        """One noisy release of per-class sums of clipped real embeddings."""
        real, groups = sampler.sample()
        embed = self.features(net)
        chunk = self.config.real_chunk
        with torch.no_grad():
            if dsa is not None and len(real):
                real = dsa.apply(real, params, groups)
            rows = [embed(real[i : i + chunk]) for i in range(0, len(real), chunk)]
            emb = torch.cat(rows) if rows else embed(real.new_zeros(1, *real.shape[1:]))[:0]
        return release.sums(emb, groups, k)


@register_engine("dp_dc")
class DPDCEngine(DCEngine):
    """Gradient matching against DP-SGD real gradients (``method=dp_dc``)."""

    name = "dp_dc"
    Config = DPGMConfig
    default_init = "noise"
    private = True

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "noise",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        ledger: PrivacyLedger | None = None,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`; ``ledger`` continues a data holder's budget."""
        cfg = self.config
        dev = resolve_device(device)
        _, _, classes, _ = _private_start(self.name, data, ipc, cfg, init, seed, dev)
        outer = cfg.outer_loop or loop_schedule(ipc)[0]
        self._rate = _sample_rate(cfg, cfg.batch_real, data, classes)
        self._release = PrivateRelease(
            cfg,
            ledger=ledger,
            releases=cfg.iterations * outer,
            sample_rate=self._rate,
            generator=torch_generator(seed, "dp-noise"),
        )
        syn = super().distill(data, ipc, init=init, device=dev, progress=progress, seed=seed)
        syn.metadata["privacy"] = self._release.report()
        return syn

    def real_sampler(self, data: Split, classes: list[int], device: torch.device, seed: int) -> PoissonClassSampler:
        """Poisson samples at the release's rate."""
        return PoissonClassSampler(data, classes, self._rate, device, torch_generator(seed, f"{self.name}-real"))

    def real_targets(
        self, net: nn.Module, sampler: Any, classes: list[int], *, dsa: DSA | None, params: Any
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
            self._release.clipped_sums(flat, groups[i : i + chunk], len(classes), out=sums)
        means = self._release.noised(sums) / sampler.expected
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
