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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedistill.augment import DSA, DSAConfig, DSAParams
from fedistill.checkpoint import Checkpoint, CheckpointError
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
from fedistill.models import build_model, reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["DMConfig", "DMEngine", "RealSampler", "real_class_means", "synthetic_class_means"]


@dataclass(frozen=True)
class DMConfig:
    """DM hyperparameters (reference: lr 1, momentum 0.5, 256 real per class, 20k iterations).

    Attributes
    ----------
    iterations
        Optimisation steps on the synthetic images (a fresh network each).
    lr_img, momentum
        SGD on the synthetic images.
    batch_real
        Real images sampled per class per iteration.
    model, model_kwargs
        The embedding network (a registered model) and its options.
    dsa
        Siamese augmentation on both branches.
    dsa_groups
        ``class``: one random transform per class, shared by its real and synthetic
        images; ``sample`` (as the reference code): every real image gets its own
        transform and synthetic image ``j`` of a class shares real image ``j``'s.
        Fashion-MNIST IPC 10 (width 32, 500 iterations): 79.7 (class) vs 78.9 (sample).
    dsa_op_per_group
        Every DSA group draws its own op (the reference code picks one per class);
        otherwise one op per iteration for all classes. FMNIST anchor: 79.60 vs 79.66.
    real_dtype
        ``auto`` | ``bf16`` | ``fp32`` for the no-grad real branch.
    real_chunk
        Real images per forward pass of the no-grad branch (exact; smaller is
        faster on CPU caches).
    compile
        ``torch.compile`` the no-grad real branch (static shapes): a one-off cost of
        10-20 s (less with a warm inductor cache) that makes each iteration about
        1.7x faster at width 32 and 10x faster at width 128 in bf16 on CPU.
        ``auto`` compiles on CPU when ``iterations >= compile_min_iterations``.
    compile_synthetic
        ``torch.compile`` the synthetic branch (forward and backward) with dynamic
        shapes: compiled once per process (5-20 s; Dynamo's cache is keyed by the code,
        not the network or the batch size), so a Ray actor that distills many clients
        pays it once. About 1.5x faster per iteration at width 32 on CPU; gradients
        agree with eager execution to ~1e-6. ``auto``: on CPU, for runs of at least
        ``compile_min_iterations`` on images of at least ``compile_min_pixels``.
    compile_min_iterations
        Threshold of ``compile="auto"`` and ``compile_synthetic="auto"``.
    compile_min_pixels
        Image area below which ``compile_synthetic="auto"`` stays eager: on 8x8 digits
        an iteration costs ~1 ms and the compilation is never repaid (central DM, digits
        IPC 10: 36 s of distillation compiled vs 16 s eager); a Fashion-MNIST client
        distills ~1.5x faster compiled.
    min_class_samples
        Classes with fewer real samples are not distilled.
    pad_small_classes
        With ``init=real``, a class with fewer than ``2 * ipc`` real samples is padded
        with noise images up to ``ipc`` (``True``) or gets ``max(1, n // 2)`` synthetic
        images (``False``, the default): a noise image matched to a few samples' mean
        adds label noise, and a class with no more real than synthetic images would be
        sent as verbatim copies. This matters on small non-IID client partitions.
    releases
        ``None``: a fresh network, augmentation and real batch every iteration (the
        reference). A number below ``iterations``: that many such *releases* are drawn
        (each from its own seeded stream), their real-branch class statistics computed
        once, and the iterations cycle through them; the synthetic branch still runs
        every iteration. The real branch then costs ``releases`` passes instead of
        ``iterations``: the lever that makes hundreds of federated clients cheap (as
        ``dp_dm``'s releases, without the noise).
    log_every
        Report the loss every this many iterations.
    """

    iterations: int = 1000
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dsa: bool = True
    dsa_groups: str = "class"
    dsa_op_per_group: bool = False
    real_dtype: str = "auto"
    real_chunk: int = 128
    compile: bool | str = "auto"
    compile_synthetic: bool | str = "auto"
    compile_min_iterations: int = 200
    compile_min_pixels: int = 256
    min_class_samples: int = 1
    pad_small_classes: bool = False
    releases: int | None = None
    log_every: int = 10


class RealSampler:
    """Samples up to ``batch`` real images of every present class per call.

    Returns the images (class-ordered) and each row's class *position* (0..K'-1).
    """

    def __init__(self, data: Split, classes: list[int], batch: int, device: torch.device, generator: torch.Generator):
        self.images = data.images.to(device)
        self.index = [torch.nonzero(data.labels == c).flatten() for c in classes]
        self.batch = batch
        self.generator = generator
        sizes = [min(batch, len(ix)) for ix in self.index]
        self.groups = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(sizes)).to(device)
        #: each row's position within its class (row j of every class shares DSA params with synthetic image j)
        self.positions = torch.cat([torch.arange(n) for n in sizes]).to(device)
        self.counts = torch.tensor(sizes, dtype=torch.float32, device=device)

    def sample(self) -> torch.Tensor:
        """Class-ordered real images for one iteration."""
        picks = [ix[torch.randperm(len(ix), generator=self.generator)[: self.batch]] for ix in self.index]
        return self.images[torch.cat(picks).to(self.images.device)]


