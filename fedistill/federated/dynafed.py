"""DynaFed (Pi et al., CVPR 2023), the library side: distill from the global model's trajectory.

Clients run FedAvg. The server records the global model after each of the first
rounds (:class:`Trajectory`), distills a synthetic set from that trajectory once by
trajectory matching (the MTT engine with the recorded trajectory as its only expert,
:func:`distill_trajectory`; the server holds no data, so images start from noise), and
fine-tunes every later aggregate on it (:func:`finetune`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedistill.data.base import DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import DistillRequest, build_engine
from fedistill.engines.loops import train_epochs
from fedistill.models import build_model
from fedistill.seeding import torch_generator
from fedistill.training import ModelSpec

__all__ = ["Trajectory", "distill_trajectory", "finetune"]


class Trajectory:
    """The global model's parameters, one flat vector per recorded round (the student's parameter order)."""

    def __init__(self, spec: ModelSpec, info: DatasetInfo) -> None:
        net = build_model(spec.name, info, **spec.kwargs)
        self.names = [n for n, _ in net.named_parameters()]
        self.points: list[torch.Tensor] = []

    def record(self, state: Mapping[str, torch.Tensor]) -> None:
        """Append the parameters of a global-model state dict."""
        self.points.append(torch.cat([state[n].detach().float().reshape(-1).cpu() for n in self.names]))

    def tensor(self) -> torch.Tensor:
        """``[T, P]`` recorded parameter vectors."""
        return torch.stack(self.points)

    def __len__(self) -> int:
        return len(self.points)


def distill_trajectory(
    trajectory: torch.Tensor,
    info: DatasetInfo,
    ipc: int,
    *,
    spec: ModelSpec,
    seed: int,
    device: torch.device,
    **options: Any,
) -> SyntheticSet:
    """Trajectory matching against one recorded trajectory, from noise, ``ipc`` images for every class.

    Parameters
    ----------
    trajectory
        ``[T, P]`` global-model parameter vectors (``T >= 2``).
    spec
        The global model's architecture (the student).
    options
        :class:`~fedistill.engines.mtt.MTTConfig` fields (``iterations``, ``syn_steps``,
        ``expert_epochs``, ``max_start_epoch``, ``lr_img``, ``lr_init``, ...).
    """
    if len(trajectory) < 2:
        raise ValueError(f"need at least 2 recorded global models to match a trajectory, got {len(trajectory)}")
    engine = build_engine("mtt", model=spec.name, model_kwargs=dict(spec.kwargs), **options)
    k = info.num_classes
    classes_only = Split(torch.zeros(k, *info.shape), torch.arange(k), info)  # the server has no data
    request = DistillRequest(data=classes_only, ipc=ipc, init="noise", seed=seed, device=device, experts=[trajectory])
    syn = engine.run(request)
    syn.metadata.update(method="dynafed-mtt", trajectory_length=len(trajectory))
    syn.metadata.pop("loss_history", None)
    return syn


def finetune(
    state: Mapping[str, torch.Tensor],
    syn: SyntheticSet,
    spec: ModelSpec,
    *,
    steps: int = 20,
    lr: float = 1e-4,
    batch_size: int | None = None,
    seed: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``steps`` Adam steps of the model ``state`` on ``syn`` (one step per full batch); the new state."""
    net = build_model(spec.name, syn.info, **spec.kwargs).to(device)
    net.load_state_dict(dict(state))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    targets = syn.soft_labels if syn.soft_labels is not None else syn.hard_labels
    batch = len(syn) if batch_size is None else int(batch_size)
    gen = torch_generator(seed, "dynafed-finetune")
    epochs = max(1, -(-int(steps) * batch // len(syn)))  # whole epochs covering `steps` batches
    train_epochs(net, opt, syn.images.to(device), targets.to(device), epochs=epochs, batch_size=batch, generator=gen)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
