"""One-shot federated distillation (DOSFL / FedD3 family): one round, any engine."""

from __future__ import annotations

from typing import Any

import torch

from strategies.base import Reply, register_strategy
from strategies.distill import DistillStrategy

__all__ = ["OneShot"]


@register_strategy("oneshot")
class OneShot(DistillStrategy):
    """Every sampled client distills its data once with ``method``; the server trains on the union.

    With ``rounds > 1`` each round's sets are added to the union (more clients or
    fresh seeds); the global model is retrained from scratch on the union each round.
    """

    name = "oneshot"
    continue_training = False
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "collected")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.collected: list[tuple[str, Any]] = []

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The engine task; no arrays are sent."""
        return self.engine_task(), None

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Add this round's sets to those collected and retrain the global model on them (through the policy)."""
        self.collected += [
            (f"{r.client}@r{round_}" if round_ > 1 else r.client, r.metrics["synthetic"])
            for r in accepted
            if r.metrics["synthetic"] is not None
        ]
        return self.train_global(round_, self.aggregate(round_, self.collected))
