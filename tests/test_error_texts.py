"""The exact one-line errors a user sees for a malformed synthetic set, payload or fault plan.

Each message names the field, the problem and (where there is one) the fix; the tests pin the
whole line, so a check that stops naming its field, its values or its fix goes red, and each
boundary (an empty set, a one-row set, a soft label of exactly 0, a row summing to 1 within
1e-3) is tested from both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedistill.data import SyntheticSet, SyntheticSetError, dataset_info
from fedistill.federated import FederationError, decode_synthetic, merge_sets
from fedistill.federated.server import assign_faults

INFO = dataset_info("digits")


def _set(n: int = 4, *, soft: bool = True) -> SyntheticSet:
    labels = torch.arange(n) % INFO.num_classes
    probs = torch.nn.functional.one_hot(labels, INFO.num_classes).float() if soft else None
    return SyntheticSet(torch.zeros(n, *INFO.shape), labels, INFO, probs, {"method": "dm"})


def _error(syn: SyntheticSet, **kwargs) -> str:
    with pytest.raises(SyntheticSetError) as err:
        syn.validate(**kwargs)
    assert str(err.value) == f"synthetic set field {err.value.field!r}: {err.value.problem}" + (
        f". Fix: {err.value.fix}" if err.value.fix else ""
    )
    return str(err.value)


def _with(**fields) -> SyntheticSet:
    syn = _set()
    for name, value in fields.items():
        setattr(syn, name, value)
    return syn


CASES = [
    (_with(images=np.zeros((4, 1, 8, 8), np.float32)), {}, "'images': expected a torch.Tensor, got ndarray"),
    (_with(images=torch.zeros(4, 8, 8)), {}, "'images': expected 4 dimensions [N, C, H, W], got shape (4, 8, 8)"),
    (
        _with(images=torch.zeros(4, 1, 8, 8, dtype=torch.float64)),
        {},
        "'images': expected dtype float32, got torch.float64. Fix: cast with .float()",
    ),
    (_with(images=torch.zeros(0, 1, 8, 8), labels=None, soft_labels=None), {}, "'images': the set is empty"),
    (_set(), {"max_size": 3}, "'images': 4 images exceed the cap of 3. Fix: lower ipc or raise the cap"),
    (
        _with(images=torch.zeros(4, 1, 8, 7)),
        {},
        "'images': image shape (1, 8, 7) does not match dataset 'digits' (1, 8, 8) (channels, height, width). "
        "Fix: distill with dataset=digits or evaluate against the dataset the set came from",
    ),
    (_with(images=torch.full((4, 1, 8, 8), float("inf"))), {}, "'images': contains NaN or infinite values"),
    (_with(labels=None, soft_labels=None), {}, "'labels': neither hard labels nor soft labels are present"),
    (_with(labels=[0, 1, 2, 3]), {}, "'labels': expected an int64 tensor, got <class 'list'>"),
    (_with(labels=torch.arange(4, dtype=torch.int32)), {}, "'labels': expected an int64 tensor, got torch.int32"),
    (_with(labels=torch.arange(3)), {}, "'labels': expected shape (4,), got (3,)"),
    (_with(labels=torch.tensor([0, 1, 2, 10])), {}, "'labels': values must lie in [0, 10), got range [0, 10]"),
    (_with(labels=torch.tensor([-1, 1, 2, 3])), {}, "'labels': values must lie in [0, 10), got range [-1, 3]"),
    (_with(soft_labels=[[1.0]] * 4), {}, "'soft_labels': expected a float32 tensor, got <class 'list'>"),
    (_with(soft_labels=torch.eye(10)[:4].double()), {}, "'soft_labels': expected a float32 tensor, got torch.float64"),
    (_with(soft_labels=torch.eye(10)[:4, :9]), {}, "'soft_labels': expected shape (4, 10), got (4, 9)"),
    (
        _with(soft_labels=torch.full((4, 10), float("nan"))),
        {},
        "'soft_labels': contains NaN or infinite values",
    ),
    (
        _with(soft_labels=torch.full((4, 10), 0.102)),
        {},
        "'soft_labels': rows must be probabilities (non-negative, summing to 1)",
    ),
    (
        _with(soft_labels=torch.eye(10)[:4] * 1.5 - 0.05),
        {},
        "'soft_labels': rows must be probabilities (non-negative, summing to 1)",
    ),
]


@pytest.mark.parametrize(("syn", "kwargs", "expected"), CASES)
def test_validate_says_exactly_which_field_what_and_how_to_fix(syn, kwargs, expected):
    assert _error(syn, **kwargs) == f"synthetic set field {expected}"


def test_validate_boundaries_accept_what_is_valid():
    one = _set(1)
    assert one.validate(max_size=1) is one  # one row is a set; the cap is inclusive
    assert _set(4).validate(max_size=4) is not None
    hard_only = _set(soft=False)
    assert hard_only.validate() is hard_only
    within = _with(soft_labels=torch.full((4, 10), 0.10009))  # rows sum to 1.0009: inside atol 1e-3
    assert within.validate() is within
    soft_only = _with(labels=None)  # one-hot rows have exact zeros: non-negative is allowed
    assert soft_only.validate() is soft_only


def test_decode_names_the_payload_problem_exactly():
    good = {"images": torch.zeros(2, *INFO.shape), "labels": torch.tensor([0, 1])}
    soft = {**good, "soft_labels": torch.eye(10)[:2]}
    decoded = decode_synthetic(soft, {"method": "dm"}, INFO, max_size=2)
    assert decoded.info == INFO and decoded.metadata == {"method": "dm"}
    assert torch.equal(decoded.labels, soft["labels"]) and torch.equal(decoded.soft_labels, soft["soft_labels"])
    assert decode_synthetic(good, {}, INFO, max_size=2).soft_labels is None
    with pytest.raises(SyntheticSetError) as err:
        decode_synthetic({**good, "pixels": torch.zeros(1)}, {}, INFO, max_size=2)
    assert str(err.value) == (
        "synthetic set field 'payload': unexpected arrays ['pixels']. "
        "Fix: send only ['images', 'labels', 'soft_labels']"
    )
    with pytest.raises(SyntheticSetError) as err:
        decode_synthetic({"labels": good["labels"]}, {}, INFO, max_size=2)
    assert str(err.value) == "synthetic set field 'images': missing from the payload"
    with pytest.raises(SyntheticSetError) as err:
        decode_synthetic(good, [1, 2], INFO, max_size=2)
    assert str(err.value) == "synthetic set field 'metadata': expected a JSON object, got list"
    with pytest.raises(SyntheticSetError, match="exceed the cap of 1"):
        decode_synthetic(good, {}, INFO, max_size=1)


def test_merge_keeps_provenance_and_soft_labels_only_when_every_part_has_them():
    a, b = _set(2), _set(3)
    b.metadata = {"method": "dc"}
    merged = merge_sets([("p0", a), ("p4", b)], INFO)
    assert merged.metadata == {
        "method": ["dc", "dm"],
        "clients": [
            {"client": "p0", "start": 0, "stop": 2, "method": "dm"},
            {"client": "p4", "start": 2, "stop": 5, "method": "dc"},
        ],
    }
    assert torch.equal(merged.soft_labels, torch.cat([a.soft_labels, b.soft_labels]))
    assert torch.equal(merged.labels, torch.tensor([0, 1, 0, 1, 2]))
    hard = merge_sets([("p0", a), ("p1", _set(1, soft=False))], INFO)
    assert hard.soft_labels is None and hard.metadata["method"] == "dm" and len(hard) == 3
    with pytest.raises(FederationError, match=r"^no synthetic set to merge$"):
        merge_sets([], INFO)


KINDS = ["crash", "nan", "slow"]
CLIENTS = [f"p{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"3": "nann"}, "faults.3=nann: unknown fault; valid: crash, nan, slow"),
        (
            {"12": "nan"},
            "faults.12=nan: no client has partition id 12 (clients: p0, p1, p2, p3, p4, ...); "
            "give a partition id below clients=, or a fraction",
        ),
        (
            {"crsh": 0.2},
            "faults.crsh: neither a partition id nor a fault kind; kinds: crash, nan, slow; "
            "options: start_round, slow_seconds",
        ),
    ],
)
def test_fault_plan_errors_name_the_key_the_value_and_what_is_allowed(faults, message):
    with pytest.raises(FederationError) as err:
        assign_faults(faults, CLIENTS, seed=0, kinds=KINDS)
    assert str(err.value) == message


@pytest.mark.parametrize("value", [1.5, -0.1, "x"])
def test_a_fault_fraction_out_of_range_is_refused_by_the_check_the_cli_makes(value):
    from fedistill.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^faults.crash={value}: faults.crash is the fraction .* in \[0, 1\]"):
        assign_faults({"crash": value}, CLIENTS, seed=0, kinds=KINDS)


def test_fault_fractions_round_up_stay_disjoint_and_respect_explicit_clients():
    few = assign_faults({"12": "nan"}, ["p12", "p1"], seed=0, kinds=KINDS)
    assert few == {"p12": "nan"}
    with pytest.raises(FederationError, match=r"\(clients: p0, p1\); give"):
        assign_faults({"7": "nan"}, ["p0", "p1"], seed=0, kinds=KINDS)
    plan = assign_faults({"0": "nan", "crash": 0.25, "slow": 1.0, "slow_seconds": 2}, CLIENTS, seed=3, kinds=KINDS)
    assert plan["p0"] == "nan"  # explicit first, never re-assigned by a fraction
    assert sum(k == "crash" for k in plan.values()) == 3  # ceil(0.25 * 10)
    assert sum(k == "slow" for k in plan.values()) == 6 and len(plan) == 10  # the rest, and no more
    assert assign_faults({"crash": 0.1}, CLIENTS, seed=0, kinds=KINDS) != {} and (
        len(assign_faults({"crash": 0.0}, CLIENTS, seed=0, kinds=KINDS)) == 0
    )
    assert len(assign_faults({"crash": 0.3}, CLIENTS, seed=0, kinds=KINDS)) == 3  # exact products do not round up


def _attack(auc: float) -> dict:
    return {"auc": auc, "tpr_at_1pct_fpr": auc / 10, "tpr_at_0.1pct_fpr": auc / 100}


AUDIT = {
    "method": "dm",
    "privacy": {"epsilon_max": 3.25, "epsilon_median": 2.0, "delta": 1e-5},
    "synthetic": {"train_images": 20, "test_accuracy": 4.5, "loss_attack": _attack(0.44), "lira": _attack(0.61)},
    "matched_real_subset": {
        "train_images": 860,
        "test_accuracy": 99.16,
        "matched": False,
        "loss_attack": _attack(0.5),
        "lira": _attack(0.7),
    },
}


def test_audit_table_shows_every_model_and_attack_with_the_budget_in_its_title():
    from fedistill.privacy.report import audit_table

    table = audit_table(AUDIT)
    assert table.title == "membership audit: dm (epsilon 3.25, delta 1e-05)"
    headers = ["trained on", "images", "test acc %", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"]
    assert [c.header for c in table.columns] == headers
    rows = list(zip(*(c._cells for c in table.columns), strict=True))
    assert rows == [
        ("synthetic set", "20", "4.50", "loss", "0.440", "0.044", "0.004"),
        ("synthetic set", "20", "4.50", "lira", "0.610", "0.061", "0.006"),
        ("real subset (matched acc)", "860", "99.16", "loss", "0.500", "0.050", "0.005"),
        ("real subset (matched acc)", "860", "99.16", "lira", "0.700", "0.070", "0.007"),
    ]
    spent = {**AUDIT, "privacy": {"epsilon_spent": 1.5, "epsilon_max": 9.0, "delta": 1e-6}}
    assert audit_table(spent).title == "membership audit: dm (epsilon 1.50, delta 1e-06)"
    alone = {k: v for k, v in AUDIT.items() if k not in ("privacy", "matched_real_subset")}
    assert audit_table(alone).title == "membership audit: dm" and audit_table(alone).row_count == 2


def test_audit_notes_are_the_exact_sentences_a_reader_sees():
    from fedistill.privacy.audit import audit_notes

    assert audit_notes(AUDIT, tolerance=5.0, num_classes=10) == [
        "no real subset with the set's label proportions matches its 4.50% within 5 points (closest: 99.16% with "
        "860 images): the two audits compare models of different accuracy",
        "synthetic loss_attack: AUC 0.44 < 0.5 on a model at 4.50% test accuracy (near chance level): the attack "
        "does worse than guessing; read it as no measurable membership signal, not as negative leakage",
    ]
    strong = {**AUDIT, "synthetic": {**AUDIT["synthetic"], "test_accuracy": 15.0}}
    assert audit_notes(strong, tolerance=5.0, num_classes=10)[1].startswith(
        "synthetic loss_attack: AUC 0.44 < 0.5 on a model at 15.00% test accuracy: the attack"
    )  # 15% is not within 5 points of chance (10%)
    edge = {**AUDIT, "synthetic": {**AUDIT["synthetic"], "test_accuracy": 14.99}}
    assert "(near chance level)" in audit_notes(edge, tolerance=5.0, num_classes=10)[1]
    matched = {**AUDIT, "matched_real_subset": {**AUDIT["matched_real_subset"], "matched": True}}
    assert len(audit_notes(matched, tolerance=5.0, num_classes=10)) == 1  # AUC 0.5 exactly is not below half


@pytest.mark.parametrize(
    ("privacy", "line"),
    [
        (None, "privacy: none (no DP engine or DP strategy in this run)"),
        (
            {"epsilon_max": 3.25, "epsilon_median": 2.0, "delta": 1e-5},
            "privacy: per-client epsilon max 3.250, median 2.000 (delta 1e-05, record-level, cumulative over rounds)",
        ),
        (
            {"epsilon_spent": 1.5, "target_epsilon": 2.0, "delta": 1e-5, "sigma": 1.25, "releases": 7},
            "privacy: epsilon 1.500 of 2.0 (delta 1e-05, sigma 1.250, 7 releases, record-level)",
        ),
        (
            {"epsilon": 0.75, "delta": 1e-6, "level": "client-level"},
            "privacy: epsilon 0.750 (delta 1e-06, client-level)",
        ),
        (
            {"public": ["class counts: exact per client", "soft labels: teacher"]},
            "privacy: no DP; released without noise: class counts; soft labels",
        ),
    ],
)
def test_the_privacy_line_says_what_was_spent(privacy, line):
    from fedistill.privacy.report import privacy_line

    assert privacy_line(privacy) == line
