"""Central (client-level) DP for the FedAvg baseline with Flower's own wrapper and accountant.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips every client's update to
``clip`` around the global weights, averages them with an inner Flower ``FedAvg`` and
adds Gaussian noise (std ``noise_multiplier * clip / sampled clients``); Flower's
``RdpAccountant`` (no amplification, add-or-remove-one client) composes one event per
released aggregate. Flower's mechanisms act on model updates only, which is why the
distillation strategies use record-level DP in the engines instead
(:mod:`fedistill.privacy`); this module lets the two be compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedistill.seeding import derive_seed
from protocol.records import as_flower_train_replies, read_tensors, tensor_record
from strategies.base import Reply

__all__ = ["FlowerCentralDP"]


class _SampledGrid:
    """The part of a Grid Flower's FedAvg sampler reads, restricted to this round's sampled nodes."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class FlowerCentralDP:
    """Flower's server-side fixed-clipping DP around FedAvg, driven by fedistill's round loop.

    Parameters
    ----------
    options
        ``strategy.dp``: ``noise_multiplier``, ``clip``, ``delta``, ``max_epsilon`` (optional budget).
    clients
        Population size (the run's number of clients).
    sampled
        Clients sampled per round (Flower's accounting needs every one of them to reply).
    seed
        Seeds the noise of each round (Flower draws it from NumPy's global generator).
    """

    def __init__(self, options: dict[str, Any], *, clients: int, sampled: int, seed: int) -> None:
        self.noise_multiplier = float(options["noise_multiplier"])
        self.clip = float(options["clip"])
        self.delta = float(options["delta"])
        self.seed = seed
        config = PrivacyConfig(
            target_delta=self.delta,
            population_size=clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=options["max_epsilon"],
        )
        self.accountant = RdpAccountant(config)
        self.wrapper = DifferentialPrivacyServerSideFixedClipping(
            FlowerFedAvg(weighted_by_key="weight"),
            self.noise_multiplier,
            self.clip,
            sampled,
            accountant=self.accountant,
        )

    def start_round(self, round_: int, state: dict[str, torch.Tensor], nodes: list[int]) -> None:
        """Register the round's release with the wrapper (it refuses one over ``max_epsilon``)."""
        self.wrapper.configure_train(round_, tensor_record(state), ConfigRecord(), _SampledGrid(nodes))

    def aggregate(self, round_: int, accepted: list[Reply]) -> dict[str, torch.Tensor] | None:
        """Clip, average (uniformly: client-level DP) and noise the accepted updates.

        Returns ``None`` when Flower skips the release (not every sampled client replied).
        """
        msgs = as_flower_train_replies(accepted, [1.0] * len(accepted))
        np.random.seed(derive_seed(self.seed, "flower-dp-noise", round_) % 2**32)
        arrays, _ = self.wrapper.aggregate_train(round_, msgs)
        return None if arrays is None else read_tensors(arrays)

    def state_dict(self) -> dict[str, Any]:
        """Flower's accountant state (JSON-able), for round checkpoints."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant from :meth:`state_dict` output (a resumed run keeps its spent epsilon)."""
        self.accountant.load_state_dict(state)

    def epsilon(self) -> float:
        """Cumulative client-level epsilon at ``delta`` (0 before the first release)."""
        spent = self.wrapper.privacy_spent()
        return 0.0 if spent is None or not math.isfinite(spent.epsilon) else float(spent.epsilon)

    def summary(self) -> dict[str, Any]:
        """Privacy fields of ``summary.json``."""
        spent = self.wrapper.privacy_spent()
        return {
            "level": "client (user-level), central DP on model updates",
            "mechanism": "flwr DifferentialPrivacyServerSideFixedClipping",
            "accountant": "flwr RdpAccountant (no amplification)",
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "releases": 0 if spent is None else int(spent.num_releases),
        }
