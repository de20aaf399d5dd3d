"""What a client does with a message, as plain functions (the ClientApp only moves records).

A *task* is the JSON-able dict the server sends: ``method`` and ``method_options``
(the engine and its config: the whole ``method`` group), ``ipc``, ``init``, ``rounds``,
``seed`` (this client's, derived by the server), ``device``, ``threads``, ``model``
(``{"name", ...options}``), ``fit`` (the local SGD recipe of FedAvg), ``temperature``
(FedAF's class statistics). A planned ``fault`` or ``attack`` in the task is not read here:
the simulation's ClientApp acts them out around these functions (``clients/faults.py`` with
:mod:`fedistill.federated.faults`, ``clients/attacks.py`` with
:mod:`fedistill.federated.attacks`). The server always sends the keys a handler reads, so no default is
restated here: the single source is the config (``configs/``) the server composes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines import ENGINES, DistillRequest, build_engine, resolve_device
from fedistill.engines.base import ARRAY_INPUTS, NothingToDistillError
from fedistill.federated.fedaf import class_stats
from fedistill.models import build_model
from fedistill.privacy import PrivacyLedger
from fedistill.training import EvalRecipe, ModelSpec, test_metrics, train_model

__all__ = [
    "client_ledger",
    "distill_task",
    "evaluate_task",
    "fit_task",
    "model_spec",
    "node_ledger_releases",
    "release_task",
    "stats_task",
    "task_request",
]


def model_spec(model: Mapping[str, Any]) -> ModelSpec:
    """``{"name": "convnet", "width": 32}`` -> :class:`ModelSpec`."""
    opts = dict(model)
    return ModelSpec(opts.pop("name"), opts)


def _setup(task: Mapping[str, Any]) -> torch.device:
    """Threads and device for a task."""
    torch.set_num_threads(max(1, int(task["threads"])))
    return resolve_device(task["device"])


def client_ledger(
    task: Mapping[str, Any], options: Mapping[str, Any], node_state: Mapping[str, Any] | None
) -> PrivacyLedger:
    """This client's cumulative privacy ledger for a DP task.

    The node keeps its own ledger across rounds (``node_state``); the server mirrors it
    from the replies and sends its copy (``task["privacy_ledger"]``) so a restarted node
    or a resumed server never forgets spent budget: the copy with more releases wins.
    The budget is the method options' ``epsilon`` (``None``: no budget); a fresh ledger
    takes their ``accountant`` and ``delta``.
    """
    copies = [PrivacyLedger.from_state(s) for s in (node_state, task.get("privacy_ledger")) if s]
    ledger = max(copies, key=lambda led: led.releases, default=None)
    if ledger is None:
        ledger = PrivacyLedger(accountant=options["accountant"], delta=float(options["delta"]))
    eps = options["epsilon"]
    ledger.budget = None if eps is None else float(eps)
    return ledger


def node_ledger_releases(node_state: Mapping[str, Any] | None) -> int:
    """Releases in the node's own ledger copy (``0``: none yet, or a restarted node that lost it).

    Reported with every DP reply (``node_ledger_releases``), so a run shows whether the node's
    state or only the server's mirror carried the ledger into a round.
    """
    return PrivacyLedger.from_state(node_state).releases if node_state else 0


def task_request(split: Split, task: Mapping[str, Any], device: torch.device, **inputs: Any) -> DistillRequest:
    """The engine request of a client task: its ``ipc``, ``init`` and ``seed`` on ``split``, plus ``inputs``."""
    return DistillRequest(
        data=split, ipc=int(task["ipc"]), init=task["init"], seed=int(task["seed"]), device=device, **inputs
    )


def distill_task(
    split: Split,
    task: Mapping[str, Any],
    *,
    base_state: dict[str, torch.Tensor] | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
    ledger_state: Mapping[str, Any] | None = None,
) -> tuple[SyntheticSet | None, dict[str, Any]]:
    """Distill this client's data with the task's engine.

    ``base_state`` (the global model) and ``inputs`` (server arrays, the
    :data:`~fedistill.engines.base.ARRAY_INPUTS` fields of the request) go into the
    engine's request when given; an engine refuses an input it does not read. A differentially
    private engine continues the client's ledger (``ledger_state``, the node's own copy,
    or the server's copy in the task), plans its noise over the task's ``rounds`` and
    refuses a release over budget (:class:`~fedistill.privacy.BudgetExceededError`).
    The updated ledger is in ``synthetic.metadata["privacy"]["ledger"]``.

    Returns
    -------
    synthetic, metrics
        The synthetic set (``None`` when no class has enough samples for the engine:
        the client succeeds with nothing to contribute) and
        ``{"examples", "class_counts", "seconds", "rows", "epsilon"?, "node_ledger_releases"?}``.
    """
    device = _setup(task)
    start = time.perf_counter()
    spec = model_spec(task["model"])
    options = dict(task["method_options"])
    unknown = sorted(set(inputs or {}) - set(ARRAY_INPUTS))
    if unknown:
        raise ValueError(f"unexpected engine inputs {unknown}; valid: {list(ARRAY_INPUTS)}")
    ledger = None
    if ENGINES.get(task["method"]).takes("ledger"):
        if options.get("planned_rounds") is None:
            options["planned_rounds"] = int(task["rounds"])
        ledger = client_ledger(task, options, ledger_state)
    engine = build_engine(task["method"], model=spec.name, model_kwargs=spec.kwargs, **options)
    metrics = {"examples": len(split), "class_counts": split.class_counts().tolist()}
    request = task_request(split, task, device, base_state=base_state, ledger=ledger, **dict(inputs or {}))
    try:
        syn = engine.run(request)
    except NothingToDistillError:
        syn = None
    if ledger is not None:
        metrics |= {"epsilon": round(ledger.epsilon, 6), "node_ledger_releases": node_ledger_releases(ledger_state)}
    if syn is not None:
        syn.metadata.pop("loss_history", None)
    metrics.update(seconds=round(time.perf_counter() - start, 3), rows=0 if syn is None else len(syn))
    return syn, metrics


def _recipe(task: Mapping[str, Any]) -> EvalRecipe:
    return EvalRecipe(**{**{"dsa": False, "lr_decay": False}, **dict(task["fit"])})


def fit_task(
    split: Split, state: dict[str, torch.Tensor], task: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Local SGD from the global ``state`` on this client's data (the FedAvg baseline)."""
    device = _setup(task)
    start = time.perf_counter()
    model = train_model(
        model_spec(task["model"]),
        split.info,
        split.images,
        split.labels,
        recipe=_recipe(task),
        seed=int(task["seed"]),
        device=device,
        init_state=state,
    )
    acc, loss = test_metrics(model, split, device=device)
    new = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    metrics = {"examples": len(split), "train_accuracy": acc, "train_loss": loss, "seconds": seconds}
    return new, metrics


