"""`fedistill simulate strategy=fedaf|dynafed` end to end through Flower's simulation engine on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import fedistill
from test_resume import _checkpoint_rounds, _kill_when, _spawn
from test_simulate import MARGIN, _check_contract, _rounds, _simulate

from fedistill.data import SyntheticSet

pytestmark = pytest.mark.slow

FEW = ["clients=4", "device=cpu"]


DYNAFED = [
    "strategy=dynafed",
    *FEW,
    "rounds=5",
    "ipc=2",
    "strategy.trajectory_rounds=3",
    "strategy.distill.iterations=20",
    "strategy.distill.syn_steps=5",
    "strategy.distill.max_start_epoch=1",
    "strategy.server.epochs=200",
]
FEDAF = ["strategy=fedaf", *FEW, "rounds=2", "ipc=1", "method.iterations=100", "strategy.server.epochs=100"]


@pytest.fixture(scope="module")
def fedaf_run(tmp_path_factory) -> Path:
    """One uninterrupted FedAF run, shared by its checks and by the kill-and-resume test."""
    run, _ = _simulate(tmp_path_factory.mktemp("fedaf"), "fedaf", *FEDAF)
    return run


def test_fedaf_beats_random_real_images_and_accounts_both_exchanges(fedaf_run):
    run = fedaf_run
    summary = _check_contract(run, synthetic=True)
    rounds = _rounds(run)
    model_bytes = (run / "global_model.safetensors").stat().st_size
    for r in rounds:
        # the global model goes down twice per client (statistics, then condensation), weights never come up
        assert r["bytes_down"] > 2 * 4 * 0.9 * model_bytes and r["bytes_up"] < model_bytes
        assert r["server_seconds"] > 0 and r["policy"] == "union" and r["classes_held"] == 10
    syn = SyntheticSet.load(run / "synthetic.safetensors")
    assert [p["client"] for p in syn.metadata["clients"]] == ["p0", "p1", "p2", "p3"]
    base = summary["baselines"]["random_subset"]
    assert base["images"] == len(syn) and base["epochs"] == 200
    assert summary["final_accuracy"] > base["accuracy"] + MARGIN["fedaf"], (summary["final_accuracy"], base)


def test_fedaf_killed_after_round_1_resumes_to_the_same_model(fedaf_run, tmp_path):
    """FedAF (global statistics and the collected sets in the checkpoint) SIGKILLed after round 1
    through Ray and resumed in a fresh Ray ends with the uninterrupted run's accuracy, uplink
    and global model, bit for bit on CPU."""
    from fedistill.io import load_tensors

    run = tmp_path / "killed"
    proc = _spawn(["simulate", *FEDAF, f"hydra.run.dir={run}"], tmp_path)
    _kill_when(proc, lambda: _checkpoint_rounds(run / "checkpoint.safetensors") >= 1)
    assert not (run / "global_model.safetensors").exists()
    fedistill("simulate", f"resume={run}", cwd=tmp_path)
    done, full = (json.loads((d / "summary.json").read_text()) for d in (run, fedaf_run))
    assert done["status"] == "done" and done["accuracy_history"] == full["accuracy_history"]
    assert abs(done["bytes_up"] - full["bytes_up"]) < 64  # JSON metric timings differ in digits
    a, b = load_tensors(fedaf_run / "global_model.safetensors"), load_tensors(run / "global_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dynafed_distills_on_the_server_and_beats_random_real_images(tmp_path):
    run, _ = _simulate(tmp_path, "dynafed", *DYNAFED)
    summary = _check_contract(run, synthetic=True)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (distilled,) = [e for e in events if e["event"] == "dynafed_distilled"]
    assert distilled["round"] == 3 and distilled["images"] == 20
    rounds = _rounds(run)
    assert "distill_seconds" in rounds[2] and all("finetune_seconds" in r for r in rounds[3:])
    assert all(r["bytes_up"] > 4 * 0.9 * (run / "global_model.safetensors").stat().st_size for r in rounds)
    base = summary["baselines"]["random_subset"]
    assert base["images"] == 20
    assert summary["final_accuracy"] > base["accuracy"] + MARGIN["dynafed"], (summary["final_accuracy"], base)
