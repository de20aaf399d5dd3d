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


def test_poisoned_uploads_flip_labels_or_trip_the_size_cap(digits):
    task = {**TASK, "method_options": {"iterations": 2, "compile": False}, "attack": {"kind": "syn_label_flip"}}
    clean, _ = distill_task(node_split(NODE, DATA), {**TASK, "method_options": task["method_options"]})
    bad, _ = distill_task(node_split(NODE, DATA), task)
    assert torch.equal(bad.labels, 9 - clean.labels)
    dup = poison_synthetic(clean, {"kind": "duplicate", "copies": 4})
    with pytest.raises(SyntheticSetError, match="exceed the cap"):
        decode_synthetic({"images": dup.images, "labels": dup.labels}, {}, digits.info, max_size=len(dup) // 2)


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
