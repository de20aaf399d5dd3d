"""Seed streams: one user ``seed`` drives independent, named random streams.

Each consumer (partition, client sampling, model init, synthetic init, evaluation,
...) asks for its own stream by name, so adding randomness in one place never
shifts the random numbers drawn in another.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["derive_seed", "numpy_rng", "torch_generator"]


def derive_seed(seed: int, *stream: str | int) -> int:
    """Derive a 63-bit seed for the named stream from the user ``seed``.

    Parameters
    ----------
    seed
        The user's seed.
    *stream
        Stream name parts, e.g. ``("eval", "convnet", 2)``.

    Returns
    -------
    int
        A non-negative integer seed, stable across processes and platforms.
    """
    key = "/".join(str(s) for s in stream).encode()
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    words += list(np.frombuffer(hashlib.sha256(key).digest()[:16], dtype=np.uint32))
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> 1)


def torch_generator(seed: int, *stream: str | int, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` seeded for the named stream."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *stream))
    return g


def numpy_rng(seed: int, *stream: str | int) -> np.random.Generator:
    """A :class:`numpy.random.Generator` seeded for the named stream."""
    return np.random.default_rng(derive_seed(seed, *stream))
