"""FedDM (Xiong et al., CVPR 2023): iterative distribution matching around the global model."""

from __future__ import annotations

from typing import Any

import torch

from strategies.base import Reply, register_strategy
from strategies.distill import DistillStrategy

__all__ = ["FedDM"]


@register_strategy("feddm")
class FedDM(DistillStrategy):
    """Each round the server sends the global model; clients match class-mean embeddings and
    logits of real vs synthetic data around randomly perturbed copies of it (radius ``rho``);
    the server trains the global model further on the union of the round's sets.

    Options (``strategy.*``): ``rho``, ``logit_weight``, ``min_class_samples`` override the
    ``method`` group's DM settings, which FedDM's client engine (``method=feddm``) extends.
    """

    name = "feddm"
    continue_training = True

    def engine_task(self) -> dict[str, Any]:
        """DM settings from the ``method`` group, run by the ``feddm`` engine with FedDM's options."""
        return self.dm_engine_task(
            "feddm", ("rho", "logit_weight", "min_class_samples"), "matches distributions around the global model"
        )

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The FedDM engine task and the current global weights."""
        return self.engine_task(), self.global_model.state

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Train the global model (continuing) on this round's sets, through the server policy."""
        return self.train_global(round_, self.merge(round_, accepted))
