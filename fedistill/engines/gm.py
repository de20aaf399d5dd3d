"""Gradient matching: DC (Zhao et al., ICLR 2021) and DSA (Zhao & Bilen, ICML 2021).

Each iteration samples a fresh randomly initialized network and runs ``outer_loop``
steps. A step matches, for every class, the gradient of the classification loss
on a real batch of the class with the gradient on the class's synthetic images,
layer by layer, with the reference distance: for every output channel (row of the
weight reshaped to ``[out, -1]``) ``1 - cos(g_real, g_syn)``, summed (1-D
parameters, biases and norm scales, are ignored as in the reference code). The
synthetic images take one SGD step on the sum over classes; then the network trains
``inner_loop`` epochs on the (detached) synthetic set before the next step. The
(outer, inner) schedule follows the reference by IPC: (1, 1) at 1, (10, 50) at 10,
(50, 10) at 50.

``dsa`` is the same engine with differentiable siamese augmentation: every class
draws one random transform per step, applied identically to its real batch and its
synthetic images, and the inner training also augments.

Networks with BatchNorm are not supported (per-class batches would skew their
statistics); use the default instance norm.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import Engine, Progress, StepLog, init_synthetic, register_engine, resolve_device
from fedistill.engines.loops import train_epochs
from fedistill.engines.matching import RealSampler
from fedistill.models import build_model, reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["DCEngine", "DSAEngine", "DSAGMConfig", "GMConfig", "gradient_distance", "loop_schedule", "matching_loss"]

#: The reference (outer_loop, inner_loop) by IPC.
SCHEDULE: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclass(frozen=True)
class GMConfig:
    """Gradient-matching hyperparameters (reference: 1000 iterations, lr_img 0.1, lr_net 0.01).

    Attributes
    ----------
    iterations
        Fresh networks sampled (the reference's outer iterations). The default is the CPU
        budget; the reference's 1,000 are ``preset=paper``.
    outer_loop, inner_loop
        Matching steps per network and training epochs on the synthetic set between
        them; ``None`` takes the reference schedule for the IPC (see :func:`loop_schedule`).
    lr_img, momentum
        SGD on the synthetic images.
    lr_net
        SGD (no momentum) of the network's inner training.
    batch_real
        Real images per class per matching step.
    batch_train
        Batch size of the inner training on the synthetic set.
    model, model_kwargs
        The matching network (a registered model) and its options.
    dsa
        Siamese augmentation (``method=dsa`` turns it on).
    min_class_samples
        Classes with fewer real samples are not distilled.
    log_every
        Report the loss every this many iterations.
    """

    iterations: int = 30
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_img: float = 0.1
    momentum: float = 0.5
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dsa: bool = False
    min_class_samples: int = 1
    log_every: int = 1


@dataclass(frozen=True)
class DSAGMConfig(GMConfig):
    """:class:`GMConfig` with siamese augmentation on (``method=dsa``)."""

    dsa: bool = True


def loop_schedule(ipc: int) -> tuple[int, int]:
    """The reference ``(outer_loop, inner_loop)`` for ``ipc`` (the nearest tabulated IPC)."""
    key = min(SCHEDULE, key=lambda k: (abs(k - ipc), k))
    return SCHEDULE[key]


def gradient_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """Sum over output channels of ``1 - cos`` between two gradients of one parameter.

    1-D gradients (biases, norm parameters) contribute zero, as in the reference.
    """
    if g_real.ndim == 1:
        return g_syn.new_zeros(())
    r, s = g_real.flatten(1), g_syn.flatten(1)
    return (1 - (r * s).sum(1) / (r.norm(dim=1) * s.norm(dim=1) + 1e-6)).sum()


def matching_loss(
    net: nn.Module,
    real: torch.Tensor | list[torch.Tensor],
    real_labels: torch.Tensor | None,
    syn: torch.Tensor,
    syn_labels: torch.Tensor,
) -> torch.Tensor:
    """Layer-wise gradient distance between a real and a synthetic batch of one class.

    The real gradient is a constant; the synthetic one keeps its graph, so the
    result is differentiable in ``syn``. ``real`` may also be the real gradient itself
    (one tensor per trainable parameter, ``real_labels=None``), e.g. a DP-SGD release.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    if isinstance(real, torch.Tensor):
        g_real = torch.autograd.grad(F.cross_entropy(net(real), real_labels), params)
    else:
        g_real = real
    g_syn = torch.autograd.grad(F.cross_entropy(net(syn), syn_labels), params, create_graph=True)
    return sum((gradient_distance(r.detach(), s) for r, s in zip(g_real, g_syn, strict=True)), g_syn[0].new_zeros(()))


@register_engine("dc")
class DCEngine(Engine):
    """Dataset condensation with gradient matching (``method=dc``)."""

    name = "dc"
    Config = GMConfig

    def setup(self, ctx: dict[str, Any], data: Split, **inputs: Any) -> None:
        """Put one distillation's own state into its ``ctx`` (the engine instance keeps none).

        ``ctx`` holds ``seed``, ``init``, ``net``, ``classes``, ``outer``; ``inputs`` are the
        request's optional inputs this engine accepts (e.g. ``ledger``).
        """

    def extra_metadata(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """Fields a subclass adds to the set's ``metadata``."""
        return {}

    def real_sampler(self, data: Split, classes: list[int], device: torch.device, ctx: dict[str, Any]) -> RealSampler:
        """The sampler of real batches (fixed ``batch_real`` per class)."""
        gen = torch_generator(ctx["seed"], f"{self.name}-real")
        return RealSampler(data, classes, self.config.batch_real, device, gen)

    def real_targets(
        self,
        net: nn.Module,
        sampler: RealSampler,
        classes: list[int],
        *,
        dsa: DSA | None,
        params: Any,
        ctx: dict[str, Any],
    ) -> list[tuple[Any, torch.Tensor | None]]:
        """Per class, what the synthetic gradient is matched to: ``(real batch, labels)``.

        Subclasses may return ``(gradient tensors, None)`` instead (see :func:`matching_loss`).
        """
        real = sampler.sample()
        if dsa is not None:
            real = dsa.apply(real, params, sampler.groups)
        bounds = [0, *torch.cumsum(sampler.counts.long(), 0).tolist()]
        labels = torch.tensor(classes, device=real.device).repeat_interleave(sampler.counts.long())
        return [(real[lo:hi], labels[lo:hi]) for lo, hi in itertools.pairwise(bounds)]

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "auto",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        **inputs: Any,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`; ``init="auto"``: the engine's :attr:`~Engine.default_init` (DP: noise);
        ``inputs``: the request inputs a subclass accepts (:meth:`setup`)."""
        cfg = self.config
        init = self.resolve_init(init)
        dev = resolve_device(device)
        outer, inner = loop_schedule(ipc)
        outer = cfg.outer_loop or outer
        inner = cfg.inner_loop if cfg.inner_loop is not None else inner
        images, labels = init_synthetic(data, ipc, init=init, seed=seed, min_class_samples=cfg.min_class_samples)
        classes = labels[::ipc].tolist()
        k = len(classes)
        syn = images.to(dev).requires_grad_(True)
        syn_labels = labels.to(dev)
        opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
        net = build_model(cfg.model, data.info, seed=derive_seed(seed, f"{self.name}-net"), **cfg.model_kwargs).to(dev)
        ctx: dict[str, Any] = {"seed": seed, "init": init, "net": net, "classes": classes, "outer": outer}
        self.setup(ctx, data, **inputs)
        sampler = self.real_sampler(data, classes, dev, ctx)
        syn_groups = torch.arange(k, device=dev).repeat_interleave(ipc)
        aug_gen = torch_generator(seed, f"{self.name}-dsa")
        train_gen = torch_generator(seed, f"{self.name}-train")
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        steps = StepLog(cfg.iterations, every=cfg.log_every, progress=progress)
        for it in range(cfg.iterations):
            reinitialize(net, derive_seed(seed, f"{self.name}-net", it))
            net_opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
            total = syn.new_zeros(())  # summed on the device, read only when logged
            for ol in range(outer):
                params = dsa.sample(k, aug_gen, image_size=data.info.image_size, op_per_group=True) if dsa else None
                real = self.real_targets(net, sampler, classes, dsa=dsa, params=params, ctx=ctx)
                syn_in = syn if dsa is None else dsa.apply(syn, params, syn_groups)
                loss = syn.new_zeros(())
                for c in range(k):
                    s = slice(c * ipc, (c + 1) * ipc)
                    loss = loss + matching_loss(net, *real[c], syn_in[s], syn_labels[s])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
                if ol == outer - 1:
                    break
                train_epochs(
                    net,
                    net_opt,
                    syn.detach(),
                    syn_labels,
                    epochs=inner,
                    batch_size=cfg.batch_train,
                    generator=train_gen,
                    dsa=dsa,
                )
            steps.log(it, loss=total / (outer * k))
        meta = {"method": self.name, "ipc": ipc, "init": init, "seed": seed, "iterations": cfg.iterations}
        meta |= {"outer_loop": outer, "inner_loop": inner, "loss_history": steps.history} | self.extra_metadata(ctx)
        return SyntheticSet(syn.detach().cpu().contiguous(), labels, data.info, metadata=meta)


@register_engine("dsa")
class DSAEngine(DCEngine):
    """Gradient matching with differentiable siamese augmentation (``method=dsa``)."""

    name = "dsa"
    Config = DSAGMConfig
