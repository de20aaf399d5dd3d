"""DynaFed (Pi et al., CVPR 2023): FedAvg plus a server-side set distilled from the global trajectory."""

from __future__ import annotations

import time
from typing import Any

from fedistill.data.synthetic import SyntheticSet
from fedistill.federated.dynafed import Trajectory, distill_trajectory, finetune
from fedistill.federated.server import random_baseline
from fedistill.reporting import save_grid
from fedistill.seeding import derive_seed
from strategies.base import Reply, register_strategy
from strategies.fedavg import FedAvg

__all__ = ["DynaFed"]


@register_strategy("dynafed")
class DynaFed(FedAvg):
    """Clients run FedAvg (``train.fit``). The server records the global model for the first
    ``trajectory_rounds`` rounds, then distills ``ipc`` images per class from that trajectory
    by trajectory matching (the MTT engine; options ``strategy.distill``) and fine-tunes every
    later aggregate on them (``finetune_steps`` Adam steps at ``finetune_lr``).

    Only the server computes on the synthetic set: the client traffic is FedAvg's.
    """

    name = "dynafed"
    message_type = "train.fit"
    checkpoint_attrs = (*FedAvg.checkpoint_attrs, "synthetic", "trajectory.points")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trajectory = Trajectory(self.global_model.spec, self.bundle.info)
        self.trajectory.record(self.global_model.state)
        self.synthetic: SyntheticSet | None = None

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """Average (FedAvg); record the aggregate, distill once it has enough rounds, fine-tune later ones."""
        rec = super().update(round_, accepted)
        if self.synthetic is not None:
            start = time.perf_counter()
            self.global_model.state = finetune(
                self.global_model.state,
                self.synthetic,
                self.global_model.spec,
                steps=int(self.opts["finetune_steps"]),
                lr=float(self.opts["finetune_lr"]),
                batch_size=self.opts["finetune_batch"],
                seed=derive_seed(self.seed, "dynafed-finetune", round_),
                device=self.device,
            )
            rec["finetune_seconds"] = round(time.perf_counter() - start, 3)
            return rec
        self.trajectory.record(self.global_model.state)
        if len(self.trajectory) - 1 >= int(self.opts["trajectory_rounds"]):
            start = time.perf_counter()
            self.synthetic = distill_trajectory(
                self.trajectory.tensor(),
                self.bundle.info,
                int(self.cfg["ipc"]),
                spec=self.global_model.spec,
                seed=derive_seed(self.seed, "dynafed-distill"),
                device=self.device,
                **{k: v for k, v in self.opts["distill"].items() if k != "name"},  # the mtt group's keys
            )
            rec["distill_seconds"] = round(time.perf_counter() - start, 3)
            self.run.log("dynafed_distilled", round=round_, images=len(self.synthetic), **rec)
        return rec

    def finish(self) -> dict[str, Any]:
        """Save the distilled set (its random-real control runs in :meth:`control`)."""
        if self.synthetic is None:
            self.run.log("dynafed_not_distilled", recorded=len(self.trajectory))
            return {}
        self.describe(self.synthetic)
        path = self.synthetic.save(self.run.path / "synthetic.safetensors")
        save_grid(self.synthetic, self.run.path / "synthetic.png")
        return {"synthetic_path": str(path.resolve()), "synthetic_images": len(self.synthetic)}

    def control(self) -> dict[str, Any]:
        """The random-real control of the distilled set's size, run after the main result is written."""
        if self.synthetic is None or not self.opts["random_baseline"]:
            return {}
        baseline = random_baseline(self.global_model, self.synthetic.hard_labels)
        self.run.log("baseline", random_subset=baseline)
        return {"baselines": {"random_subset": baseline}}
