"""The card's command on real data, reduced: 100 Fashion-MNIST clients through Flower's simulation on Ray."""

from __future__ import annotations

import json

import pytest
from test_simulate import _check_contract, _rounds, _simulate

pytestmark = pytest.mark.slow


def test_feddm_100_fashion_mnist_clients_through_the_ray_simulation(tmp_path):
    """`simulate strategy=feddm clients=100 alpha=0.1 dataset=fashion_mnist`, few iterations: every client answers.

    FedDM drops classes with fewer than 10 local samples, so at alpha 0.1 some clients
    contribute nothing and succeed empty; the rest send sets the server validates and trains on.
    """
    run, _ = _simulate(
        tmp_path,
        "card",
        "strategy=feddm",
        "clients=100",
        "alpha=0.1",
        "dataset=fashion_mnist",
        "rounds=1",
        "ipc=1",
        "method.iterations=6",
        "method.releases=2",
        "strategy.server.max_steps=60",
        "strategy.random_baseline=false",
    )
    summary = _check_contract(run, synthetic=True)
    (rec,) = _rounds(run)
    assert rec["clients_sampled"] == 100 and rec["clients_failed"] == 0, rec["failures"][:3]
    assert len(rec["client_metrics"]) == 100
    assert 50 <= summary["synthetic_images"] <= 1000  # ipc 1 x the classes each client holds >= 10 samples of
    assert summary["final_accuracy"] > 25, summary["final_accuracy"]  # chance is 10
    assert set(rec["timing"]) == {"exchange", "accept", "update", "evaluate"}
    partition = json.loads((run / "partition.json").read_text())
    assert partition["clients"] == 100 and sum(map(sum, partition["histogram"])) == 54_000
