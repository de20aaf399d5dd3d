"""`fedistill simulate strategy=fedgen` end to end through Flower's simulation engine on Ray (one run)."""

from __future__ import annotations

import json

import pytest
from test_simulate import _check_contract, _rounds, _simulate

from fedistill.data import SyntheticSet, dataset_info
from fedistill.io import load_tensors

pytestmark = pytest.mark.slow

# 3 clients, 2 generator rounds of 2 local epochs, a short latent optimization: ~40 s on 2 busy cores
TINY = [
    "strategy=fedgen",
    "clients=3",
    "ipc=2",
    "device=cpu",
    "strategy.gen_rounds=2",
    "strategy.local_epochs=2",
    "method.iterations=30",
    "method.batch_real=64",
    "strategy.server.epochs=50",
]


def test_fedgen_uploads_latents_smaller_than_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path / "cache"))
    run, _ = _simulate(tmp_path, "fedgen", *TINY)
    summary = _check_contract(run, synthetic=True)
    rounds = _rounds(run)
    assert summary["rounds"] == 3 and [r.get("phase") for r in rounds] == ["generator", "generator", "distill"]
    # phase 1: the generator goes down and comes back up from every client, and it learns
    gen_bytes = sum(t.numel() * t.element_size() for t in load_tensors(run / "generator.safetensors").values())
    assert all(r["bytes_up"] > 3 * gen_bytes and r["bytes_down"] > 3 * gen_bytes for r in rounds[:2])
    assert rounds[1]["generator_test_mse"] < rounds[0]["generator_test_mse"]
    # phase 2: each client's whole reply (latents, labels, metadata, metrics) is smaller than the
    # pixel payload (float32 images + int64 labels) of the same number of images
    info = dataset_info("digits")
    pixel_row = 4 * info.channels * info.image_size[0] * info.image_size[1] + 8
    last = rounds[-1]
    syn = SyntheticSet.load(run / "synthetic.safetensors")
    for prov in syn.metadata["clients"]:
        client = last["client_metrics"][prov["client"]]
        rows = prov["stop"] - prov["start"]
        assert client["rows"] == rows and client["latent_bytes"] < client["pixel_bytes"]
        assert client["pixel_bytes"] >= rows * pixel_row
    assert last["bytes_up"] / 3 < len(syn) / 3 * pixel_row
    up = summary["uplink"]
    assert up["phase2_bytes"] == last["bytes_up"]
    assert up["phase1_bytes"] == rounds[0]["bytes_up"] + rounds[1]["bytes_up"]
    assert up["phase2_latent_payload_bytes"] < up["phase2_pixel_payload_bytes"] and up["payload_saving_ratio"] > 2.5
    assert up["phase2_pixel_equivalent_bytes"] > up["phase2_bytes"]
    assert summary["baselines"]["random_subset"]["images"] == len(syn) == summary["synthetic_images"]
    # the run's generator is reusable as strategy.generator_path
    assert json.loads((run / "summary.json").read_text())["generator_path"].endswith("generator.safetensors")
