"""Record-level DP mechanisms: Poisson sampling, per-sample clipping, noisy sums.

These are the only places where real records meet noise; engines call them (through
:class:`~fedistill.privacy.config.PrivacyConfig`) instead of sprinkling clipping and
noise through their loops. Every function takes an explicit ``torch.Generator``, so a
seed reproduces the noise on CPU.
"""

from __future__ import annotations

import torch

__all__ = ["add_group_noise", "clip_rows", "clipped_group_sums", "noisy_group_sums", "poisson_indices"]


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every row of ``x`` (flattened) to L2 norm at most ``clip`` (differentiable).

    Rows already inside the ball are unchanged; the factor is ``min(1, clip / ||row||)``.
    """
    if clip <= 0:
        raise ValueError(f"privacy.clip must be > 0, got {clip}")
    flat = x.reshape(len(x), -1)
    norms = flat.norm(dim=1, keepdim=True)
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    return (flat * factor).reshape(x.shape)


def poisson_indices(index: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson subsample of ``index``: every entry is kept independently with probability ``rate``."""
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {rate}")
    if rate == 1:
        return index
    keep = torch.rand(len(index), generator=generator) < rate
    return index[keep.to(index.device)]


def noisy_group_sums(
    rows: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    *,
    clip: float,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-group sums of clipped rows plus Gaussian noise ``N(0, sigma^2 clip^2)`` per coordinate.

    Each record lies in one group and its clipped row has norm at most ``clip``, so
    adding or removing one record moves the ``[num_groups, D]`` result by at most
    ``clip`` in L2: with the noise this is the Gaussian mechanism with noise multiplier
    ``sigma`` (one release for all groups together).

    Parameters
    ----------
    rows
        ``[N, ...]`` per-record values (embeddings, flattened gradients); no autograd needed.
    groups
        ``[N]`` group (class position) of every row, in ``0..num_groups-1``.
    """
    sums = clipped_group_sums(rows, groups, num_groups, clip=clip)
    return add_group_noise(sums, clip=clip, sigma=sigma, generator=generator)


def clipped_group_sums(
    rows: torch.Tensor, groups: torch.Tensor, num_groups: int, *, clip: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-group sums of ``rows`` clipped to ``clip`` (float32, no noise yet), added into ``out`` if given.

    Rows may come in chunks (``out`` accumulating them), so per-record values such as
    per-sample gradients never need to exist for all records at once; the noise is
    added once, to the finished sums (:func:`add_group_noise`).
    """
    flat = clip_rows(rows.detach().reshape(len(rows), -1).float(), clip)
    if out is None:
        out = torch.zeros(num_groups, flat.shape[1], dtype=flat.dtype, device=flat.device)
    out.index_add_(0, groups.to(out.device), flat.to(out.device))
    return out


def add_group_noise(sums: torch.Tensor, *, clip: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``sums`` plus ``N(0, sigma^2 clip^2)`` per coordinate, drawn on the CPU from ``generator``."""
    noise = torch.randn(sums.shape, generator=generator, dtype=sums.dtype) * (sigma * clip)
    return sums + noise.to(sums.device)
