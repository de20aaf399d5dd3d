"""The levers that make many clients cheap: DM release reuse and the server's step cap."""

from __future__ import annotations

import pytest
import torch

import fedistill.engines.dm as dm_module
from fedistill.checkpoint import Checkpoint
from fedistill.engines import build_engine
from fedistill.evaluation import EvalRecipe, ModelSpec, train_model

FAST = {"iterations": 24, "batch_real": 32, "lr_img": 10.0, "model_kwargs": {"width": 16}, "log_every": 4}


def _count_real_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dm_module.real_class_means

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dm_module, "real_class_means", counting)
    return calls


@pytest.mark.parametrize("method", ["dm", "feddm", "fedaf"])
def test_releases_compute_each_real_statistic_once(digits, monkeypatch, method):
    """With ``releases=R`` the real branch runs R times, not once per iteration; without, every iteration."""
    calls = _count_real_passes(monkeypatch)
    build_engine(method, **FAST, releases=6).distill(digits.train, 2, seed=0)
    assert len(calls) == 6
    calls.clear()
    build_engine(method, **FAST).distill(digits.train, 2, seed=0)
    assert len(calls) == FAST["iterations"]


def test_releases_change_the_set_and_are_deterministic(digits):
    fresh = build_engine("dm", **FAST).distill(digits.train, 2, seed=0)
    reused = build_engine("dm", **FAST, releases=6).distill(digits.train, 2, seed=0)
    again = build_engine("dm", **FAST, releases=6).distill(digits.train, 2, seed=0)
    assert torch.equal(reused.images, again.images)
    assert not torch.equal(fresh.images, reused.images)
    assert reused.metadata["releases"] == 6 and "releases" not in fresh.metadata


def test_releases_resume_to_the_same_set(digits, tmp_path):
    """A run interrupted after the releases were built recomputes them from their own streams exactly."""
    whole = build_engine("dm", **FAST, releases=5).distill(digits.train, 2, seed=3)
    ckpt = Checkpoint(tmp_path / "dm.safetensors", key="k", every=8)
    build_engine("dm", **FAST | {"iterations": 16}, releases=5).distill(digits.train, 2, seed=3, checkpoint=ckpt)
    resumed = build_engine("dm", **FAST, releases=5).distill(digits.train, 2, seed=3, checkpoint=ckpt)
    assert torch.equal(whole.images, resumed.images)


def test_releases_refused_where_they_cannot_apply(digits):
    with pytest.raises(ValueError, match="releases"):
        build_engine("dm_hom", **FAST, releases=4).distill(digits.train, 1, seed=0)
    with pytest.raises(ValueError, match="releases"):
        build_engine("dm", **FAST, releases=0).distill(digits.train, 1, seed=0)


def _steps(digits, recipe: EvalRecipe) -> tuple[int, torch.nn.Module]:
    seen: list[int] = []

    def count(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return logits.new_zeros(())

    x, y = digits.train.images[:100], digits.train.labels[:100]
    model = train_model(
        ModelSpec("convnet", {"width": 8}),
        digits.info,
        x,
        y,
        recipe=recipe,
        seed=0,
        device=torch.device("cpu"),
        regularizer=count,
    )
    return len(seen), model


def test_max_steps_caps_training_and_is_exact_below_the_cap(digits):
    base = EvalRecipe(epochs=4, batch_size=16, dsa=False)  # 7 batches per epoch: 28 steps
    n, uncapped = _steps(digits, base)
    assert n == 28
    assert _steps(digits, EvalRecipe(epochs=4, batch_size=16, dsa=False, max_steps=10))[0] == 10
    n, loose = _steps(digits, EvalRecipe(epochs=4, batch_size=16, dsa=False, max_steps=1000))
    assert n == 28
    for a, b in zip(uncapped.state_dict().values(), loose.state_dict().values(), strict=True):
        assert torch.equal(a, b)
