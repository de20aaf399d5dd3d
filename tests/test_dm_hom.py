"""Higher-order distribution matching: reduces to DM, kernel approximation, accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from claims import assert_beats, margins

from fedistill.engines import ENGINES, build_engine
from fedistill.engines.dm_hom import random_fourier_features
from fedistill.evaluation import EvalRecipe, ModelSpec

NET = {"width": 32, "depth": 2}
FAST = {"iterations": 200, "batch_real": 64, "lr_img": 10.0, "model_kwargs": NET, "compile": False, "log_every": 50}


def test_registered():
    assert "dm_hom" in ENGINES


def test_fourier_features_approximate_gaussian_kernel():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    sigma = 3.0
    weight = torch.randn(8, 20000, generator=g) / sigma
    phase = torch.rand(20000, generator=g) * 2 * math.pi
    approx = random_fourier_features(x, weight, phase) @ random_fourier_features(y, weight, phase).T
    exact = torch.exp(-(torch.cdist(x, y) ** 2) / (2 * sigma**2))
    assert (approx - exact).abs().max() < 0.03


def test_zero_mmd_weight_is_dm(digits):
    """Sharing DM's machinery: without the MMD term the engine reproduces DM exactly."""
    kw = FAST | {"iterations": 5}
    dm = build_engine("dm", **kw).distill(digits.train, 2, seed=0)
    hom = build_engine("dm_hom", **kw, mmd_weight=0.0).distill(digits.train, 2, seed=0)
    assert torch.equal(dm.images, hom.images) and hom.metadata["method"] == "dm_hom"
    other = build_engine("dm_hom", **kw).distill(digits.train, 2, seed=0)
    assert not torch.equal(dm.images, other.images)


@pytest.mark.slow
def test_beats_random_subset_at_ipc1(digits):
    """IPC 1, 200 iterations, margins over seeds (``tests/claims.py``). Measured on the dev machine:
    20.1, 19.8, 18.1 points over the random subset on seeds 0-2 (one seed before: 88.9 vs 64.4; DM 88.7)."""
    engine = build_engine("dm_hom", **FAST)
    spec, recipe = ModelSpec("convnet", NET), EvalRecipe(epochs=100)
    gains = margins(lambda seed: engine.distill(digits.train, 1, seed=seed), digits, spec=spec, recipe=recipe)
    assert_beats(gains, floor=10.0, what="dm_hom vs random subset")
