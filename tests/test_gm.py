"""Gradient matching (DC, DSA): objective falls, siamese augmentation, schedule, accuracy."""

from __future__ import annotations

import pytest
import torch
from claims import assert_beats, margins

from fedistill.augment import DSA
from fedistill.data import Split
from fedistill.engines import ENGINES, build_engine
from fedistill.engines.base import init_synthetic
from fedistill.engines.gm import gradient_distance, loop_schedule, matching_loss
from fedistill.evaluation import EvalRecipe, ModelSpec
from fedistill.models import build_model

# Depth 2: on 8x8 digits a third block would instance-normalize 2x2 maps, which makes
# per-layer gradients nearly independent of the input (DC then does worse than real init).
NET = {"width": 32, "depth": 2}
FAST = {"iterations": 40, "batch_real": 128, "model_kwargs": NET, "log_every": 5}


def gm_objective(data: Split, images: torch.Tensor, labels: torch.Tensor, *, nets: int = 4) -> float:
    """The DC matching loss (no augmentation) averaged over fixed random networks and all real data."""
    total = 0.0
    for k in range(nets):
        net = build_model("convnet", data.info, seed=1000 + k, **NET)
        for c in labels.unique().tolist():
            real = data.images[data.labels == c]
            syn = images[labels == c]
            loss = matching_loss(net, real, torch.full((len(real),), c), syn, torch.full((len(syn),), c))
            total += float(loss.detach())
    return total / nets


def test_registered():
    assert {"dc", "dsa"} <= set(ENGINES.names())
    assert build_engine("dsa").config.dsa and not build_engine("dc").config.dsa


def test_schedule_follows_reference():
    assert loop_schedule(1) == (1, 1) and loop_schedule(10) == (10, 50) and loop_schedule(50) == (50, 10)
    assert loop_schedule(12) == (10, 50) and loop_schedule(200) == (50, 10)


def test_gradient_distance_per_output_channel():
    g = torch.randn(4, 3, 3, 3)
    assert float(gradient_distance(g, 2 * g)) == pytest.approx(0.0, abs=1e-5)
    assert float(gradient_distance(g, -g)) == pytest.approx(8.0, abs=1e-4)  # 4 channels x (1 - (-1))
    assert float(gradient_distance(torch.randn(5), torch.randn(5))) == 0.0  # biases are ignored


def test_dc_matching_loss_falls(digits):
    """40 iterations at IPC 1 cut the held-out matching loss (measured: x0.6)."""
    start, labels = init_synthetic(digits.train, 1, init="real", seed=0)
    syn = build_engine("dc", **FAST).distill(digits.train, 1, seed=0)
    assert torch.equal(syn.labels, labels) and syn.images.isfinite().all()
    before, after = gm_objective(digits.train, start, labels), gm_objective(digits.train, syn.images, labels)
    assert after < 0.8 * before, (before, after)


def test_dsa_same_params_on_both_branches(digits, monkeypatch):
    calls: list[tuple[int, torch.Tensor]] = []
    original = DSA.apply

    def spy(self, x, params, groups=None):
        calls.append((id(params), groups.clone()))
        return original(self, x, params, groups)

    monkeypatch.setattr(DSA, "apply", spy)
    build_engine("dsa", **FAST | {"iterations": 3}).distill(digits.train, 2, seed=0)
    assert len(calls) == 6  # IPC 2 -> schedule (1, 1): one matching step, no inner training
    for (real_id, real_groups), (syn_id, syn_groups) in zip(calls[::2], calls[1::2], strict=True):
        assert real_id == syn_id  # the very same parameter draw
        assert real_groups.unique().tolist() == syn_groups.unique().tolist() == list(range(10))
        assert syn_groups.tolist() == torch.arange(10).repeat_interleave(2).tolist()


def test_same_seed_same_set(digits):
    cfg = FAST | {"iterations": 2, "outer_loop": 2, "inner_loop": 1}
    a = build_engine("dsa", **cfg).distill(digits.train, 2, seed=1)
    b = build_engine("dsa", **cfg).distill(digits.train, 2, seed=1)
    assert torch.equal(a.images, b.images)
    assert a.metadata["outer_loop"] == 2 and a.metadata["inner_loop"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_beats_random_subset_at_ipc1(digits, method):
    """IPC 1, 40 iterations, margins over seeds (``tests/claims.py``). Measured on the dev machine:
    DC 18.4, 19.2, 17.6 and DSA 17.0, 18.9, 17.0 points over the random subset on seeds 0-2."""
    engine = build_engine(method, **FAST)
    spec, recipe = ModelSpec("convnet", NET), EvalRecipe(epochs=100)
    gains = margins(lambda seed: engine.distill(digits.train, 1, seed=seed), digits, spec=spec, recipe=recipe)
    assert_beats(gains, floor=9.0, what=f"{method} vs random subset")
