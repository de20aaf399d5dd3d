"""Server policies for the synthetic sets clients send: how a round's sets become training data.

A policy takes the accepted ``(client, SyntheticSet)`` parts of a round and returns
the set the global model trains on, optional per-row loss weights, and the clients it
dropped with the reason. Policies are registered by name (``policy=screen``):

``union`` (default)
    All rows, with per-class weights ``1 / (clients holding the class)`` (normalized to
    mean 1), so a class many clients distilled does not outweigh a rare one.
``balance``
    Class-balanced resampling: every class is topped up with replacement to the largest
    class's row count (the union's rows come first, so provenance stays valid).
``redistill``
    Compress the union to exactly ``budget_ipc`` images per class with a registered
    engine run on the server.
``screen``
    Drop clients whose per-class embedding prototypes lie far from the robust (median)
    prototype of the clients holding that class; the union of the rest, reweighted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import ENGINES, DistillRequest, build_engine
from fedistill.federated.screening import Parts, PolicyContext, keyword_options, screen_clients
from fedistill.federated.server import FederationError, merge_sets
from fedistill.registry import Registry
from fedistill.seeding import derive_seed, torch_generator

__all__ = ["POLICIES", "PolicyContext", "PolicyResult", "apply_policy", "class_holders", "register_policy"]


@dataclass
class PolicyResult:
    """A policy's output: the training set, per-row weights (or ``None``), dropped clients, extra metrics."""

    synthetic: SyntheticSet
    weights: torch.Tensor | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


Policy = Callable[..., PolicyResult]
POLICIES: Registry[Policy] = Registry("policy")
register_policy = POLICIES.register


def apply_policy(name: str, parts: Parts, ctx: PolicyContext, **options: Any) -> PolicyResult:
    """Run the policy registered as ``name`` with keyword ``options``; adds ``policy_seconds``.

    Raises
    ------
    UnknownNameError
        For an unknown policy (the message lists the valid ones).
    TypeError
        For an option the policy does not take (the message lists the valid ones).
    """
    fn = POLICIES.get(name)
    keyword_options(fn, f"policy {name!r}", options)
    if not parts:
        raise FederationError("no synthetic set to aggregate")
    start = time.perf_counter()
    result = fn(parts, ctx, **options)
    result.metrics["policy_seconds"] = round(time.perf_counter() - start, 3)
    return result


def class_holders(parts: Parts, num_classes: int) -> torch.Tensor:
    """``[K]`` number of parts with at least one row of each class."""
    held = [torch.bincount(s.hard_labels, minlength=num_classes) > 0 for _, s in parts]
    return torch.stack(held).sum(0)


def _holder_weights(syn: SyntheticSet, holders: torch.Tensor) -> torch.Tensor:
    w = 1.0 / holders[syn.hard_labels].clamp(min=1).float()
    return w * (len(w) / w.sum())


@register_policy("union")
def union(parts: Parts, ctx: PolicyContext, *, reweight: bool = True) -> PolicyResult:
    """All rows; per-class weights ``1 / holders`` (normalized to mean 1) when ``reweight``."""
    syn = merge_sets(parts, ctx.info)
    weights = _holder_weights(syn, class_holders(parts, ctx.info.num_classes)) if reweight else None
    return PolicyResult(syn, weights)


@register_policy("balance")
def balance(parts: Parts, ctx: PolicyContext) -> PolicyResult:
    """Top every class up, by resampling its rows with replacement, to the largest class's count."""
    syn = merge_sets(parts, ctx.info)
    labels = syn.hard_labels
    counts = torch.bincount(labels, minlength=ctx.info.num_classes)
    target = int(counts.max())
    g = torch_generator(ctx.seed, "policy-balance", ctx.round_)
    extra = []
    for c in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(labels == c).flatten()
        extra.append(idx[torch.randint(len(idx), (target - len(idx),), generator=g)])
    rows = torch.cat([torch.arange(len(syn)), *extra])
    out = SyntheticSet(
        syn.images[rows],
        labels[rows],
        ctx.info,
        None if syn.soft_labels is None else syn.soft_labels[rows],
        metadata={**syn.metadata, "policy": "balance", "duplicates": len(rows) - len(syn)},
    )
    return PolicyResult(out, metrics={"duplicates": len(rows) - len(syn)})


@register_policy("redistill")
def redistill(
    parts: Parts,
    ctx: PolicyContext,
    *,
    budget_ipc: int | None = None,
    method: str = "dm",
    method_options: Mapping[str, Any] | None = None,
) -> PolicyResult:
    """Distill the union again on the server to exactly ``budget_ipc`` (default ``ipc``) images per class.

    The union's rows are the engine's "real" data; classes with fewer rows than the
    budget are padded with noise images where the engine supports it, so the result
    always has the budget.
    """
    budget = int(budget_ipc or ctx.ipc)
    union_set = merge_sets(parts, ctx.info)
    opts = dict(method_options or {})
    fields = {f.name for f in dataclasses.fields(ENGINES.get(method).Config)}
    opts |= {k: v for k, v in (("pad_small_classes", True), ("min_class_samples", 1)) if k in fields}
    engine = build_engine(method, model=ctx.model.name, model_kwargs=dict(ctx.model.kwargs), **opts)
    data = Split(union_set.images, union_set.hard_labels, ctx.info)
    seed = derive_seed(ctx.seed, "policy-redistill", ctx.round_)
    syn = engine.run(DistillRequest(data=data, ipc=budget, init="real", seed=seed, device=ctx.device))
    syn.metadata.pop("loss_history", None)
    present = torch.bincount(union_set.hard_labels, minlength=ctx.info.num_classes) > 0
    got = torch.bincount(syn.hard_labels, minlength=ctx.info.num_classes)
    if not torch.equal(got, present.long() * budget):
        raise FederationError(f"redistill with method={method} returned {got.tolist()} rows per class, not {budget}")
    provenance = [{"client": c, "rows": len(s)} for c, s in parts]
    syn.metadata.update(policy="redistill", budget_ipc=budget, sources=provenance, union_images=len(union_set))
    return PolicyResult(syn, metrics={"union_images": len(union_set)})


@register_policy("screen")
def screen(
    parts: Parts,
    ctx: PolicyContext,
    *,
    threshold: float = 3.5,
    min_holders: int = 3,
    reweight: bool = True,
    val_epochs: int = 0,
    val_lr: float = 0.1,
    val_margin: float = 0.02,
) -> PolicyResult:
    """The clients :func:`~fedistill.federated.screening.screen_clients` keeps, merged as by ``union``.

    (``policy=screen`` is the same screen as ``defense=screen`` followed by ``policy=union``.)
    """
    screened = screen_clients(
        parts,
        ctx,
        threshold=threshold,
        min_holders=min_holders,
        val_epochs=val_epochs,
        val_lr=val_lr,
        val_margin=val_margin,
    )
    result = union(screened.parts, ctx, reweight=reweight)
    result.dropped = screened.dropped
    result.metrics.update(screened.metrics)
    return result
