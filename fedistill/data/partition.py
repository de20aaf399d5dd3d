"""Non-IID partitioners: ``partition(labels, num_partitions, scheme, ..., seed)``.

Every scheme is a pure function of ``(labels, num_partitions, scheme, params, seed)``,
so every process (server, clients, Ray actors) derives the same split. All schemes
return disjoint index arrays that together cover every sample; a partition may hold
few or zero samples of a class (and, at tiny ``alpha``, few samples at all).

Schemes
-------
iid
    Shuffle and split into near-equal parts.
dirichlet
    Per class, proportions over partitions drawn from Dir(alpha); small alpha is very
    non-IID. Never fails: no minimum partition size is enforced unless asked for.
pathological
    Each partition holds ``k`` classes (FedD3-style); every class is spread evenly over
    the partitions that hold it.
shards
    Sort by label, cut into ``num_partitions * shards_per_partition`` equal shards and
    deal them at random (McMahan et al.).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedistill.registry import Registry
from fedistill.seeding import numpy_rng

__all__ = ["PARTITIONERS", "class_histogram", "partition"]

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partition scheme")


def partition(
    labels: np.ndarray, num_partitions: int, scheme: str = "iid", *, seed: int = 0, **params: Any
) -> list[np.ndarray]:
    """Split sample positions into ``num_partitions`` disjoint, sorted index arrays.

    Parameters
    ----------
    labels
        ``[N]`` integer class labels.
    num_partitions
        Number of clients.
    scheme
        ``iid``, ``dirichlet`` (``alpha``, optional ``min_size``), ``pathological``
        (``k``) or ``shards`` (``shards_per_partition``).
    seed
        The user seed; the partition stream is derived from it.
    """
    labels = np.asarray(labels).astype(np.int64)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    fn = PARTITIONERS.get(scheme)
    rng = numpy_rng(seed, "partition", scheme)
    try:
        parts = fn(labels, num_partitions, rng, **params)
    except TypeError as exc:
        raise TypeError(f"partition scheme {scheme!r}: bad parameters {sorted(params)} ({exc})") from exc
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``[num_partitions, num_classes]`` sample counts per partition and class."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


@PARTITIONERS.register("iid")
def _iid(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(len(labels)), n))


@PARTITIONERS.register("dirichlet")
def _dirichlet(
    labels: np.ndarray, n: int, rng: np.random.Generator, *, alpha: float, min_size: int = 0, max_tries: int = 100
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size * n > len(labels):
        raise ValueError(f"min_size={min_size} x {n} partitions exceeds the {len(labels)} samples")
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(np.int64)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet(alpha={alpha}) gave a partition smaller than min_size={min_size} in {max_tries} draws; "
        "lower min_size (0 never fails) or raise alpha"
    )


@PARTITIONERS.register("pathological")
def _pathological(labels: np.ndarray, n: int, rng: np.random.Generator, *, k: int = 2) -> list[np.ndarray]:
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ValueError(f"pathological k must be in [1, {len(classes)}], got {k}")
    # deal classes round-robin from a shuffled, repeated deck so every class is used evenly
    deck = np.concatenate([rng.permutation(classes) for _ in range(-(-n * k // len(classes)) + 1)])
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    pos = 0
    for i in range(n):
        chosen: list[int] = []
        while len(chosen) < k:
            c = int(deck[pos])
            pos += 1
            if c not in chosen:
                chosen.append(c)
        for c in chosen:
            owners[c].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, who in owners.items():
        if not who:  # more classes than n*k slots: the class goes to a random partition
            who = [int(rng.integers(n))]
        for i, chunk in zip(who, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(who)), strict=True):
            parts[i].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


@PARTITIONERS.register("shards")
def _shards(labels: np.ndarray, n: int, rng: np.random.Generator, *, shards_per_partition: int = 2) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n * shards_per_partition)
    deal = rng.permutation(len(shards)).reshape(n, shards_per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in deal]
