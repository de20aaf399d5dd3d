"""Generative engine: latents decode back to the stored images, the generator is cached and FedAvg-able."""

from __future__ import annotations

import pytest
import torch
from claims import assert_beats, margins

from fedistill.data import SyntheticSet
from fedistill.engines import ENGINES, build_engine
from fedistill.engines.gen import CVAE, GenConfig, decode_latents, get_generator

FAST = {"gen_epochs": 10, "iterations": 20, "batch_real": 64, "model_kwargs": {"width": 16}, "log_every": 5}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "gen-cache"))


def test_registered():
    assert "gen" in ENGINES


def test_decoded_images_round_trip_from_saved_latents(digits, tmp_path):
    syn = build_engine("gen", **FAST).distill(digits.train, 3, seed=0)
    path = syn.save(tmp_path / "gen.safetensors")
    loaded = SyntheticSet.load(path)
    ref = loaded.metadata["generator"]
    assert ref["key"].startswith("generator-") and len(loaded.metadata["latents"]) == 30
    # a server holding the same generator (here: reloaded from the cache) decodes the payload exactly
    generator, ref2 = get_generator(digits.train, GenConfig(**FAST), seed=0, device=torch.device("cpu"))
    assert ref2["key"] == ref["key"]
    assert torch.equal(decode_latents(generator, loaded.metadata["latents"], loaded.labels), loaded.images)
    hist = syn.metadata["loss_history"]
    assert hist[-1]["loss"] < hist[0]["loss"], hist


def test_latents_move_from_the_encoder_means(digits):
    a = build_engine("gen", **FAST | {"iterations": 0}).distill(digits.train, 2, seed=0)
    b = build_engine("gen", **FAST).distill(digits.train, 2, seed=0)
    assert not torch.equal(torch.tensor(a.metadata["latents"]), torch.tensor(b.metadata["latents"]))
    noise = build_engine("gen", **FAST | {"iterations": 0}).distill(digits.train, 2, init="noise", seed=0)
    assert noise.images.shape == a.images.shape


def test_generator_state_dict_can_be_averaged(digits):
    """What a federated strategy would do: FedAvg two generators' state_dicts and decode with the average."""
    g0, _ = get_generator(digits.train, GenConfig(**FAST), seed=0, device=torch.device("cpu"))
    g1, _ = get_generator(digits.train, GenConfig(**FAST), seed=1, device=torch.device("cpu"))
    avg = {k: (g0.state_dict()[k] + g1.state_dict()[k]) / 2 for k in g0.state_dict()}
    assert all(v.is_floating_point() for v in avg.values())
    server = CVAE(digits.info, latent_dim=FAST.get("latent_dim", 16))
    server.load_state_dict(avg)
    out = decode_latents(server, torch.zeros(2, 16), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 8, 8) and out.isfinite().all()


@pytest.mark.slow
def test_gen_beats_random_subset_at_ipc2(digits):
    """Hard labels, same evaluator and seeds (``tests/claims.py``). Measured: 16.4, 8.6, 11.7 points over
    the random subset on seeds 0-2 (seed 0 before, 2 runs: 78.41 vs 60.17; decoded encoder means
    before any latent step: 75.49)."""
    from fedistill.evaluation import EvalRecipe, ModelSpec

    opts = {"iterations": 100, "gen_epochs": 30, "batch_real": 128, "model_kwargs": {"width": 32}}
    engine = build_engine("gen", **opts)
    spec, recipe = ModelSpec("convnet", {"width": 32}), EvalRecipe(epochs=150)
    gains = margins(lambda seed: engine.distill(digits.train, 2, seed=seed), digits, spec=spec, recipe=recipe)
    assert_beats(gains, floor=6.0, what="gen vs random subset")
