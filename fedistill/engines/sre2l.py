"""SRe2L: squeeze, recover, relabel (Yin et al., NeurIPS 2023), with CDA (Yin & Shen, 2024).

- Squeeze: train a BatchNorm teacher on the real data (:mod:`fedistill.engines.teacher`).
- Recover: optimize the synthetic images so that, seen through the frozen teacher
  (eval mode), the batch statistics at the input of every BatchNorm layer match the
  layer's running statistics (``bn_weight * sum_l ||mu_l - mu_run||_2 + ||var_l -
  var_run||_2``), plus cross-entropy to the target class; every step sees a random
  resized crop and a random jitter (shift, and flip where the dataset allows it).
  With ``cda=True`` (curriculum data augmentation) the crops start easy (large) and
  get harder: the lower bound of the crop scale falls linearly from ``cda_start``
  to ``crop_scale[0]`` over the iterations.
- Relabel: the teacher's soft labels at ``temperature`` on the recovered images.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import Engine, Progress, init_synthetic, register_engine, resolve_device
from fedistill.engines.rded import random_resized_crops
from fedistill.engines.teacher import TeacherConfig, get_teacher
from fedistill.seeding import torch_generator

__all__ = ["SRe2LConfig", "SRe2LEngine", "bn_matching", "bn_statistics_loss"]


@dataclass(frozen=True)
class SRe2LConfig:
    """SRe2L hyperparameters (reference, ImageNet: Adam lr 0.25, betas (0.5, 0.9), bn weight 0.01; see the yaml).

    Attributes
    ----------
    iterations
        Recover steps on all synthetic images at once.
    lr, betas
        Adam on the images (cosine-decayed lr).
    bn_weight
        Weight of the BatchNorm-statistics loss against the cross-entropy.
    jitter
        Largest random shift in pixels per step.
    crop_scale
        Area range of the random resized crop each step.
    cda, cda_start
        Curriculum: the crop-scale lower bound falls from ``cda_start`` to ``crop_scale[0]``.
    temperature
        Softmax temperature of the stored teacher soft labels.
    teacher
        The BatchNorm teacher (see :meth:`TeacherConfig.from_dict`).
    model, model_kwargs
        The evaluation architecture handed over by ``fedistill central`` (unused here).
    min_class_samples
        Classes with fewer real samples are not distilled.
    log_every
        Report the loss every this many steps.
    """

    iterations: int = 300
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    bn_weight: float = 1.0
    jitter: int = 1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    cda: bool = False
    cda_start: float = 1.0
    temperature: float = 4.0
    teacher: dict[str, Any] = field(default_factory=TeacherConfig.options)
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    min_class_samples: int = 1
    log_every: int = 10


@contextmanager
def bn_matching(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, per forward pass, ``||mu - running_mean|| + ||var - running_var||`` of every BatchNorm input.

    Yields the list the hooks append to (clear it between passes).
    """
    losses: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("SRe2L needs a teacher with BatchNorm layers (e.g. teacher.norm=batch)")
    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        yield losses
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def bn_statistics_loss(model: nn.Module, images: torch.Tensor) -> float:
    """The summed BatchNorm-statistics mismatch of ``images`` (no augmentation)."""
    with bn_matching(model) as losses:
        model(images.to(next(model.parameters()).device))
        return float(sum(losses))


def _jitter(x: torch.Tensor, max_shift: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    if max_shift > 0:
        dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(3)
    return x


@register_engine("sre2l")
class SRe2LEngine(Engine):
    """Squeeze-recover-relabel (``method=sre2l``; ``cda=true`` for curriculum crops)."""

    name = "sre2l"
    Config = SRe2LConfig

    def crop_scale(self, it: int) -> tuple[float, float]:
        """The crop-scale range of step ``it`` (the curriculum when ``cda``)."""
        lo, hi = self.config.crop_scale
        if not self.config.cda:
            return lo, hi
        frac = it / max(1, self.config.iterations - 1)
        return self.config.cda_start + (lo - self.config.cda_start) * frac, hi

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill` (SRe2L recovers from ``init="noise"`` in the paper)."""
        cfg = self.config
        dev = resolve_device(device)
        teacher = get_teacher(data, TeacherConfig.from_dict(cfg.teacher), seed=seed, device=dev)
        images, labels = init_synthetic(data, ipc, init=init, seed=seed, min_class_samples=cfg.min_class_samples)
        syn = images.to(dev).requires_grad_(True)
        target = labels.to(dev)
        opt = torch.optim.Adam([syn], lr=cfg.lr, betas=cfg.betas)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iterations))
        gen = torch_generator(seed, "sre2l-aug")
        lo = data.info.normalize(torch.zeros(1, data.info.channels, 1, 1)).to(dev)
        hi = data.info.normalize(torch.ones(1, data.info.channels, 1, 1)).to(dev)
        size = data.info.image_size
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        with bn_matching(teacher.model) as bn_losses:
            for it in range(cfg.iterations):
                x = random_resized_crops(
                    syn, 1, scale=self.crop_scale(it), ratio=(0.75, 4 / 3), size=size, generator=gen
                )
                x = _jitter(x, cfg.jitter, data.info.flip, gen)
                bn_losses.clear()
                ce = F.cross_entropy(teacher.model(x), target)
                bn = torch.stack(bn_losses).sum()
                loss = ce + cfg.bn_weight * bn
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    syn.copy_(torch.maximum(torch.minimum(syn, hi), lo))
                if it % cfg.log_every == 0 or it == cfg.iterations - 1:
                    rec = {
                        "iteration": it,
                        "loss": float(loss.detach()),
                        "ce": float(ce.detach()),
                        "bn": float(bn.detach()),
                    }
                    rec["seconds"] = time.perf_counter() - start
                    history.append(rec)
                    if progress is not None:
                        progress(it + 1, cfg.iterations, rec)
        out = syn.detach().cpu().contiguous()
        meta = {
            "method": self.name,
            "ipc": ipc,
            "init": init,
            "seed": seed,
            "iterations": cfg.iterations,
            "cda": cfg.cda,
            "teacher": teacher.metadata(temperature=cfg.temperature),
            "loss_history": history,
        }
        soft = teacher.soft_labels(out, temperature=cfg.temperature)
        return SyntheticSet(out, labels, data.info, soft, meta)
