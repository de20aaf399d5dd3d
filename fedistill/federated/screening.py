"""What server policies and defences share: the context they run in, option checks, and the screen.

:func:`screen_clients` is both a defence (``defense=screen``) and the first step of a
policy (``policy=screen``), so it lives below :mod:`fedistill.federated.defenses` and
:mod:`fedistill.federated.policies`, which import it from here and never each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedistill.data.base import DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.federated.server import merge_sets
from fedistill.models import build_model
from fedistill.seeding import derive_seed
from fedistill.training import EvalRecipe, ModelSpec, test_metrics, train_model

__all__ = [
    "DefenseResult",
    "Parts",
    "PolicyContext",
    "class_prototypes",
    "embed_parts",
    "embedder",
    "keyword_options",
    "robust_z",
    "screen_clients",
]

Parts = Sequence[tuple[str, SyntheticSet]]


@dataclass
class PolicyContext:
    """What a policy may use besides the parts.

    Attributes
    ----------
    info
        The server's dataset description.
    model
        The global model's architecture (embeddings for ``screen``, the engine's network for ``redistill``).
    ipc
        The run's images per class (``redistill``'s default budget).
    seed, round_
        Drive the policy's random streams.
    device
        Where server-side computation runs.
    state
        The global model's current weights (``screen`` embeds with them), or ``None``.
    val
        A server-held validation split (``screen``'s optional loss check), or ``None``.
    """

    info: DatasetInfo
    model: ModelSpec
    ipc: int
    seed: int
    round_: int
    device: torch.device
    state: Mapping[str, torch.Tensor] | None = None
    val: Split | None = None


@dataclass
class DefenseResult:
    """A defence's output: the parts that pass (rows possibly removed), the clients dropped, metrics."""

    parts: list[tuple[str, SyntheticSet]]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def keyword_options(fn: Callable[..., Any], what: str, options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming ``what`` and the valid options when ``options`` has a key ``fn`` does not take."""
    valid = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {unknown}; valid options: {valid}")


# ----------------------------------------------------------------------------- embeddings
def embedder(ctx: PolicyContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """The global model's embedding (a seeded initialization before the first update)."""
    net = build_model(ctx.model.name, ctx.info, seed=derive_seed(ctx.seed, "policy-screen"), **ctx.model.kwargs)
    if ctx.state is not None:
        net.load_state_dict(dict(ctx.state))
    net = net.to(ctx.device).eval()
    return net.embed


def embed_parts(parts: Parts, ctx: PolicyContext) -> list[torch.Tensor]:
    embed = embedder(ctx)
    with torch.no_grad():
        return [embed(syn.images.to(ctx.device)).float().cpu() for _, syn in parts]


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """Modified z-scores ``(v - median) / (1.4826 MAD)`` (the MAD floored so identical values give 0)."""
    mid = values.median()
    mad = max(1.4826 * float((values - mid).abs().median()), 1e-3 * abs(float(mid)) + 1e-8)
    return (values - mid) / mad


def class_prototypes(parts: Parts, embs: list[torch.Tensor]) -> list[dict[int, torch.Tensor]]:
    return [
        {c: emb[syn.hard_labels == c].mean(0) for c in syn.hard_labels.unique().tolist()}
        for (_, syn), emb in zip(parts, embs, strict=True)
    ]


# ----------------------------------------------------------------------------- screen
def screen_clients(
    parts: Parts,
    ctx: PolicyContext,
    *,
    threshold: float = 3.5,
    min_holders: int = 3,
    val_epochs: int = 0,
    val_lr: float = 0.1,
    val_margin: float = 0.02,
) -> DefenseResult:
    """Drop clients whose class prototypes lie far from the robust (median) prototype.

    For every class held by at least ``min_holders`` clients: each client's prototype is
    the mean embedding of its rows of that class (the global model's ``embed``: a seeded
    initialization before the first update); the median prototype is the coordinate-wise
    median over clients; a client's class score is the robust z-score of its distance to
    it. A client's score is the mean over its screened classes (a mean, not the worst
    class: one few-sample class is noisy, a poisoned or broken client is off in all of
    them); it is dropped above ``threshold`` (3.5, the usual cut-off for modified z-scores).

    With ``val_epochs > 0`` the clients that pass are also checked on the server-held
    validation split (``ctx.val``): the global model is trained ``val_epochs`` on the
    union of the passing sets and on that union without each client in turn (SGD at
    ``val_lr``, batches of 64, from the global weights); a client whose set raises the
    validation loss by more than ``val_margin`` is dropped too. At most half of the
    clients are dropped (the worst first). ``metrics["scores"]`` has every client's score.
    """
    protos = class_prototypes(parts, embed_parts(parts, ctx))
    ratios: list[dict[int, float]] = [{} for _ in parts]
    for c in range(ctx.info.num_classes):
        holders = [i for i, p in enumerate(protos) if c in p]
        if len(holders) < min_holders:
            continue
        stack = torch.stack([protos[i][c] for i in holders])
        z = robust_z((stack - stack.median(0).values).norm(dim=1))
        for i, score in zip(holders, z.tolist(), strict=True):
            ratios[i][c] = score
    scores = [sum(r.values()) / len(r) if r else 0.0 for r in ratios]
    flagged = sorted((i for i, s in enumerate(scores) if s > threshold), key=lambda i: -scores[i])
    dropped = []
    for i in flagged:
        worst = max(ratios[i], key=ratios[i].get)
        reason = (
            f"distance of its class prototypes from the median prototype has a mean robust z-score of "
            f"{scores[i]:.1f} over {len(ratios[i])} classes (threshold {threshold}; worst: class {worst}, "
            f"{ratios[i][worst]:.1f})"
        )
        dropped.append({"client": parts[i][0], "reason": reason, "score": round(scores[i], 3)})
    if val_epochs > 0:
        dropped += _loss_screen(parts, ctx, set(flagged), epochs=val_epochs, lr=val_lr, margin=val_margin)
    gone = {d["client"] for d in dropped[: len(parts) // 2]}
    return DefenseResult(
        [p for p in parts if p[0] not in gone],
        [d for d in dropped if d["client"] in gone],
        {"scores": {parts[i][0]: round(s, 3) for i, s in enumerate(scores)}},
    )


def _loss_screen(
    parts: Parts, ctx: PolicyContext, skip: set[int], *, epochs: int, lr: float, margin: float
) -> list[dict[str, Any]]:
    """Leave-one-out check on the validation split: which passing clients raise its loss by more than ``margin``."""
    if ctx.val is None:
        raise ValueError("screen with val_epochs > 0 needs a server-held validation split")
    idx = [i for i in range(len(parts)) if i not in skip]
    if len(idx) < 3:
        return []
    recipe = EvalRecipe(epochs=epochs, lr=lr, batch_size=64, dsa=False, lr_decay=False)

    def val_loss(members: list[int]) -> float:
        syn = merge_sets([parts[i] for i in members], ctx.info)
        model = train_model(
            ctx.model,
            ctx.info,
            syn.images,
            syn.hard_labels,
            recipe=recipe,
            seed=derive_seed(ctx.seed, "policy-screen-val", ctx.round_),
            device=ctx.device,
            init_state=None if ctx.state is None else dict(ctx.state),
        )
        return test_metrics(model, ctx.val, device=ctx.device)[1]

    full = val_loss(idx)
    out = []
    for i in idx:
        without = val_loss([j for j in idx if j != i])
        if full - without > margin:
            reason = (
                f"validation loss {full:.3f} with its set and {without:.3f} without "
                f"(it raises the loss by more than val_margin={margin})"
            )
            out.append({"client": parts[i][0], "reason": reason, "score": round(full - without, 4)})
    return sorted(out, key=lambda d: -d["score"])
