"""Hostile clients: data poisoning before distillation, poisoned uploads, the backdoor's success rate."""

from __future__ import annotations

import pytest
import torch
from test_federated import DATA, TASK

from fedistill.data import SyntheticSetError
from fedistill.federated import decode_synthetic, distill_task, node_split
from fedistill.federated.attacks import ATTACKS, add_trigger, attack_success_rate, poison_split, poison_synthetic

NODE = {"partition-id": 0, "num-partitions": 4}


def test_registry():
    assert {"label_flip", "backdoor", "syn_label_flip", "duplicate"} <= set(ATTACKS.names())


def test_label_flip_and_backdoor_poison_the_real_data(digits):
    split = node_split(NODE, DATA)
    flipped = poison_split(split, {"kind": "label_flip"}, seed=0)
    assert torch.equal(flipped.labels, 9 - split.labels) and torch.equal(flipped.images, split.images)
    bd = poison_split(split, {"kind": "backdoor", "poison_rate": 0.25, "target": 3, "trigger_size": 2}, seed=0)
    changed = (bd.images != split.images).flatten(1).any(1)
    assert abs(int(changed.sum()) - round(0.25 * len(split))) <= int(
        (split.labels == 3).sum()
    )  # trigger may already match
    assert (bd.labels[changed] == 3).all() and torch.equal(bd.labels[~changed], split.labels[~changed])
    white = digits.info.normalize(torch.ones(1, 1, 1, 1)).item()
    assert torch.allclose(bd.images[changed][:, :, -2:, -2:], torch.full((1,), white))
    assert poison_split(split, None, seed=0) is split


def test_a_duplicated_upload_trips_the_size_cap(digits):
    clean, _ = distill_task(node_split(NODE, DATA), {**TASK, "method_options": {"iterations": 2, "compile": False}})
    dup = poison_synthetic(clean, {"kind": "duplicate", "copies": 4})
    with pytest.raises(SyntheticSetError, match="exceed the cap"):
        decode_synthetic({"images": dup.images, "labels": dup.labels}, {}, digits.info, max_size=len(dup) // 2)


def _reply(app, task, msg_type, arrays=None):
    from test_federated import _context, _message

    from protocol.records import task_content

    reply = app(_message(task_content(task, arrays), msg_type), _context(NODE))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def test_attacks_act_only_in_the_simulation_app_on_data_uploads_and_statistics(digits):
    """The deployed ClientApp ignores a planned attack; the simulation's app poisons the node's data
    (``before``), its synthetic upload (``after``, recounting rows and bytes) and its statistics."""
    from clients.app import app
    from clients.simulation import app as sim_app
    from fedistill.models import build_model
    from protocol.records import read_metrics, read_tensors

    fast = {**TASK, "method_options": {"iterations": 2, "compile": False}}
    labels = {}
    for name, which, attack in (
        ("clean", app, {"kind": "syn_label_flip"}),
        ("flipped", sim_app, {"kind": "syn_label_flip"}),
    ):
        rep = _reply(which, {**fast, "attack": attack}, "train.distill")
        labels[name] = read_tensors(rep.content.array_records["synthetic"])["labels"]
    assert torch.equal(labels["flipped"], 9 - labels["clean"])
    dup = _reply(sim_app, {**fast, "attack": {"kind": "duplicate", "copies": 3}}, "train.distill")
    assert read_metrics(dup)["rows"] == 3 * len(labels["clean"])
    assert len(read_tensors(dup.content.array_records["synthetic"])["labels"]) == 3 * len(labels["clean"])

    state = build_model("convnet", digits.info, seed=0, width=16).state_dict()
    task = {**fast, "temperature": 1.0}
    counts = {}
    for name, which, attack in (
        ("deployed", app, {"kind": "label_flip"}),
        ("flipped", sim_app, {"kind": "label_flip"}),
        ("poisoned", sim_app, {"kind": "stats_poison", "scale": 5}),
    ):
        rep = _reply(which, {**task, "attack": attack}, "query.stats", state)
        counts[name] = read_tensors(rep.content.array_records["stats"])["class_counts"]
    assert torch.equal(counts["flipped"], counts["deployed"].flip(0))  # label c became 9 - c before the handler
    assert torch.equal(counts["poisoned"], 5 * counts["deployed"])


def test_attack_success_rate(digits):
    class Always(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), self.k), 10).float()

    class TriggerDetector(torch.nn.Module):  # predicts 5 on triggered images, 0 otherwise
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hit = (x[:, 0, -2:, -2:] > 1.5).flatten(1).all(1)
            return torch.nn.functional.one_hot(torch.where(hit, 5, 0), 10).float()

    dev = torch.device("cpu")
    assert attack_success_rate(Always(5), digits.test, target=5, device=dev) == 1.0
    assert attack_success_rate(Always(1), digits.test, target=5, device=dev) == 0.0
    assert attack_success_rate(TriggerDetector(), digits.test, target=5, device=dev) == 1.0
    assert not (add_trigger(digits.test.images[:4], digits.info) == digits.test.images[:4]).all()
