"""Teacher cache, soft-label evaluation beside hard and teacher-relabelled random baselines, LRS/ARS."""

from __future__ import annotations

import math

import pytest
import torch

from fedistill.engines import build_engine
from fedistill.engines.teacher import TeacherConfig, get_teacher, teacher_from_metadata
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic, random_subset
from fedistill.ranking import augmentation_robust_score, label_robust_score, normalized_score
from fedistill.seeding import derive_seed
from fedistill.softlabel import relabelled_subset

SMALL_TEACHER = {"width": 16, "norm": "batch", "epochs": 5}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "softlabel-cache"))


def test_normalized_score_range_and_anchors():
    assert normalized_score(-1) == pytest.approx(0) and normalized_score(1) == pytest.approx(100)
    assert normalized_score(0) == pytest.approx(100 * (1 - math.exp(-1)) / (math.e - math.exp(-1)))


def test_lrs_and_ars_from_accuracies():
    # the DD-Ranking definitions on fractions: HLR = real - syn hard, IOR = syn - random
    lrs = label_robust_score(real_hard=0.99, syn_hard=0.80, syn_any=0.95, rdm_any=0.90)
    assert lrs["hlr"] == pytest.approx(19) and lrs["ior"] == pytest.approx(5)
    assert lrs["alpha"] == pytest.approx(0.5 * 0.05 - 0.5 * 0.19)
    assert lrs["lrs"] == pytest.approx(normalized_score(lrs["alpha"]), abs=1e-3)
    ars = augmentation_robust_score(syn_aug={"mean": 95.0}, rdm_aug={"mean": 90.0}, syn_naug=0.9, rdm_naug=0.8)
    assert ars["beta"] == pytest.approx(0.075) and ars["ars"] == pytest.approx(normalized_score(0.075), abs=1e-3)
    worse = augmentation_robust_score(syn_aug=0.8, rdm_aug=0.9, syn_naug=0.8, rdm_naug=0.9)
    assert worse["ars"] < ars["ars"]


def test_teacher_config_from_flat_options():
    cfg = TeacherConfig.from_dict({"epochs": 7, "width": 16})
    assert cfg.epochs == 7 and cfg.model_kwargs == {"width": 16, "norm": "batch"}
    assert TeacherConfig.from_dict({"model": "mlp", "width": 32}).model_kwargs == {"width": 32}
    assert TeacherConfig.from_dict(None) == TeacherConfig()


def test_teacher_cache_hit_on_second_call(digits):
    cfg = TeacherConfig.from_dict(SMALL_TEACHER)
    first = get_teacher(digits.train, cfg, seed=0)
    second = get_teacher(digits.train, cfg, seed=0)
    assert not first.cached and second.cached and first.key == second.key
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.accuracy(digits.test) > 0.5  # a 5-epoch width-16 teacher still learns (measured ~0.9)
    other = get_teacher(digits.train, cfg, seed=1)
    assert not other.cached and other.key != first.key
    part = digits.train.subset(torch.arange(0, len(digits.train), 2))
    assert get_teacher(part, cfg, seed=0).key != first.key  # keyed by the exact data


def test_teacher_from_metadata_reloads_and_checks_data(digits):
    t = get_teacher(digits.train, TeacherConfig.from_dict(SMALL_TEACHER), seed=0)
    again = teacher_from_metadata(t.metadata(temperature=4.0), digits.train)
    assert again.cached and again.key == t.key
    with pytest.raises(ValueError, match="other data"):
        teacher_from_metadata(t.metadata(), digits.train.subset(torch.arange(100)))
    old = {**t.metadata(), "data": t.metadata()["data"][:16]}  # sets saved before one fingerprint served all
    assert teacher_from_metadata(old, digits.train).key == t.key
    with pytest.raises(ValueError, match="other data"):
        teacher_from_metadata({**old, "data": "0" * 16}, digits.train)


def test_relabelled_subset_uses_the_hard_baselines_images(digits):
    t = get_teacher(digits.train, TeacherConfig.from_dict(SMALL_TEACHER), seed=0)
    hard = torch.arange(10).repeat_interleave(2)
    images, soft = relabelled_subset(digits.train, hard, t, temperature=4.0, seed=3)(1)
    ref = random_subset(digits.train, hard, seed=derive_seed(3, "subset", 1))
    assert torch.equal(images, ref.images)
    assert torch.allclose(soft, t.soft_labels(ref.images, temperature=4.0)) and torch.allclose(
        soft.sum(1), torch.ones(20)
    )


def test_soft_label_set_reports_hard_random_teacher_and_ranking(digits):
    syn = build_engine("rded", teacher=SMALL_TEACHER).distill(digits.train, 2, seed=0)
    res = evaluate_synthetic(
        syn, digits, models=[ModelSpec("convnet", {"width": 8})], recipe=EvalRecipe(epochs=4), runs=1, ranking=True
    )
    assert res["labels"] == "soft"
    assert set(res["per_model"]["convnet-w8"]) == {"synthetic", "hard_label", "random_subset", "random_subset_soft"}
    assert {"random_subset", "random_subset_soft", "whole_dataset"} <= set(res["baselines"])
    assert res["teacher"]["cached"] and res["teacher"]["test"] > 50  # a teacher, not chance (10%)
    rk = res["ranking"]
    # the scores are DD-Ranking's formulas over the accuracies this evaluation reports
    assert rk["lrs"] == label_robust_score(
        real_hard=res["baselines"]["whole_dataset"],
        syn_hard=res["hard_label"],
        syn_any=res["accuracy"],
        rdm_any=res["baselines"]["random_subset_soft"],
    )
    assert {"synthetic_noaug", "random_subset_noaug"} <= set(rk)
    assert rk["ars"] == augmentation_robust_score(
        syn_aug=res["accuracy"],
        rdm_aug=res["baselines"]["random_subset_soft"],
        syn_naug=rk["synthetic_noaug"],
        rdm_naug=rk["random_subset_noaug"],
    )
    assert rk["ars"]["gain_aug"] == pytest.approx(
        res["accuracy"]["mean"] - res["baselines"]["random_subset_soft"]["mean"]
    )


def test_online_labels_relabel_every_augmented_view(digits):
    from fedistill.evaluation import train_model

    t = get_teacher(digits.train, TeacherConfig.from_dict(SMALL_TEACHER), seed=0)
    sub = random_subset(digits.train, torch.arange(10).repeat_interleave(2), seed=0)
    calls = []
    inner = t.relabeller(temperature=4.0)

    def relabel(x):
        calls.append(x.shape[0])
        return inner(x)

    stored = t.soft_labels(sub.images, temperature=4.0)
    spec, recipe = ModelSpec("convnet", {"width": 8}), EvalRecipe(epochs=3, batch_size=8)
    train_model(
        spec, digits.info, sub.images, stored, recipe=recipe, seed=0, device=torch.device("cpu"), relabel=relabel
    )
    assert calls == [8, 8, 4] * 3  # once per augmented batch
    calls.clear()
    train_model(
        spec, digits.info, sub.images, sub.labels, recipe=recipe, seed=0, device=torch.device("cpu"), relabel=relabel
    )
    assert not calls  # hard-label runs never use the teacher
