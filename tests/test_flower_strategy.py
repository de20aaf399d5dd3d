"""fedistill's strategies are Flower Message-API strategies: a Flower user's own ServerApp runs one
with Flower's ``Strategy.start`` through the real simulation engine, and gets what ``fedistill simulate``
(fedistill's own loop over the same methods) gets for the same config."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedistill.io import load_tensors
from strategies.app import STRATEGIES

OVERRIDES = [
    "device=cpu",
    "model.width=16",
    "clients=3",
    "strategy.rounds=2",
    "strategy.min_class_samples=1",
    "strategy.random_baseline=false",
    "method.iterations=10",
    "strategy.server.epochs=3",
    "strategy.server.max_steps=20",
]


def test_every_strategy_is_a_flower_strategy():
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        assert issubclass(cls, FlowerStrategy), name
        assert not getattr(cls, "__abstractmethods__", None), f"{name}: {cls.__abstractmethods__}"


def test_flowers_train_config_rides_beside_the_task_and_cannot_replace_it(tmp_path, grid):
    """As Flower's own strategies do, ``train_config`` reaches every client in the ``config`` record."""
    from flwr.app import ArrayRecord, ConfigRecord

    from protocol.records import read_json
    from strategies.oneshot import OneShot

    strategy = OneShot.create(["device=cpu", "clients=3"], run_dir=tmp_path / "run")
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({"lr": 0.5, "tag": "a"}), grid(3)))
    assert len(msgs) == 3
    for msg in msgs:
        record = msg.content.config_records["config"]
        assert record["lr"] == 0.5 and record["tag"] == "a" and read_json(msg)["method"] == "dm"
    with pytest.raises(ValueError, match="train_config key 'task' is reserved"):
        strategy.configure_train(2, ArrayRecord(), ConfigRecord({"task": "x"}), grid(3))


def test_feddm_under_flowers_start_in_a_users_server_app_matches_fedistills_loop(tmp_path):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedistill.config import compose_config
    from strategies.app import serve
    from strategies.feddm import FedDM
    from strategies.simulation import CLIENT_APP, backend_config, load_component

    seen: dict = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # what a Flower user writes
        strategy = FedDM.create(OVERRIDES, run_dir=tmp_path / "flower")
        seen["result"] = strategy.start(
            grid=grid, initial_arrays=strategy.arrays(), num_rounds=strategy.rounds, timeout=600
        )
        seen["summary"] = strategy.conclude()
        # fedistill's own loop on the same nodes, same config: the reference
        seen["fedistill"] = serve(grid, compose_config("simulate", ["strategy=feddm", *OVERRIDES]), tmp_path / "own")

    cfg = compose_config("simulate", ["strategy=feddm", *OVERRIDES])
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        run_simulation(
            server_app=app,
            client_app=load_component(CLIENT_APP),
            num_supernodes=3,
            backend_config=backend_config(cfg),
        )
    assert "fedistill" in seen, "the ServerApp did not finish (see the log above)"
    result, flower, own = seen["result"], seen["summary"], seen["fedistill"]
    assert flower["status"] == own["status"] == "done"
    assert flower["final_accuracy"] == own["final_accuracy"]
    assert flower["accuracy_history"] == own["accuracy_history"] and len(own["accuracy_history"]) == 2
    assert flower["bytes_up"] > 0 and flower["bytes_down"] == own["bytes_down"]
    # Flower's Result holds the global model fedistill saved, and each round's metrics
    saved = load_tensors(tmp_path / "flower" / "global_model.safetensors")
    reference = load_tensors(tmp_path / "own" / "global_model.safetensors")
    final = result.arrays.to_torch_state_dict()
    for key, value in reference.items():
        assert torch.equal(saved[key], value), key
        assert torch.equal(final[key].to(value.dtype), value), key
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["accuracy"] == pytest.approx(own["final_accuracy"])
    assert result.train_metrics_clientapp[2]["synthetic_images"] > 0
