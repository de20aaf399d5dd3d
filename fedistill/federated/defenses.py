"""Server-side defences against hostile clients, selected per run with ``defense=``.

A defence acts where a strategy combines what clients send:

- on **synthetic sets** (``oneshot``, ``feddm``, ``fedaf``, ``fedgen``) it filters a
  round's ``(client, SyntheticSet)`` parts before the server policy merges them;
- on **class statistics** (FedAF's ``query.stats``) it replaces the count-weighted mean
  by a robust estimate;
- on **model updates** (``fedavg``, ``dynafed``) it names one of Flower's robust
  aggregators.

Registered defences:

``none``
    Nothing (the default).
``screen``
    Drop whole clients whose per-class embedding prototypes lie far from the median
    prototype of the clients holding that class (:func:`screen_clients`).
``robust_proto``
    Per-class robust prototypes: the coordinate-wise median (or trimmed mean) of the
    clients' class prototypes; clients whose rows rarely lie nearest to their own
    label's robust prototype are dropped (label-flipped and noise sets), and FedAF's
    class statistics are aggregated by the median over holders instead of the mean.
``dedup``
    Per-client caps and de-duplication: exact duplicate rows (within and across
    clients) are dropped and each client keeps at most ``per_class_cap`` (default
    ``ipc``) rows per class.
``median``, ``trimmed_mean``, ``krum``
    Flower's ``FedMedian``, ``FedTrimmedAvg`` and ``Krum`` for model averaging.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedistill.data.synthetic import SyntheticSet
from fedistill.federated.screening import (
    DefenseResult,
    Parts,
    PolicyContext,
    class_prototypes,
    embed_parts,
    keyword_options,
    robust_z,
    screen_clients,
)
from fedistill.registry import Registry

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseResult",
    "apply_defense",
    "check_defense",
    "keyword_options",
    "robust_stats",
    "screen_clients",
]

KINDS = ("sets", "stats", "aggregator")


@dataclass(frozen=True)
class Defense:
    """What a defence does: ``sets(parts, ctx, **options)``, a robust ``stats`` aggregate, an ``aggregator``."""

    sets: Callable[..., DefenseResult] | None = None
    stats: Callable[[Sequence[Mapping[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None
    aggregator: str | None = None

    @property
    def kinds(self) -> set[str]:
        """Where the defence acts: a subset of ``sets``, ``stats``, ``aggregator``."""
        return {k for k in KINDS if getattr(self, k) is not None}


DEFENSES: Registry[Defense] = Registry("defense")


def check_defense(name: str, strategy: str, acts_on: Sequence[str]) -> Defense:
    """The defence ``name``, checked to act on something strategy ``strategy`` combines (``acts_on``).

    Raises
    ------
    UnknownNameError
        For an unknown defence (the message lists the valid ones).
    ValueError
        When the defence does not apply to the strategy; the message lists those that do.
    """
    defense = DEFENSES.get(name)
    if name != "none" and not defense.kinds & set(acts_on):
        fits = sorted(n for n in DEFENSES.names() if DEFENSES.get(n).kinds & set(acts_on))
        raise ValueError(
            f"defense={name} acts on {sorted(defense.kinds)}, which strategy={strategy} does not combine "
            f"({sorted(acts_on)}); choose one of: none, {', '.join(fits)}"
        )
    return defense


def apply_defense(name: str, parts: Parts, ctx: PolicyContext, **options: Any) -> DefenseResult:
    """Filter a round's client sets with the defence ``name`` (unchanged when it does not act on sets)."""
    fn = DEFENSES.get(name).sets
    if fn is None:
        keyword_options(lambda: None, f"defense {name!r}", options)
        return DefenseResult(list(parts))
    keyword_options(fn, f"defense {name!r}", options)
    return fn(parts, ctx, **options)


