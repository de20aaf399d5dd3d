"""Server-side pieces: payload decoding and validation, merging, the global model.

Every synthetic set a server receives goes through :func:`decode_synthetic`, which
accepts only the expected arrays and runs :meth:`SyntheticSet.validate` against the
*server's* dataset description and a per-client size cap. A rejected reply becomes a
:class:`ClientFailure` with its reason; the round goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedistill.config_faults import FAULT_OPTIONS, fault_fraction
from fedistill.data.base import DataBundle, DatasetInfo
from fedistill.data.synthetic import SyntheticSet, SyntheticSetError
from fedistill.io import atomic_save_tensors
from fedistill.models import build_model
from fedistill.seeding import derive_seed
from fedistill.training import EvalRecipe, ModelSpec, random_subset, test_metrics, train_model

__all__ = [
    "FAULT_OPTIONS",
    "PAYLOAD_KEYS",
    "ClientFailure",
    "FederationError",
    "GlobalModel",
    "assign_faults",
    "decode_synthetic",
    "encode_synthetic",
    "examples_problem",
    "merge_sets",
    "random_baseline",
    "state_problem",
    "weighted_average",
]

PAYLOAD_KEYS = ("images", "labels", "soft_labels")
"""The only arrays a synthetic-set reply may carry."""


class FederationError(RuntimeError):
    """A federated run cannot go on (e.g. too few clients succeeded in a round)."""


@dataclass(frozen=True)
class ClientFailure:
    """One client's failure in one round: who, what kind, and why."""

    node: int
    client: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for ``metrics.jsonl``."""
        return asdict(self)


def encode_synthetic(syn: SyntheticSet) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Arrays and metadata of a synthetic-set payload (no dataset info: the server has its own)."""
    tensors = {"images": syn.images.detach().cpu().contiguous()}
    if syn.labels is not None:
        tensors["labels"] = syn.labels.detach().cpu().contiguous()
    if syn.soft_labels is not None:
        tensors["soft_labels"] = syn.soft_labels.detach().cpu().contiguous()
    return tensors, dict(syn.metadata)


def decode_synthetic(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], info: DatasetInfo, *, max_size: int
) -> SyntheticSet:
    """Rebuild and validate a synthetic set received from a client.

    Raises
    ------
    SyntheticSetError
        Naming the offending field: unexpected or missing arrays, wrong shape or
        dtype, non-finite values, labels out of range, more than ``max_size`` rows.
    """
    extra = sorted(set(tensors) - set(PAYLOAD_KEYS))
    if extra:
        raise SyntheticSetError("payload", f"unexpected arrays {extra}", f"send only {list(PAYLOAD_KEYS)}")
    if "images" not in tensors:
        raise SyntheticSetError("images", "missing from the payload")
    if not isinstance(metadata, Mapping):
        raise SyntheticSetError("metadata", f"expected a JSON object, got {type(metadata).__name__}")
    syn = SyntheticSet(
        tensors["images"], tensors.get("labels"), info, tensors.get("soft_labels"), metadata=dict(metadata)
    )
    return syn.validate(info, max_size=max_size)


def merge_sets(parts: Sequence[tuple[str, SyntheticSet]], info: DatasetInfo) -> SyntheticSet:
    """The union of client sets, ordered by client, with per-client provenance in its metadata.

    Soft labels are kept only when every part has them (otherwise hard labels are used).
    """
    if not parts:
        raise FederationError("no synthetic set to merge")
    soft = all(s.soft_labels is not None for _, s in parts)
    images, labels, softs, provenance, start = [], [], [], [], 0
    for client, syn in parts:
        images.append(syn.images)
        labels.append(syn.hard_labels)
        if soft:
            softs.append(syn.soft_labels)
        provenance.append(
            {"client": client, "start": start, "stop": start + len(syn), "method": syn.metadata.get("method")}
        )
        start += len(syn)
    methods = sorted({str(p["method"]) for p in provenance})
    meta = {"method": methods[0] if len(methods) == 1 else methods, "clients": provenance}
    return SyntheticSet(torch.cat(images), torch.cat(labels), info, torch.cat(softs) if soft else None, metadata=meta)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts (FedAvg); integer buffers are taken from the first state."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise FederationError("nothing to average: no client returned a model with a positive weight")
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


