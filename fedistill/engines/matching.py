"""Building blocks of the distribution-matching loops (DM and its family, ``dp_dm``, GM's sampler).

Real-batch sampling per class, per-class mean embeddings of real images (chunked, no
autograd) and of synthetic ones (with autograd), and the loop's checkpoint state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedistill.augment import DSA, DSAParams
from fedistill.checkpoint import Checkpoint, CheckpointError
from fedistill.data.base import Split
from fedistill.engines.base import StepLog

__all__ = ["RealSampler", "real_class_means", "resume_state", "save_state", "synthetic_class_means", "tensors_of"]


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


def save_state(
    ckpt: Checkpoint, done: int, syn: torch.Tensor, opt: torch.optim.Optimizer, gens: dict, steps: StepLog
) -> None:
    """Checkpoint after ``done`` iterations: images, momentum, generator states, loss history."""
    tensors = {"syn": syn.detach()} | {f"gen.{k}": g.get_state() for k, g in gens.items()}
    buf = opt.state.get(syn, {}).get("momentum_buffer")
    if buf is not None:
        tensors["momentum"] = buf
    ckpt.save(tensors, {"iteration": done, "history": steps.history})


def resume_state(
    ckpt: Checkpoint | None, syn: torch.Tensor, opt: torch.optim.Optimizer, gens: dict, steps: StepLog
) -> int:
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


def tensors_of(net: nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]