def robust_stats(name: str, stats: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """The defence's robust aggregate of FedAF class statistics, or ``None`` when it has none."""
    fn = DEFENSES.get(name).stats
    return None if fn is None else fn(stats)


# ----------------------------------------------------------------------------- row filters
def _subset(syn: SyntheticSet, keep: torch.Tensor) -> SyntheticSet:
    return SyntheticSet(
        syn.images[keep],
        None if syn.labels is None else syn.labels[keep],
        syn.info,
        None if syn.soft_labels is None else syn.soft_labels[keep],
        metadata=dict(syn.metadata),
    )


def _filter_rows(parts: Parts, keeps: list[torch.Tensor], why: list[str]) -> DefenseResult:
    """Apply per-part row masks; a part left with no row is a dropped client (``why[i]`` says why)."""
    out, dropped, removed = [], [], {}
    for (client, syn), keep, reason in zip(parts, keeps, why, strict=True):
        n = int((~keep).sum())
        if n:
            removed[client] = n
        if not keep.any():
            dropped.append({"client": client, "reason": f"all {len(syn)} rows removed: {reason}"})
        else:
            out.append((client, syn if n == 0 else _subset(syn, keep)))
    return DefenseResult(out, dropped, {"rows_removed": removed})


def robust_prototypes(
    parts: Parts,
    ctx: PolicyContext,
    *,
    threshold: float = 2.5,
    min_holders: int = 3,
    estimator: str = "median",
    trim: float = 0.2,
    max_ratio: float = 0.5,
) -> DefenseResult:
    """Drop clients whose rows disagree with the per-class robust prototypes.

    For every class held by at least ``min_holders`` clients the robust prototype is the
    coordinate-wise ``median`` (or ``trimmed`` mean, ``trim`` cut from each end) of the
    clients' class prototypes (mean embeddings, as in :func:`screen_clients`), so a
    minority of hostile clients cannot move it. Each row is assigned to its nearest
    robust prototype; a client's *agreement* is the fraction of its rows assigned to
    their own label. A client is dropped when its agreement lies below the clients'
    median by more than ``threshold`` robust standard deviations (modified z-score) *and*
    below ``max_ratio`` times that median: label-flipped and noise sets agree far less
    than honest ones, whatever the embedding's scale, while the ratio keeps a tight
    spread among honest clients (a small MAD) from dropping an honest client that is
    merely below the rest. At most half of the clients are dropped, the worst first.
    """
    if estimator not in ("median", "trimmed"):
        raise ValueError(f"defense robust_proto: estimator={estimator!r}; valid: median, trimmed")
    embs = embed_parts(parts, ctx)
    protos = class_prototypes(parts, embs)
    classes = [c for c in range(ctx.info.num_classes) if sum(c in p for p in protos) >= min_holders]
    if len(classes) < 2:
        return DefenseResult(list(parts), metrics={"agreement": {}})
    stacks = [torch.stack([p[c] for p in protos if c in p]) for c in classes]
    centers = torch.stack([_robust_center(stack, estimator, trim) for stack in stacks])
    lookup = torch.tensor(classes)
    agreement: dict[int, float] = {}
    for i, ((_, syn), emb) in enumerate(zip(parts, embs, strict=True)):
        rows = torch.isin(syn.hard_labels, lookup)
        if rows.any():
            nearest = lookup[torch.cdist(emb[rows], centers).argmin(1)]
            agreement[i] = float((nearest == syn.hard_labels[rows]).float().mean())
    idx = list(agreement)
    z = robust_z(-torch.tensor([agreement[i] for i in idx])) if idx else torch.zeros(0)
    mid = float(torch.tensor(list(agreement.values())).median()) if idx else 0.0
    low = [k for k in range(len(idx)) if z[k] > threshold and agreement[idx[k]] < max_ratio * mid]
    flagged = sorted(low, key=lambda k: -float(z[k]))
    dropped = [
        {
            "client": parts[idx[k]][0],
            "reason": (
                f"only {100 * agreement[idx[k]]:.0f}% of its rows are nearest to their own class's robust "
                f"prototype (clients' median {100 * mid:.0f}%, max_ratio {max_ratio}; robust z-score "
                f"{float(z[k]):.1f} > {threshold})"
            ),
            "score": round(float(z[k]), 3),
        }
        for k in flagged[: len(parts) // 2]
    ]
    gone = {d["client"] for d in dropped}
    return DefenseResult(
        [p for p in parts if p[0] not in gone],
        dropped,
        {"agreement": {parts[i][0]: round(a, 3) for i, a in agreement.items()}},
    )


def _robust_center(stack: torch.Tensor, estimator: str, trim: float) -> torch.Tensor:
    if estimator == "median":
        return stack.median(0).values
    k = int(trim * len(stack))
    ordered = stack.sort(0).values
    return ordered[k : len(stack) - k].mean(0)


def median_stats(stats: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedAF class statistics aggregated by the coordinate-wise median over each class's holders.

    Unlike the count-weighted mean, a client cannot dominate a class by claiming a large
    count or sending extreme logits; soft-label rows are renormalized to sum to one.
    """
    if not stats:
        raise ValueError("no client statistics to aggregate")
    counts = torch.stack([s["class_counts"] for s in stats])
    k = counts.shape[1]
    out = {key: torch.zeros(k, k) for key in ("class_logits", "class_soft")}
    for c in range(k):
        holders = torch.nonzero(counts[:, c] > 0).flatten().tolist()
        if not holders:
            continue
        for key in out:
            out[key][c] = torch.stack([stats[i][key][c].float() for i in holders]).median(0).values
    out["class_soft"] = out["class_soft"] / out["class_soft"].sum(1, keepdim=True).clamp(min=1e-12)
    out["class_counts"] = counts.sum(0)
    out["holders"] = (counts > 0).sum(0).float()
    return out


def _row_keys(syn: SyntheticSet, decimals: int) -> list[str]:
    images = (syn.images.float() * 10**decimals).round().to(torch.int64).flatten(1)
    labels = syn.hard_labels
    return [
        hashlib.blake2b(images[i].numpy().tobytes() + int(labels[i]).to_bytes(8, "little"), digest_size=16).hexdigest()
        for i in range(len(syn))
    ]


def dedup(parts: Parts, ctx: PolicyContext, *, per_class_cap: int | None = None, decimals: int = 3) -> DefenseResult:
    """Drop duplicate rows (images equal to ``decimals`` places, same label; within and across
    clients, the first occurrence in client order wins) and cap each client at
    ``per_class_cap`` rows per class (default: the run's ``ipc``)."""
    cap = int(per_class_cap or ctx.ipc)
    seen: set[str] = set()
    keeps, why = [], []
    for _, syn in parts:
        keep = torch.ones(len(syn), dtype=torch.bool)
        per_class: dict[int, int] = {}
        dups = over = 0
        for i, (key, label) in enumerate(zip(_row_keys(syn, decimals), syn.hard_labels.tolist(), strict=True)):
            if key in seen:
                keep[i], dups = False, dups + 1
            elif per_class.get(label, 0) >= cap:
                keep[i], over = False, over + 1
            else:
                seen.add(key)
                per_class[label] = per_class.get(label, 0) + 1
        keeps.append(keep)
        why.append(f"{dups} duplicate rows, {over} rows over the cap of {cap} per class")
    return _filter_rows(parts, keeps, why)


DEFENSES.register("none")(Defense())
DEFENSES.register("screen")(Defense(sets=screen_clients))
DEFENSES.register("robust_proto")(Defense(sets=robust_prototypes, stats=median_stats))
DEFENSES.register("dedup")(Defense(sets=dedup))
for _name in ("median", "trimmed_mean", "krum"):
    DEFENSES.register(_name)(Defense(aggregator=_name))