def evaluate_task(split: Split, state: dict[str, torch.Tensor], task: Mapping[str, Any]) -> dict[str, Any]:
    """Accuracy and loss of the global ``state`` on this client's data."""
    device = _setup(task)
    spec = model_spec(task["model"])
    model = build_model(spec.name, split.info, **spec.kwargs).to(device)
    model.load_state_dict(state)
    acc, loss = test_metrics(model, split, device=device)
    return {"examples": len(split), "accuracy": acc, "loss": loss}


def stats_task(
    split: Split, state: dict[str, torch.Tensor], task: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedAF's class statistics of the global ``state`` on this client's real data.

    Returns
    -------
    tensors, metrics
        :func:`fedistill.federated.fedaf.class_stats` (``class_logits``, ``class_soft``,
        ``class_counts``) at ``task["temperature"]`` and ``{"examples", "seconds"}``.
    """
    device = _setup(task)
    start = time.perf_counter()
    spec = model_spec(task["model"])
    model = build_model(spec.name, split.info, **spec.kwargs)
    model.load_state_dict(state)
    stats = class_stats(model, split, temperature=float(task["temperature"]), device=device)
    return stats, {"examples": len(split), "seconds": round(time.perf_counter() - start, 3)}


RELEASE_PUBLIC = (
    "which clients took part in a round (the server sees a reply per client)",
    "the sum's shape: releases x classes x embedding width (fixed by the public plan)",
)
"""What a ``dp_stats`` release reveals beyond its noisy sums (class sizes are noised, not public)."""


def release_task(
    split: Split, task: Mapping[str, Any], *, ledger_state: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Aggregate-then-distill DP (``strategy=dp_stats``): this client's noisy class sums for shared releases.

    The task's ``release_seed`` fixes the releases' networks and augmentations (the same
    on every client); the client's own ``seed`` drives its Poisson sampling and noise.
    Every release is accounted in the client's ledger (continued from ``ledger_state``
    as in :func:`distill_task`, budget ``method_options.epsilon`` over ``rounds``).
    ``noise_share`` below 1 adds that share of the noise (distributed DP: only under
    secure aggregation, where the server sees nothing but the sum).

    Returns
    -------
    tensors, privacy, metrics
        ``{"sums": [R, K, D + 1]}`` (all ``K`` classes, the last column the noisy count),
        the release's privacy report (with the updated ledger; its ``public`` side channels
        are :data:`RELEASE_PUBLIC`) and ``{"epsilon", "releases", "node_ledger_releases", "seconds"}`` (no record
        or class counts: those go out only as the noisy count column).
    """
    device = _setup(task)
    start = time.perf_counter()
    spec = model_spec(task["model"])
    options = dict(task["method_options"])
    if options.get("planned_rounds") is None:
        options["planned_rounds"] = int(task["rounds"])
    ledger = client_ledger(task, options, ledger_state)
    engine = build_engine("dp_dm", model=spec.name, model_kwargs=spec.kwargs, **options)
    sums, release = engine.release(  # type: ignore[attr-defined]
        split,
        list(range(split.info.num_classes)),
        release_seed=int(task["release_seed"]),
        seed=int(task["seed"]),
        device=device,
        ledger=ledger,
        count_share=float(task["count_share"]),
        noise_share=float(task["noise_share"]),
    )
    # no record or class count goes out in the clear: the count column carries them, noised
    metrics = {
        "epsilon": round(ledger.epsilon, 6),
        "releases": len(sums),
        "node_ledger_releases": node_ledger_releases(ledger_state),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return {"sums": sums.cpu().contiguous()}, release.report() | {"public": list(RELEASE_PUBLIC)}, metrics
