"""Flower's central-DP wrapper and robust aggregators around the FedAvg baseline."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from test_federated import _message

from fedistill.privacy import PrivacyLedger
from protocol.records import tensor_record
from strategies.base import Reply
from strategies.dp_fedavg import FlowerCentralDP


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Flower's wrapper builds messages as a ServerApp would: it needs the run id of the process."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _replies(value: float, n: int) -> list[Reply]:
    return [
        Reply(
            i, f"p{i}", _message(RecordDict({"model": tensor_record({"w": torch.full((4000,), value)})}), "train.fit")
        )
        for i in range(n)
    ]


def test_updates_are_clipped_averaged_noised_and_accounted():
    dp = FlowerCentralDP(
        {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5, "max_epsilon": 10.0}, clients=4, sampled=4, seed=0
    )
    state = {"w": torch.zeros(4000)}
    for round_ in (1, 2, 3):
        dp.start_round(round_, state, nodes=[0, 1, 2, 3])
        new = dp.aggregate(round_, _replies(10.0, 4))["w"]
        # each update (norm 632) is clipped to norm 1: mean update 1/sqrt(4000) per coordinate;
        # noise std = noise_multiplier * clip / sampled clients = 0.25
        assert float(new.std()) == pytest.approx(0.25, rel=0.05)
        assert float(new.mean()) == pytest.approx(4000**-0.5, abs=4 * 0.25 / 4000**0.5)
    # Flower's RDP accountant agrees with Opacus' for 3 unamplified Gaussian releases
    opacus = PrivacyLedger(delta=1e-5)
    opacus.spend(sigma=1.0, sample_rate=1.0, steps=3)
    assert dp.epsilon() == pytest.approx(opacus.epsilon, rel=0.05)
    assert dp.summary()["releases"] == 3
    with pytest.raises(PrivacyBudgetExhausted):  # a fourth release would pass max_epsilon
        dp.start_round(4, state, nodes=[0, 1, 2, 3])


def test_release_is_skipped_when_a_sampled_client_is_missing():
    dp = FlowerCentralDP(
        {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5, "max_epsilon": None}, clients=4, sampled=4, seed=0
    )
    dp.start_round(1, {"w": torch.zeros(4000)}, nodes=[0, 1, 2, 3])
    assert dp.aggregate(1, _replies(1.0, 3)) is None
    assert dp.epsilon() == 0.0


def test_noise_is_reproducible_for_a_seed():
    outs = []
    for _ in range(2):
        dp = FlowerCentralDP(
            {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5, "max_epsilon": None}, clients=2, sampled=2, seed=7
        )
        dp.start_round(1, {"w": torch.zeros(4000)}, nodes=[0, 1])
        outs.append(dp.aggregate(1, _replies(1.0, 2))["w"])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_flower_robust_aggregators_resist_a_hostile_update(name):
    """Four honest updates near 1, one hostile at 1000: the mean moves to ~200, Flower's robust
    aggregators stay near 1."""
    from strategies.robust import robust_aggregate

    g = torch.Generator().manual_seed(0)
    values = [1.0 + 0.01 * torch.randn(100, generator=g) for _ in range(4)] + [torch.full((100,), 1000.0)]
    replies = [
        Reply(i, f"p{i}", _message(RecordDict({"model": tensor_record({"w": v})}), "train.fit"))
        for i, v in enumerate(values)
    ]
    new = robust_aggregate(name, {"trim_beta": 0.2, "krum_malicious": 1}, 1, replies, [10.0] * 5)["w"]
    assert float(new.mean()) == pytest.approx(1.0, abs=0.05)
    assert float(torch.stack(values).mean()) > 100  # what the plain mean would have given
