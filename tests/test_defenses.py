"""Defences against hostile clients (``defense=``): unit behaviour, and whole runs in-process.

The in-process runs use the real ClientApp and server strategies (no Ray) on digits with
10 clients (IID, or Dirichlet 0.5 for FedAF), 2 of them hostile (20%). Margins were set from measured runs (see
benchmarks/results/robustness_digits-2026-11-28.md): label flipping costs the union about
6 points there and dropping the two flippers recovers it; a FedAvg backdoor reaches about
80% success and FedMedian brings it to about 0; poisoned FedAF statistics cost about 30
points and the median over holders recovers them.
"""

from __future__ import annotations

import pytest
import torch
from inprocess import make_strategy

from fedistill.data.synthetic import SyntheticSet
from fedistill.evaluation import ModelSpec
from fedistill.federated.attacks import ATTACKS, poison_stats
from fedistill.federated.defenses import DEFENSES, apply_defense, check_defense, median_stats
from fedistill.federated.fedaf import aggregate_stats, class_stats
from fedistill.federated.policies import PolicyContext
from fedistill.models import build_model


def _ctx(digits, **kw) -> PolicyContext:
    return PolicyContext(digits.info, ModelSpec("convnet", {"width": 16}), 6, 0, 1, torch.device("cpu"), **kw)


def _real(digits, seed: int, per_class: int = 6, flip: bool = False) -> SyntheticSet:
    """Real rows ``per_class`` of each class, disjoint across seeds 0..19 (labels flipped ``9 - y`` when asked)."""
    start = (seed % 20) * per_class
    idx = torch.cat([torch.nonzero(digits.train.labels == c).flatten()[start : start + per_class] for c in range(10)])
    labels = digits.train.labels[idx]
    return SyntheticSet(
        digits.train.images[idx], 9 - labels if flip else labels, digits.info, metadata={"method": "dm"}
    )


# ----------------------------------------------------------------------------- units
def test_registry_and_where_each_defence_applies():
    assert {"none", "screen", "robust_proto", "dedup", "median", "trimmed_mean", "krum"} <= set(DEFENSES.names())
    assert {"noise", "stats_poison", "label_flip", "backdoor", "syn_label_flip", "duplicate"} <= set(ATTACKS.names())
    assert check_defense("robust_proto", "fedaf", ("sets", "stats")).stats is median_stats
    with pytest.raises(ValueError, match=r"defense=median .* strategy=oneshot .*choose one of: none, dedup"):
        check_defense("median", "oneshot", ("sets",))
    with pytest.raises(ValueError, match="krum, median, trimmed_mean"):
        check_defense("screen", "fedavg", ("aggregator",))


@pytest.mark.parametrize("bad", ["flipped", "noise"])
def test_robust_prototypes_drop_flipped_and_noise_clients_and_keep_honest_ones(digits, bad):
    parts = [(f"p{i}", _real(digits, i)) for i in range(6)]
    hostile = _real(digits, 99, flip=True)
    if bad == "noise":
        hostile.images = torch.randn_like(hostile.images) * hostile.images.std()
    res = apply_defense("robust_proto", [*parts[:3], ("p9", hostile), *parts[3:]], _ctx(digits))
    assert [d["client"] for d in res.dropped] == ["p9"], res.metrics
    assert "robust prototype" in res.dropped[0]["reason"] and [c for c, _ in res.parts] == [c for c, _ in parts]
    assert apply_defense("robust_proto", parts, _ctx(digits)).dropped == []
    with pytest.raises(TypeError, match="valid options"):
        apply_defense("robust_proto", parts, _ctx(digits), nope=1)
    with pytest.raises(ValueError, match="estimator"):
        apply_defense("robust_proto", parts, _ctx(digits), estimator="mean")


def test_dedup_removes_duplicates_and_caps_rows_per_class(digits):
    a, b = _real(digits, 0, per_class=2), _real(digits, 1, per_class=2)
    volume = ATTACKS.get("duplicate").after(_real(digits, 2, per_class=2), {"copies": 3})
    copycat = SyntheticSet(a.images.clone(), a.labels.clone(), digits.info)  # the same rows as p0
    parts = [("p0", a), ("p1", b), ("p2", volume), ("p3", copycat)]
    res = apply_defense("dedup", parts, _ctx(digits), per_class_cap=2)
    kept = dict(res.parts)
    assert len(kept["p0"]) == len(kept["p1"]) == len(kept["p2"]) == 20 and "p3" not in kept
    assert res.metrics["rows_removed"] == {"p2": 40, "p3": 20}
    assert res.dropped[0]["client"] == "p3" and "20 duplicate rows" in res.dropped[0]["reason"]
    capped = apply_defense("dedup", [("p0", a)], _ctx(digits), per_class_cap=1)
    assert torch.bincount(capped.parts[0][1].labels).tolist() == [1] * 10