class GlobalModel:
    """The server's model: trained on synthetic sets (or averaged), evaluated on the real test set.

    Parameters
    ----------
    spec
        Architecture.
    bundle
        The server's dataset (its test split is used for evaluation only).
    recipe
        Training recipe on synthetic data.
    device, seed
        Where to train; the seed drives initialization and each round's training stream.
    continue_training
        Start each round's training from the current weights (FedDM) rather than afresh.
    """

    def __init__(
        self,
        spec: ModelSpec,
        bundle: DataBundle,
        *,
        recipe: EvalRecipe,
        device: torch.device,
        seed: int,
        continue_training: bool = True,
    ) -> None:
        self.spec, self.bundle, self.recipe, self.device, self.seed = spec, bundle, recipe, device, seed
        self.continue_training = continue_training
        model = build_model(spec.name, bundle.info, seed=derive_seed(seed, "global-init"), **spec.kwargs)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def train_on(
        self,
        syn: SyntheticSet,
        *,
        round_: int,
        weights: torch.Tensor | None = None,
        regularizer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> float:
        """Train on ``syn`` (soft labels when present); returns seconds spent.

        ``weights`` (per row) and ``regularizer`` (``(logits, targets) -> loss``) are
        passed to :func:`~fedistill.training.train_model`.
        """
        start = time.perf_counter()
        targets = syn.soft_labels if syn.soft_labels is not None else syn.hard_labels
        model = train_model(
            self.spec,
            self.bundle.info,
            syn.images,
            targets,
            recipe=self.recipe,
            seed=derive_seed(self.seed, "global-train", round_),
            device=self.device,
            init_state=self.state if self.continue_training else None,
            sample_weights=weights,
            regularizer=regularizer,
        )
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return time.perf_counter() - start

    def evaluate(self) -> tuple[float, float]:
        """Test accuracy (fraction) and loss of the current weights."""
        model = build_model(self.spec.name, self.bundle.info, **self.spec.kwargs).to(self.device)
        model.load_state_dict(self.state)
        return test_metrics(model, self.bundle.test, device=self.device)

    def backdoor_success(self, attack: Mapping[str, Any]) -> float:
        """Attack success rate (fraction) of a backdoor ``attack`` on the current weights."""
        from fedistill.federated.attacks import attack_success_rate

        model = build_model(self.spec.name, self.bundle.info, **self.spec.kwargs).to(self.device)
        model.load_state_dict(self.state)
        return attack_success_rate(
            model,
            self.bundle.test,
            target=int(attack["target"]),
            device=self.device,
            trigger_size=int(attack["trigger_size"]),
        )

    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors (atomically)."""
        return atomic_save_tensors(path, self.state, metadata={"model": self.spec.name})


def random_baseline(model: GlobalModel, labels: torch.Tensor, *, rounds: int = 1) -> dict[str, Any]:
    """A fresh model with ``model``'s architecture and recipe, trained on random real images.

    The images are drawn from the server's training split with the per-class counts of
    ``labels`` (a synthetic set's labels): the baseline every synthetic set must beat. It
    gets the training budget the global model had in total: ``rounds`` times the recipe's
    ``epochs`` and ``max_steps`` when the global model continued training over ``rounds``.
    """
    real = random_subset(model.bundle.train, labels, seed=model.seed)
    budget = model.recipe
    cap = None if budget.max_steps is None else budget.max_steps * int(rounds)
    recipe = replace(budget, epochs=budget.epochs * int(rounds), max_steps=cap)
    baseline = GlobalModel(
        model.spec, model.bundle, recipe=recipe, device=model.device, seed=model.seed, continue_training=False
    )
    baseline.train_on(SyntheticSet(real.images, real.labels, model.bundle.info), round_=0)
    acc, _ = baseline.evaluate()
    return {
        "images": len(real),
        "epochs": recipe.epochs,
        "max_steps": recipe.max_steps,
        "accuracy": round(100 * acc, 4),
    }


def assign_faults(
    faults: Mapping[str, Any], clients: Sequence[str], *, seed: int, kinds: Sequence[str]
) -> dict[str, str]:
    """Which client gets which injected fault.

    ``faults`` maps a partition id to a kind (``{"3": "crash"}``) or a kind to the
    fraction of clients that get it (``{"crash": 0.2, "slow": 0.1}``, chosen from the seed,
    disjoint across kinds and from explicitly assigned clients); ``start_round`` and
    ``slow_seconds`` are options, not kinds.

    Raises
    ------
    FederationError
        For an unknown kind (naming the valid kinds) or a partition id no client has.
    ConfigError
        For a fraction outside [0, 1] (:func:`fedistill.config_faults.fault_fraction`, the check
        ``fedistill simulate`` makes before it starts).
    """
    import numpy as np

    from fedistill.seeding import numpy_rng

    plan: dict[str, str] = {}
    fractions: dict[str, float] = {}
    for key, value in faults.items():
        key = str(key)
        if key in FAULT_OPTIONS:
            continue
        if key.isdigit():
            kind = str(value)  # Hydra parses `nan` as a float
            if kind not in kinds:
                raise FederationError(f"faults.{key}={kind}: unknown fault; valid: {', '.join(kinds)}")
            if f"p{key}" not in clients:
                raise FederationError(
                    f"faults.{key}={kind}: no client has partition id {key} (clients: {', '.join(clients[:5])}"
                    f"{', ...' if len(clients) > 5 else ''}); give a partition id below clients=, or a fraction"
                )
            plan[f"p{key}"] = kind
        elif key in kinds:
            fractions[key] = fault_fraction(key, value)
        else:
            raise FederationError(
                f"faults.{key}: neither a partition id nor a fault kind; kinds: {', '.join(kinds)}; "
                f"options: {', '.join(FAULT_OPTIONS)}"
            )
    for kind, frac in sorted(fractions.items()):
        free = [c for c in clients if c not in plan]
        count = min(len(free), int(np.ceil(frac * len(clients) - 1e-9)))
        for i in sorted(numpy_rng(seed, "faults", kind).choice(len(free), size=count, replace=False)):
            plan[free[i]] = kind
    return plan


def state_problem(state: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> str:
    """Why a client's weights cannot be averaged with ``ref`` (keys, shapes, finiteness); ``""`` when they can."""
    if set(state) != set(ref):
        missing, extra = sorted(set(ref) - set(state))[:3], sorted(set(state) - set(ref))[:3]
        return f"model keys differ from the global model's (missing {missing}, unexpected {extra})"
    for k, v in ref.items():
        if state[k].shape != v.shape:
            return f"model['{k}'] has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            return f"model['{k}'] contains NaN or infinite values"
    return ""


def examples_problem(examples: Any, *, held: int | None) -> str:
    """Why a FedAvg reply's ``examples`` (its weight in the average) cannot be used; ``""`` when it can.

    It must be a positive whole number and, where the server knows the client's partition
    (simulation), at most the records that partition holds: a client claiming 1000x its data
    would otherwise steer the weighted mean. On devices with their own data the count is
    unverifiable; ``defense=median|trimmed_mean|krum`` weigh clients without it.
    """
    if isinstance(examples, bool) or not isinstance(examples, int | float) or not math.isfinite(examples):
        return f"examples={examples!r} is not a number"
    if examples < 1 or examples != int(examples):
        return f"examples={examples!r} is not a positive whole number"
    if held is not None and examples > held:
        return f"claims {int(examples)} examples, but its partition holds {held} records"
    return ""
