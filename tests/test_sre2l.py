"""SRe2L: BN-statistics loss falls during recovery, CDA schedule, BatchNorm requirement, soft labels."""

from __future__ import annotations

import pytest
import torch

from fedistill.engines import ENGINES, build_engine
from fedistill.engines.sre2l import bn_matching
from fedistill.engines.teacher import TeacherConfig, get_teacher

SMALL_TEACHER = {"width": 32, "norm": "batch", "epochs": 15}
FAST = {"iterations": 60, "log_every": 5, "teacher": SMALL_TEACHER}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "sre2l-cache"))


def test_registered():
    assert "sre2l" in ENGINES


@pytest.mark.parametrize("cda", [False, True])
def test_recover_loss_and_bn_matching_loss_fall(digits, cda):
    """From noise: the BN-statistics term and the total loss fall (measured at 60 steps: bn x0.3-0.5)."""
    syn = build_engine("sre2l", cda=cda, **FAST).distill(digits.train, 3, init="noise", seed=0)
    hist = syn.metadata["loss_history"]
    first, last = hist[:2], hist[-2:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "bn") < 0.8 * mean(first, "bn"), hist
    assert mean(last, "loss") < 0.5 * mean(first, "loss"), hist
    syn.validate()
    assert syn.soft_labels is not None and syn.metadata["teacher"]["temperature"] == 4.0
    assert (syn.soft_labels.argmax(1) == syn.labels).float().mean() > 0.9  # the teacher sees the class


def test_cda_curriculum_goes_from_easy_to_hard():
    eng = build_engine("sre2l", cda=True, iterations=11, crop_scale=(0.3, 1.0), cda_start=1.0)
    assert eng.crop_scale(0) == (1.0, 1.0)
    assert eng.crop_scale(10) == pytest.approx((0.3, 1.0))
    lows = [eng.crop_scale(i)[0] for i in range(11)]
    assert lows == sorted(lows, reverse=True)
    assert build_engine("sre2l", cda=False, crop_scale=(0.3, 1.0)).crop_scale(0) == (0.3, 1.0)


def test_bn_hooks_match_running_stats_of_the_training_data(digits):
    """The teacher's own training images match its running statistics better than noise does."""
    t = get_teacher(digits.train, TeacherConfig.from_dict(SMALL_TEACHER), seed=0)
    with bn_matching(t.model) as losses:
        t.model(digits.train.images[:512])
        real = float(sum(losses))
        losses.clear()
        t.model(torch.randn(512, 1, 8, 8))
        noise = float(sum(losses))
    assert real < noise


def test_teacher_without_batchnorm_is_rejected(digits):
    eng = build_engine("sre2l", iterations=1, teacher={"norm": "instance", "width": 8, "epochs": 1})
    with pytest.raises(ValueError, match="BatchNorm"):
        eng.distill(digits.train, 1, seed=0)
