"""RDED: crop geometry, confident selection, determinism, soft labels beat the teacher-relabelled random subset, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from claims import assert_beats, margins

from fedistill.engines import ENGINES, build_engine
from fedistill.engines.rded import random_resized_crops, stitch
from fedistill.evaluation import EvalRecipe, ModelSpec
from fedistill.ranking import label_robust_score

SMALL_TEACHER = {"width": 32, "norm": "batch", "epochs": 15}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "rded-cache"))


def test_registered():
    assert "rded" in ENGINES


def test_stitch_tiles_row_major():
    crops = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    img = stitch(crops, 2, (8, 8))
    assert img.shape == (1, 1, 8, 8)
    assert img[0, 0, :4, :4].eq(0).all() and img[0, 0, :4, 4:].eq(1).all()
    assert img[0, 0, 4:, :4].eq(2).all() and img[0, 0, 4:, 4:].eq(3).all()
    with pytest.raises(ValueError, match="does not divide"):
        stitch(torch.zeros(9, 1, 8, 8), 3, (8, 8))


def test_full_scale_crop_is_the_image():
    x = torch.randn(3, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = random_resized_crops(x, 2, scale=(1.0, 1.0), ratio=(1.0, 1.0), size=(8, 8), generator=g)
    assert torch.allclose(out, x.repeat_interleave(2, 0), atol=1e-5)


@pytest.mark.parametrize("factor", [1, 2])
def test_selected_crops_are_more_confident_than_random_crops(digits, factor):
    syn = build_engine("rded", factor=factor, teacher=SMALL_TEACHER).distill(digits.train, 3, seed=0)
    syn.validate()
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.allclose(syn.soft_labels.sum(1), torch.ones(30), atol=1e-5)
    # measured (factor 1): 0.999 selected vs 0.87 over all scored crops
    assert syn.metadata["selected_confidence"] > syn.metadata["candidate_confidence"] + 0.02
    assert syn.metadata["teacher"]["temperature"] == 4.0


def test_same_seed_same_set(digits):
    a = build_engine("rded", teacher=SMALL_TEACHER).distill(digits.train, 2, seed=1)
    b = build_engine("rded", teacher=SMALL_TEACHER).distill(digits.train, 2, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels)


@pytest.mark.slow
def test_rded_soft_labels_beat_teacher_relabelled_random_subset(digits):
    """Same teacher, temperature, KD recipe (lr 0.1) and seeds for both, at IPC 2.

    Measured on the dev machine: 27.3, 15.9, 17.0 points over it on seeds 0-2 (``tests/claims.py``;
    seed 0 before, 2 runs: 77.99 vs 45.13). At IPC 10 RDED loses to the
    relabelled random subset on digits (configs/method/rded.yaml).
    """
    engine = build_engine("rded", teacher=SMALL_TEACHER)
    spec, recipe = ModelSpec("convnet", {"width": 32}), EvalRecipe(epochs=150, soft_lr=0.1)
    gains = margins(
        lambda seed: engine.distill(digits.train, 2, seed=seed),
        digits,
        spec=spec,
        recipe=recipe,
        baseline="random_subset_soft",
    )
    assert_beats(gains, floor=10.0, what="RDED soft vs random subset with the same teacher")


@pytest.mark.slow
def test_cli_central_method_rded(tmp_path):
    from test_cli import fedistill

    out = tmp_path / "run"
    tiny = ["eval.epochs=3", "eval.runs=1", "eval.whole_epochs=1", "model.width=8", "ipc=2", "device=cpu"]
    fedistill(
        "central",
        "method=rded",
        "method.teacher.epochs=3",
        "method.teacher.width=16",
        *tiny,
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rded" and summary["labels"] == "soft" and summary["status"] == "done"
    assert {"random_subset", "random_subset_soft", "whole_dataset"} <= set(summary["baselines"])
    assert "test" in summary["teacher"]
    # LRS is DD-Ranking's formula over the accuracies this summary reports
    assert summary["ranking"]["lrs"] == label_robust_score(
        real_hard=summary["baselines"]["whole_dataset"],
        syn_hard=summary["hard_label"],
        syn_any=summary["accuracy"],
        rdm_any=summary["baselines"]["random_subset_soft"],
    )
    # re-evaluation reloads the same teacher from the set's metadata (cache hit)
    ev = tmp_path / "ev"
    fedistill(
        "evaluate",
        str(out / "synthetic.safetensors"),
        *tiny[:3],
        "device=cpu",  # the set's own model (width 8, as recorded), not the group's default
        f"hydra.run.dir={ev}",
        cwd=tmp_path,
    )
    again = json.loads((ev / "summary.json").read_text())
    assert again["teacher"]["key"] == summary["teacher"]["key"] and again["teacher"]["cached"]
    assert "random_subset_soft" in again["baselines"]
