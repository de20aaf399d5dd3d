"""Partitioners: deterministic, disjoint and complete, tolerant of tiny alpha, shaped as named."""

from __future__ import annotations

import numpy as np
import pytest

from fedistill.data.partition import PARTITIONERS, class_histogram, partition
from fedistill.registry import UnknownNameError
from fedistill.reporting import save_partition_plot

CASES = [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("pathological", {"k": 2}), ("shards", {})]


@pytest.fixture(scope="module")
def labels(digits) -> np.ndarray:
    return digits.train.labels.numpy()


@pytest.mark.parametrize(("scheme", "params"), CASES)
def test_disjoint_complete_and_deterministic(labels, scheme, params):
    parts = partition(labels, 10, scheme, seed=3, **params)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    again = partition(labels, 10, scheme, seed=3, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 10, scheme, seed=4, **params)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_tiny_alpha_many_clients_never_fails(labels):
    parts = partition(labels, 100, "dirichlet", alpha=0.1, seed=0)
    hist = class_histogram(labels, parts, 10)
    assert hist.sum() == len(labels)
    assert (hist == 0).any()  # clients may hold zero samples of a class
    with pytest.raises(ValueError, match="lower min_size"):
        partition(labels, 100, "dirichlet", alpha=0.01, min_size=12, seed=0, max_tries=3)


def test_small_alpha_is_more_skewed(labels):
    def mean_classes(alpha: float) -> float:
        hist = class_histogram(labels, partition(labels, 20, "dirichlet", alpha=alpha, seed=0), 10)
        return float((hist > 0).sum(1).mean())

    assert mean_classes(0.1) < mean_classes(1.0) < mean_classes(100.0)
    assert mean_classes(100.0) == 10


def test_pathological_and_shards_shapes(labels):
    hist = class_histogram(labels, partition(labels, 10, "pathological", k=2, seed=0), 10)
    assert ((hist > 0).sum(1) == 2).all()
    sizes = [len(p) for p in partition(labels, 10, "shards", shards_per_partition=2, seed=0)]
    assert max(sizes) - min(sizes) <= 2


def test_errors_name_the_problem(labels):
    with pytest.raises(UnknownNameError, match="dirichlet"):
        partition(labels, 4, "zipf")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(labels, 4, "dirichlet", alpha=0)
    with pytest.raises(TypeError, match="bad parameters"):
        partition(labels, 4, "iid", alpha=0.3)
    assert set(PARTITIONERS.names()) == {"iid", "dirichlet", "pathological", "shards"}


def test_partition_plot(labels, tmp_path):
    parts = partition(labels, 12, "dirichlet", alpha=0.3, seed=0)
    path = save_partition_plot(class_histogram(labels, parts, 10), tmp_path / "partition.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