def real_class_means(
    embed: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    groups: torch.Tensor,
    counts: torch.Tensor,
    *,
    dsa: DSA | None,
    params: DSAParams | None,
    chunk: int,
    dtype: torch.dtype = torch.float32,
    aug_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class mean of ``embed(real)``, without autograd.

    Runs in chunks of ``chunk`` images (a small working set is much faster on CPU,
    and exact: only sums are accumulated), feeds ``dtype`` inputs, accumulates in fp32.
    ``groups`` are the classes of the rows; ``aug_groups`` (default ``groups``) their DSA groups.
    """
    aug_groups = groups if aug_groups is None else aug_groups
    sums = torch.zeros(len(counts), 1, device=real.device)
    with torch.no_grad():
        for i in range(0, len(real), chunk):
            x, g = real[i : i + chunk], groups[i : i + chunk]
            if dsa is not None:
                x = dsa.apply(x, params, aug_groups[i : i + chunk])
            # Standard strides: DSA ops (crop) can return permuted ones, which would
            # make a compiled ``embed`` recompile on the next iteration.
            emb = embed(x.to(dtype).clone(memory_format=torch.contiguous_format)).float()
            if sums.shape[1] != emb.shape[1]:
                sums = torch.zeros(len(counts), emb.shape[1], device=real.device)
            sums.index_add_(0, g, emb)
    return sums / counts.unsqueeze(1)


def synthetic_class_means(x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    """Per-class means of synthetic rows ``x`` (classes may have different row counts), with autograd."""
    out = torch.zeros(ctx["num_classes"], x.shape[1], device=x.device, dtype=x.dtype)
    return out.index_add(0, ctx["syn_groups"], x) / ctx["syn_counts"].unsqueeze(1).to(x.dtype)


def _save(
    ckpt: Checkpoint, done: int, syn: torch.Tensor, opt: torch.optim.Optimizer, gens: dict, steps: StepLog
) -> None:
    """Checkpoint after ``done`` iterations: images, momentum, generator states, loss history."""
    tensors = {"syn": syn.detach()} | {f"gen.{k}": g.get_state() for k, g in gens.items()}
    buf = opt.state.get(syn, {}).get("momentum_buffer")
    if buf is not None:
        tensors["momentum"] = buf
    ckpt.save(tensors, {"iteration": done, "history": steps.history})


def _resume(ckpt: Checkpoint | None, syn: torch.Tensor, opt: torch.optim.Optimizer, gens: dict, steps: StepLog) -> int:
    """Restore a checkpoint into the loop's state; returns the first iteration to run."""
    loaded = ckpt.load() if ckpt is not None else None
    if loaded is None:
        return 0
    tensors, state = loaded
    missing = sorted({"syn", *(f"gen.{k}" for k in gens)} - set(tensors))
    missing += [] if "iteration" in state else ["iteration"]
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing {missing}; the file is damaged: delete it to start over")
    if tensors["syn"].shape != syn.shape:
        raise CheckpointError(
            f"{ckpt.path}: images of shape {tuple(tensors['syn'].shape)}, expected {tuple(syn.shape)}"
        )
    with torch.no_grad():
        syn.copy_(tensors["syn"].to(syn.device))
    if "momentum" in tensors:
        opt.state[syn]["momentum_buffer"] = tensors["momentum"].to(syn.device)
    for k, g in gens.items():
        g.set_state(tensors[f"gen.{k}"])
    steps.history = list(state.get("history", []))
    return int(state["iteration"])


def _tensors(net: nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]


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
        return ((real_mean - syn_mean) ** 2).sum()

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
            data, ipc, init=init, seed=seed, min_class_samples=cfg.min_class_samples, pad_small=cfg.pad_small_classes
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
        pairs = [] if real_net is net else list(zip(_tensors(real_net), _tensors(net), strict=True))
        syn_groups = torch.arange(len(classes), device=dev).repeat_interleave(syn_counts.to(dev))
        syn_pos = torch.cat([torch.arange(int(n)) for n in syn_counts]).to(dev)
        real_aug, syn_aug, num_aug = self._aug_groups(sampler, syn_groups, syn_pos, ipc)
        ctx: dict[str, Any] = {
            "dsa": dsa,
            "num_classes": len(classes),
            "real_groups": sampler.groups,
            "syn_groups": syn_groups,
            "syn_counts": syn_counts.to(dev, torch.float32),
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
        }
        self.setup(ctx, **inputs)
        steps = StepLog(cfg.iterations, every=cfg.log_every, progress=progress)
        gens = {"real": sampler.generator, "dsa": aug_gen, **ctx["generators"]}
        start = _resume(checkpoint, syn, opt, gens, steps)
        num_releases = self._num_releases()
        if num_releases:
            ctx["release_cache"], params_cache = {}, {}
        for it in range(start, cfg.iterations):
            release = it % num_releases if num_releases else it
            ctx["release"] = release
            self.prepare_network(net, release, ctx)
            for dst, src in pairs:
                dst.copy_(src)
            if num_releases and release in params_cache:  # a cached release: only the synthetic branch runs
                ctx["params"], real = params_cache[release], None
            else:
                if num_releases:  # each release draws from its own streams, so a resumed run rebuilds it exactly
                    aug_gen = torch_generator(seed, "dm-dsa", release)
                    sampler.generator = torch_generator(seed, "dm-real", release)
                ctx["params"] = (
                    dsa.sample(num_aug, aug_gen, image_size=data.info.image_size, op_per_group=cfg.dsa_op_per_group)
                    if dsa
                    else None
                )
                real = sampler.sample()
                if num_releases:
                    params_cache[release] = ctx["params"]
            loss = self.embedding_loss(net, real, syn, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.log(it, loss=loss.detach() / len(classes))  # read only when logged: no sync per iteration
            if checkpoint is not None and checkpoint.due(it + 1):
                _save(checkpoint, it + 1, syn, opt, gens, steps)
        meta = {"method": self.name, "ipc": ipc, "init": init, "seed": seed, "iterations": cfg.iterations}
        meta |= self.extra_metadata(ctx) | {"loss_history": steps.history}
        if num_releases:
            meta["releases"] = num_releases
        return SyntheticSet(syn.detach().cpu().contiguous(), labels, data.info, metadata=meta)
