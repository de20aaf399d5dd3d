"""Distribution matching (DM, Zhao & Bilen, WACV 2023).

Each iteration samples a fresh, frozen, randomly initialized network and matches,
for every class, the mean embedding of real and synthetic images under the same
DSA augmentation. All classes go through the network in one batched forward pass
per branch; the real branch runs without autograd (optionally in bf16), the
synthetic branch in fp32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.checkpoint import Checkpoint
from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import (
    Engine,
    Progress,
    StepLog,
    compiled,
    init_synthetic,
    real_branch_dtype,
    register_engine,
    resolve_device,
)
from fedistill.engines.dm_config import DMConfig
from fedistill.engines.matching import (
    RealSampler,
    real_class_means,
    resume_state,
    save_state,
    synthetic_class_means,
    tensors_of,
)
from fedistill.models import build_model, reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["DMConfig", "DMEngine"]


@register_engine("dm")
class DMEngine(Engine):
    """Distribution matching engine (``method=dm``)."""

    name = "dm"
    Config = DMConfig
    accepts = frozenset({"checkpoint"})
    #: :meth:`embedding_loss` reads the real branch only through :meth:`_embed_pair`, so
    #: ``releases`` can cache it (an engine that matches fresh real statistics sets ``False``).
    reuses_releases: ClassVar[bool] = True

    def embedding_loss(
        self, net: nn.Module, real: torch.Tensor, syn: torch.Tensor, ctx: dict[str, Any]
    ) -> torch.Tensor:
        """Sum over classes of squared distances between mean embeddings.

        ``ctx`` carries the per-iteration state: DSA params, groups, counts, dtype.
        Subclasses override this to match more than the mean.
        """
        real_mean, syn_emb = self._embed_pair(net, real, syn, ctx)
        syn_mean = synthetic_class_means(syn_emb, ctx)
        per_class = ((real_mean - syn_mean) ** 2).sum(1)
        weights = ctx.get("class_weights")
        return (per_class if weights is None else per_class * weights).sum()

    def _embed_pair(
        self, net: nn.Module, real: torch.Tensor, syn: torch.Tensor, ctx: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean real embedding (no autograd) and per-image synthetic embeddings."""
        dsa: DSA | None = ctx["dsa"]
        cache: dict[int, torch.Tensor] | None = ctx.get("release_cache")
        real_mean = None if cache is None else cache.get(ctx["release"])
        if real_mean is None:
            real_mean = real_class_means(
                ctx["real_embed"],
                real,
                ctx["real_groups"],
                ctx["counts"],
                dsa=dsa,
                params=ctx["params"],
                chunk=self.config.real_chunk,
                dtype=ctx["real_dtype"],
                aug_groups=ctx["real_aug_groups"],
            )
            if cache is not None:
                cache[ctx["release"]] = real_mean
        if dsa is not None:
            syn = dsa.apply(syn, ctx["params"], ctx["syn_aug_groups"])
        return real_mean, ctx["syn_embed"](syn)

    def features(self, net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The per-image features whose class means are matched (DM: ``net.embed``)."""
        return net.embed

    def prepare_network(self, net: nn.Module, iteration: int, ctx: dict[str, Any]) -> None:
        """Set ``net``'s weights for ``iteration`` (DM: a fresh random initialization from ``ctx["seed"]``)."""
        reinitialize(net, derive_seed(ctx["seed"], "dm-net", iteration))

    def setup(self, ctx: dict[str, Any], **inputs: Any) -> None:
        """Put one distillation's own state into its ``ctx`` (the engine instance keeps none).

        ``inputs`` are the request's optional inputs besides ``checkpoint`` (e.g. ``base_state``);
        random streams a subclass draws from every iteration go into ``ctx["generators"]``, so a
        checkpoint saves and restores them with the loop's own.
        """

    def extra_metadata(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """Fields a subclass adds to the set's ``metadata`` (its own hyperparameters)."""
        return {}

    def _aug_groups(
        self, sampler: RealSampler, syn_groups: torch.Tensor, syn_pos: torch.Tensor, ipc: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """DSA groups of real rows, synthetic rows, and their number (see ``DMConfig.dsa_groups``)."""
        if self.config.dsa_groups == "class":
            return sampler.groups, syn_groups, len(sampler.counts)
        if self.config.dsa_groups != "sample":
            raise ValueError(f"unknown dsa_groups {self.config.dsa_groups!r}; valid: sample, class")
        width = max(int(sampler.counts.max()), ipc)
        return sampler.groups * width + sampler.positions, syn_groups * width + syn_pos, len(sampler.counts) * width

    def _num_releases(self) -> int:
        """Releases cycled through (``0``: a fresh one every iteration); refuses an engine that cannot cache them."""
        releases = self.config.releases
        if releases is None or releases >= self.config.iterations:
            return 0
        if releases < 1:
            raise ValueError(f"method.releases={releases}: must be >= 1 or null (a fresh release every iteration)")
        if not self.reuses_releases:
            raise ValueError(
                f"method={self.name} matches fresh real statistics every iteration; set method.releases=null"
            )
        return int(releases)

    def synthetic_features(
        self, net: nn.Module, device: torch.device, image_size: tuple[int, int]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`features` of the synthetic branch, compiled when ``compile_synthetic`` resolves to it."""
        fn = self.features(net)
        return compiled(fn) if self.compiles(device, synthetic=True, pixels=math.prod(image_size)) else fn

    def compiles(self, device: torch.device, *, synthetic: bool = False, pixels: int = 0) -> bool:
        """Whether to ``torch.compile`` the real branch (``compile``) or the synthetic one (``compile_synthetic``).

        ``auto`` compiles on CPU when ``iterations >= compile_min_iterations`` (and, for the
        synthetic branch, images have at least ``compile_min_pixels`` = ``pixels``).
        """
        key = "compile_synthetic" if synthetic else "compile"
        mode = getattr(self.config, key)
        if isinstance(mode, bool):
            return mode
        if mode != "auto":
            raise ValueError(f"method.{key}={mode!r}: unknown; valid: auto, true, false")
        if synthetic and pixels < self.config.compile_min_pixels:
            return False
        return device.type == "cpu" and self.config.iterations >= self.config.compile_min_iterations

    def load_release(self, net: nn.Module, release: int, ctx: dict[str, Any]) -> torch.Tensor | None:
        """Ready ``release``'s real side after :meth:`prepare_network`: the bf16 copy of the network,
        the DSA parameters (``ctx["params"]``) and a real batch, or ``None`` when the release is cached
        (only the synthetic branch runs). Each release draws from its own streams, so a resumed run
        rebuilds it exactly."""
        for dst, src in ctx["pairs"]:
            dst.copy_(src)
        cache: dict[int, Any] | None = ctx.get("params_cache")
        if cache is not None and release in cache:
            ctx["params"] = cache[release]
            return None
        if cache is not None:
            ctx["aug_gen"] = torch_generator(ctx["seed"], "dm-dsa", release)
            ctx["sampler"].generator = torch_generator(ctx["seed"], "dm-real", release)
        dsa: DSA | None = ctx["dsa"]
        ctx["params"] = (
            dsa.sample(
                ctx["num_aug"], ctx["aug_gen"], image_size=ctx["image_size"], op_per_group=self.config.dsa_op_per_group
            )
            if dsa
            else None
        )
        if cache is not None:
            cache[release] = ctx["params"]
        return ctx["sampler"].sample()

    def optimize(
        self,
        syn: torch.Tensor,
        opt: torch.optim.Optimizer,
        net: nn.Module,
        ctx: dict[str, Any],
        *,
        start: int = 0,
        steps: StepLog,
        checkpoint: Checkpoint | None = None,
        gens: dict[str, torch.Generator] | None = None,
    ) -> None:
        """The matching loop shared by the DM family and ``dp_dm``'s post-processing, from iteration ``start``.

        Iteration ``i`` uses release ``i mod ctx["num_releases"]`` (``0``: a fresh one every
        iteration): :meth:`prepare_network`, :meth:`load_release`, :meth:`embedding_loss`, one
        optimizer step on ``syn``; a ``checkpoint`` saves ``syn``, momentum and ``gens`` when due.
        """
        num_releases = ctx["num_releases"]
        for it in range(start, self.config.iterations):
            release = it % num_releases if num_releases else it
            ctx["release"] = release
            self.prepare_network(net, release, ctx)
            real = self.load_release(net, release, ctx)
            loss = self.embedding_loss(net, real, syn, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.log(it, loss=loss.detach() / ctx["num_classes"])  # read only when logged: no sync per iteration
            if checkpoint is not None and checkpoint.due(it + 1):
                save_state(checkpoint, it + 1, syn, opt, gens or {}, steps)

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        checkpoint: Checkpoint | None = None,
        **inputs: Any,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`.

        ``checkpoint`` saves the optimisation state every ``checkpoint.every`` iterations
        and, when it already holds one, resumes from it: the result equals an
        uninterrupted run's. ``inputs``: the other request inputs a subclass accepts
        (:meth:`setup` reads them).
        """
        cfg = self.config
        dev = resolve_device(device)
        images, labels = init_synthetic(
            data,
            ipc,
            init=init,
            seed=seed,
            min_class_samples=cfg.min_class_samples,
            pad_small=cfg.pad_small_classes,
            real_per_image=cfg.real_per_image,
        )
        classes, syn_counts = torch.unique_consecutive(labels, return_counts=True)
        classes = classes.tolist()
        syn = images.to(dev).requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
        sampler = RealSampler(data, classes, cfg.batch_real, dev, torch_generator(seed, "dm-real"))
        aug_gen = torch_generator(seed, "dm-dsa")
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        net = build_model(cfg.model, data.info, **cfg.model_kwargs).to(dev).requires_grad_(False)
        real_dtype = real_branch_dtype(dev, cfg.real_dtype)
        real_net = net if real_dtype is None else copy.deepcopy(net).to(real_dtype)
        # Refreshing the bf16 copy in place is cheaper than load_state_dict each iteration.
        pairs = [] if real_net is net else list(zip(tensors_of(real_net), tensors_of(net), strict=True))
        syn_groups = torch.arange(len(classes), device=dev).repeat_interleave(syn_counts.to(dev))
        syn_pos = torch.cat([torch.arange(int(n)) for n in syn_counts]).to(dev)
        real_aug, syn_aug, num_aug = self._aug_groups(sampler, syn_groups, syn_pos, ipc)
        ctx: dict[str, Any] = {
            "dsa": dsa,
            "num_classes": len(classes),
            "real_groups": sampler.groups,
            "syn_groups": syn_groups,
            "syn_counts": syn_counts.to(dev, torch.float32),
            # a class with n < ipc rows: its term weighted n / ipc, so each image's step is the one at ipc rows
            "class_weights": syn_counts.to(dev, torch.float32) / ipc if cfg.equal_image_steps else None,
            "real_aug_groups": real_aug,
            "syn_aug_groups": syn_aug,
            "counts": sampler.counts,
            "classes": torch.tensor(classes, device=dev),
            "real_embed": (
                torch.compile(self.features(real_net), dynamic=False) if self.compiles(dev) else self.features(real_net)
            ),
            "syn_embed": self.synthetic_features(net, dev, data.info.image_size),
            "real_dtype": real_dtype or torch.float32,
            "seed": seed,
            "generators": {},
            "sampler": sampler,
            "aug_gen": aug_gen,
            "num_aug": num_aug,
            "image_size": data.info.image_size,
            "pairs": pairs,
            "num_releases": self._num_releases(),
        }
        if ctx["num_releases"]:
            ctx["release_cache"], ctx["params_cache"] = {}, {}
        self.setup(ctx, **inputs)
        steps = StepLog(cfg.iterations, every=cfg.log_every, progress=progress)
        gens = {"real": sampler.generator, "dsa": aug_gen, **ctx["generators"]}
        start = resume_state(checkpoint, syn, opt, gens, steps)
        self.optimize(syn, opt, net, ctx, start=start, steps=steps, checkpoint=checkpoint, gens=gens)
        meta = {"method": self.name, "ipc": ipc, "init": init, "seed": seed, "iterations": cfg.iterations}
        meta |= self.extra_metadata(ctx) | {"loss_history": steps.history}
        if ctx["num_releases"]:
            meta["releases"] = ctx["num_releases"]
        return SyntheticSet(syn.detach().cpu().contiguous(), labels, data.info, metadata=meta)
