"""Per-process CUDA memory caps of GPU clients: the decision, and no-ops without CUDA."""

from __future__ import annotations

import pytest
import torch

from fedistill.federated import node
from fedistill.federated.node import apply_gpu_memory_cap, gpu_memory_cap, node_task, release_gpu_cache


def test_gpu_memory_cap_decision():
    assert gpu_memory_cap({"device": "cpu", "gpu_fraction": 0.1}) is None
    assert gpu_memory_cap({"device": "cuda"}) is None  # no share given: no cap
    assert gpu_memory_cap({"device": "cuda", "gpu_fraction": 1.0}) is None  # a whole GPU
    assert gpu_memory_cap({"device": "cuda", "gpu_fraction": 0.25}) == (None, 0.25)
    assert gpu_memory_cap({"device": "cuda:1", "gpu_fraction": "0.5"}) == (1, 0.5)
    with pytest.raises(ValueError, match="gpu_fraction"):
        gpu_memory_cap({"device": "cuda", "gpu_fraction": 0})


def test_no_cuda_means_no_cap_and_no_cache_release(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("touched CUDA on a machine without it")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", forbidden)
    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)
    assert apply_gpu_memory_cap({"device": "cuda", "gpu_fraction": 0.1}) is None
    assert node_task({}, {"device": "cuda", "gpu_fraction": 0.1})["gpu_fraction"] == 0.1
    assert release_gpu_cache() is False


def test_cap_is_applied_once_per_process_and_fraction(monkeypatch):
    calls = []
    monkeypatch.setattr(node, "_GPU_CAPS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    task = {"device": "cuda", "gpu_fraction": 0.1}
    assert apply_gpu_memory_cap(task) == (0, 0.1)
    node_task({}, task)  # the next task of the same process: nothing new to apply
    apply_gpu_memory_cap({"device": "cuda:0", "gpu_fraction": 0.2})
    assert calls == [(0.1, 0), (0.2, 0)]
    assert apply_gpu_memory_cap({"device": "cpu", "gpu_fraction": 0.1}) is None and len(calls) == 2
