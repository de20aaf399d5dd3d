"""A run whose result is at chance level, or below the same-size random real subset on the
validation split, says so (``summary.json`` ``warnings`` and the last lines)."""

from __future__ import annotations

from fedistill.central import result_warnings
from fedistill.reporting import baseline_warning, chance_warning


def _res(test: float, val: float, rnd_val: float, soft_val: float | None = None) -> dict:
    res = {
        "accuracy": {"mean": test, "std": 0.0, "val": {"mean": val, "std": 0.0}},
        "baselines": {"random_subset": {"mean": 90.0, "std": 0.0, "val": {"mean": rnd_val, "std": 0.0}}},
    }
    if soft_val is not None:
        res["baselines"]["random_subset_soft"] = {"mean": 95.0, "std": 0.0, "val": {"mean": soft_val, "std": 0.0}}
    return res


def test_chance_level_is_named_with_the_class_count():
    assert chance_warning(11.9, 10, what="the model", why="x") is not None
    assert "10 classes" in chance_warning(11.9, 10, what="the model", why="x")
    assert chance_warning(12.1, 10, what="the model", why="x") is None
    assert chance_warning(51.0, 2, what="the model", why="x") is not None


def test_below_baseline_only_when_below():
    assert baseline_warning(80.0, 80.5, what="a", baseline_name="b", fix="c") == "a (80.00%) is below b (80.50%): c"
    assert baseline_warning(80.5, 80.5, what="a", baseline_name="b", fix="c") is None


def test_central_compares_on_the_validation_split_not_the_test_set():
    """Test accuracy above the subset's but validation below: warned (the decision never reads test)."""
    warned = result_warnings(_res(test=95.0, val=88.0, rnd_val=90.0), 10, "dc")
    assert len(warned) == 1 and "validation" in warned[0] and "configs/method/dc.yaml" in warned[0]
    assert result_warnings(_res(test=85.0, val=91.0, rnd_val=90.0), 10, "dc") == []


def test_central_soft_labels_face_the_teacher_relabelled_subset():
    warned = result_warnings(_res(test=95.0, val=93.0, rnd_val=90.0, soft_val=94.0), 10, "rded")
    assert len(warned) == 1 and "teacher-relabelled" in warned[0]


def test_central_chance_level():
    warned = result_warnings(_res(test=10.5, val=10.0, rnd_val=90.0), 10, "mtt")
    assert any("chance level" in w for w in warned) and any("below" in w for w in warned)


def test_a_dp_run_at_chance_names_the_noise_against_the_records_per_class(tmp_path, grid):
    """Record-level DP clients: the hint gives the spent epsilon and the median records per class a client holds."""
    import statistics

    import torch
    from inprocess import make_strategy

    from fedistill.federated.node import data_spec, partition_indices

    s = make_strategy(
        "oneshot",
        tmp_path,
        "method=dp_dm",
        "clients=4",
        "ipc=1",
        "method.iterations=4",
        "strategy.server.epochs=1",
        "strategy.random_baseline=false",
    )
    s.run.update_summary(node_data="partition")
    s.run_rounds(grid(4))
    hint = s.chance_hint()
    eps = max(s.ledgers.epsilons().values())
    labels = s.bundle.train.labels
    parts = partition_indices(data_spec(s.cfg, "digits"), 4)
    held = [int(n) for ix in parts for n in torch.bincount(labels[torch.from_numpy(ix)]) if n > 0]
    assert f"epsilon up to {eps:.2f}" in hint and f"median of {statistics.median(held):g} records" in hint
    assert "method.epsilon" in hint
    plain = make_strategy("oneshot", tmp_path / "plain", "clients=4")
    assert "learned nothing" in plain.chance_hint() and "epsilon" not in plain.chance_hint()