def test_median_statistics_resist_poisoned_fedaf_statistics(digits):
    model = build_model("convnet", digits.info, width=16, seed=0)
    splits = [digits.train.subset(torch.arange(i, len(digits.train), 5)) for i in range(5)]
    honest = [class_stats(model, s, temperature=2.0, device=torch.device("cpu")) for s in splits]
    poisoned = poison_stats(dict(honest[0]), {"kind": "stats_poison", "scale": 10.0})
    assert torch.equal(poisoned["class_counts"], honest[0]["class_counts"] * 10)
    reference = aggregate_stats(honest)["class_soft"]
    mean = aggregate_stats([poisoned, *honest[1:]])["class_soft"]
    median = median_stats([poisoned, *honest[1:]])["class_soft"]
    assert (mean - reference).abs().max() > 0.5  # the inflated counts let one client steer the mean
    assert (median - reference).abs().max() < 0.05
    assert torch.allclose(median.sum(1), torch.ones(10), atol=1e-5)


def test_fedavg_refuses_two_different_aggregators(tmp_path):
    with pytest.raises(ValueError, match="choose different aggregators"):
        make_strategy("fedavg", tmp_path, "defense=median", "strategy.aggregator=krum")
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_strategy("fedavg", tmp_path / "b", "defense=median", "strategy.dp.noise_multiplier=1.0")
    with pytest.raises(ValueError, match="choose one of"):
        make_strategy("oneshot", tmp_path / "c", "defense=krum")


# ----------------------------------------------------------------------------- whole runs in-process
IID = ("partition=iid",)


def _run(tmp_path, grid, name: str, strategy: str, *overrides: str) -> tuple[dict, object]:
    s = make_strategy(strategy, tmp_path / name, "clients=10", *overrides)
    return s.run_rounds(grid(10)), s


def test_robust_prototypes_recover_most_of_the_clean_accuracy_under_20pct_label_flipping(tmp_path, grid):
    common = (*IID, "method.iterations=100", "strategy.random_baseline=false", "attack.kind=label_flip")
    clean, _ = _run(tmp_path, grid, "clean", "oneshot", *common, "attack.fraction=0")
    attacked, _ = _run(tmp_path, grid, "attacked", "oneshot", *common, "attack.fraction=0.2")
    defended, s = _run(tmp_path, grid, "defended", "oneshot", *common, "attack.fraction=0.2", "defense=robust_proto")
    hostile = attacked["attack"]["clients"]
    assert len(hostile) == 2 and defended["attack"]["defense"] == "robust_proto"
    assert sorted(s.history[0]["defense_dropped"]) == sorted(hostile)  # exactly the flippers, no honest client
    gap = clean["final_accuracy"] - attacked["final_accuracy"]
    assert gap > 2.0, (clean["final_accuracy"], attacked["final_accuracy"])
    assert defended["final_accuracy"] >= attacked["final_accuracy"] + 0.5 * gap
    assert defended["attack"]["accuracy"] == defended["final_accuracy"]


def test_fedmedian_cuts_the_backdoor_success_rate_of_fedavg(tmp_path, grid):
    common = (*IID, "rounds=5", "attack.kind=backdoor", "attack.fraction=0.2")
    attacked, _ = _run(tmp_path, grid, "attacked", "fedavg", *common)
    defended, s = _run(tmp_path, grid, "median", "fedavg", *common, "defense=median")
    asr, asr_defended = attacked["attack"]["attack_success_rate"], defended["attack"]["attack_success_rate"]
    assert asr >= 40.0, asr
    assert asr_defended <= asr - 30.0, (asr, asr_defended)
    assert s.history[-1]["aggregator"] == "median"


def test_median_statistics_recover_fedaf_from_poisoned_statistics(tmp_path, grid):
    """Dirichlet(0.5) clients: the poisoned statistics steer the classes the two attackers hold."""
    common = (
        "rounds=2",
        "method.iterations=50",
        "strategy.server.epochs=100",
        "strategy.random_baseline=false",
        "attack.kind=stats_poison",
        "attack.fraction=0.2",
    )
    attacked, _ = _run(tmp_path, grid, "attacked", "fedaf", *common)
    defended, _ = _run(tmp_path, grid, "defended", "fedaf", *common, "defense=robust_proto")
    assert defended["final_accuracy"] >= attacked["final_accuracy"] + 10.0, (attacked, defended)


def test_each_noise_attacker_sends_its_own_noise(digits):
    """The noise attack draws from the set's own distillation seed: two attackers never send the same
    pattern (which dedup would catch as duplicates), and the same client's attack is reproducible."""

    def attacked(seed: int) -> torch.Tensor:
        syn = _real(digits, 0)
        syn.metadata["seed"] = seed
        return ATTACKS.get("noise").after(syn, {}).images

    a, b = attacked(1), attacked(2)
    assert a.shape == _real(digits, 0).images.shape and not torch.equal(a, b)
    assert torch.equal(a, attacked(1))
    assert abs(float(a.std()) - float(_real(digits, 0).images.std())) < 0.05
