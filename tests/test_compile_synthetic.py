"""DM's compiled synthetic branch (``method.compile_synthetic``): one compilation per process
serves every client, the result does not depend on which clients the process served before,
and it agrees with eager execution."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fedistill.engines.dm as dm_module
from fedistill.engines import build_engine

NET = {"width": 16, "depth": 2}
FAST = {"iterations": 6, "batch_real": 32, "lr_img": 10.0, "model_kwargs": NET, "compile": False, "releases": 3}


def _client(digits, classes: list[int], per_class: int):
    """A small non-IID client: ``per_class`` images of each of ``classes``."""
    labels = digits.train.labels
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in classes])
    return digits.train.subset(idx)


def _distill(split, ipc: int, *, compile_synthetic: bool, method: str = "dm") -> torch.Tensor:
    engine = build_engine(method, **FAST, compile_synthetic=compile_synthetic)
    return engine.distill(split, ipc, seed=7).images


def test_one_compilation_serves_clients_of_any_size_and_order(digits):
    """Client A (24 synthetic rows) and B (6 rows, below the conv's batch-16 guard) give the same
    images whichever the process distilled first; a third size reuses the compiled graphs."""
    a, b, c = _client(digits, [0, 1, 2], 20), _client(digits, [3, 4], 8), _client(digits, [5, 6, 7], 20)
    torch._dynamo.reset()
    a_first = _distill(a, 8, compile_synthetic=True)
    b_second = _distill(b, 3, compile_synthetic=True)
    counters.clear()
    _distill(c, 9, compile_synthetic=True)  # 27 rows: the graph compiled for A serves it
    assert counters["stats"]["unique_graphs"] == 0, "a new client size recompiled the synthetic branch"
    torch._dynamo.reset()
    b_first = _distill(b, 3, compile_synthetic=True)
    a_second = _distill(a, 8, compile_synthetic=True)
    assert torch.equal(a_first, a_second) and torch.equal(b_first, b_second)


def test_compiled_branch_agrees_with_eager(digits):
    """Same images up to float reassociation; compilation really happened (a graph was captured)."""
    split = _client(digits, [0, 1, 2, 3], 20)
    torch._dynamo.reset()
    counters.clear()
    fast = _distill(split, 5, compile_synthetic=True, method="feddm")
    assert counters["stats"]["unique_graphs"] >= 1
    eager = _distill(split, 5, compile_synthetic=False, method="feddm")
    torch.testing.assert_close(fast, eager, atol=1e-3, rtol=1e-3)


def test_auto_compiles_only_where_it_pays():
    """``auto``: CPU, at least ``compile_min_iterations``, images of at least ``compile_min_pixels``."""
    cpu = torch.device("cpu")
    engine = build_engine("dm", iterations=200)
    assert engine.compiles(cpu, synthetic=True, pixels=28 * 28)
    assert not engine.compiles(cpu, synthetic=True, pixels=8 * 8)  # digits: never repaid
    assert not build_engine("dm", iterations=199).compiles(cpu, synthetic=True, pixels=28 * 28)
    assert not engine.compiles(torch.device("meta"), synthetic=True, pixels=28 * 28)
    assert build_engine("dm", iterations=10, compile_synthetic=True).compiles(cpu, synthetic=True, pixels=64)
    with pytest.raises(ValueError, match=r"method\.compile_synthetic='yes'"):
        build_engine("dm", compile_synthetic="yes").compiles(cpu, synthetic=True, pixels=784)


def test_a_failing_compiler_falls_back_to_eager(digits, monkeypatch):
    """No C++ compiler on an edge device: the client warns and finishes with the eager result."""

    def broken(fn, **kwargs):
        def fails(x):
            raise RuntimeError("no C++ compiler")

        return fails

    monkeypatch.setattr(dm_module.torch, "compile", broken)
    split = _client(digits, [0, 1, 2], 20)
    with pytest.warns(UserWarning, match="running eagerly"):
        fallback = _distill(split, 4, compile_synthetic=True)
    assert torch.equal(fallback, _distill(split, 4, compile_synthetic=False))
