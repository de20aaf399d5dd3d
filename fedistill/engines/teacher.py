"""Teacher / observer models shared by the decoupled engines (SRe2L, RDED) and evaluation.

A teacher is a model trained ("squeezed") on the real data with the evaluation
trainer (:func:`fedistill.training.train_model`), cached on disk by everything that
determines it: dataset, a fingerprint of the exact training images and labels,
architecture, seed and training recipe. A second call with the same inputs loads
the weights instead of training again. Engines write :meth:`Teacher.metadata` into
the synthetic set, so evaluation can reload the same teacher to relabel the random
real baseline (:func:`teacher_from_metadata`).
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.data.base import Split
from fedistill.engines.experts import data_fingerprint, expert_trajectories, experts_cached
from fedistill.io import cache_key, cached_tensors
from fedistill.models import build_model
from fedistill.seeding import derive_seed
from fedistill.training import EvalRecipe, ModelSpec, train_model

__all__ = [
    "Teacher",
    "TeacherConfig",
    "expert_teacher",
    "expert_teacher_parts",
    "get_teacher",
    "teacher_from_metadata",
]

_RECIPE_KEYS = ("model", "epochs", "lr", "batch_size", "dsa", "cache_dir")


@dataclass(frozen=True)
class TeacherConfig:
    """How a teacher is trained.

    Attributes
    ----------
    model, model_kwargs
        Registered architecture and options. The default is a BatchNorm ConvNet
        (SRe2L's recover step matches BatchNorm statistics).
    epochs, lr, batch_size, dsa
        The evaluation trainer's recipe (SGD, momentum 0.9, lr x0.1 at half).
    cache_dir
        Artefact cache (default ``$FEDISTILL_CACHE`` or ``~/.cache/fedistill``).
    """

    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 64, "norm": "batch"})
    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 128
    dsa: bool = True
    cache_dir: str | None = None

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The default teacher as the flat option mapping :meth:`from_dict` reads (an engine's
        ``teacher`` option; ``method.teacher.width=32`` overrides one key)."""
        base = cls()
        recipe = {k: getattr(base, k) for k in _RECIPE_KEYS if getattr(base, k) is not None}
        return {**recipe, **base.model_kwargs}

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> TeacherConfig:
        """From a flat config mapping: recipe keys, everything else is an architecture option.

        ``{"epochs": 20, "width": 32}`` trains a width-32 BatchNorm ConvNet for 20 epochs:
        architecture options update the default ConvNet's; for another ``model`` they
        replace them.
        """
        opts = dict(options or {})
        recipe = {k: opts.pop(k) for k in _RECIPE_KEYS if k in opts}
        if "model_kwargs" in opts:
            opts = {**opts.pop("model_kwargs"), **opts}
        base = cls(**recipe)
        if base.model == cls.model:
            opts = {**base.model_kwargs, **opts}
        return dataclasses.replace(base, model_kwargs=opts)

    def key_parts(self) -> dict[str, Any]:
        """What determines the trained weights (besides data and seed)."""
        return {
            "arch": self.model,
            "model_kwargs": dict(sorted(self.model_kwargs.items())),
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "dsa": self.dsa,
        }


@dataclass
class Teacher:
    """A trained, frozen teacher in eval mode.

    Attributes
    ----------
    model
        The network (``requires_grad`` off, eval mode).
    config
        How it was trained.
    parts
        The cache key parts (dataset, data fingerprint, arch, seed, recipe).
    cached
        Whether it was loaded from the cache rather than trained now.
    seconds
        Time spent training (0 on a cache hit) or loading.
    """

    model: nn.Module
    config: TeacherConfig
    parts: dict[str, Any]
    cached: bool
    seconds: float

    @property
    def key(self) -> str:
        """The cache file stem."""
        return cache_key("teacher", **self.parts)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Teacher logits for ``images`` (on the teacher's device), in chunks, on the CPU."""
        dev = next(self.model.parameters()).device
        out = [self.model(images[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def soft_labels(self, images: torch.Tensor, *, temperature: float) -> torch.Tensor:
        """``softmax(logits / temperature)``, ``[N, K]`` float32 on the CPU."""
        return F.softmax(self.logits(images) / temperature, dim=1)

    def relabeller(self, *, temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> softmax(teacher(x) / temperature)`` on ``x``'s device, without autograd (online labels)."""

        def relabel(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return F.softmax(self.model(x).float() / temperature, dim=1)

        return relabel

    def accuracy(self, split: Split) -> float:
        """Top-1 accuracy (fraction) on ``split``."""
        pred = self.logits(split.images).argmax(1)
        return float((pred == split.labels).float().mean()) if len(split) else 0.0

    def metadata(self, *, temperature: float | None = None) -> dict[str, Any]:
        """JSON record for ``SyntheticSet.metadata["teacher"]`` (enough to reload it)."""
        out = {"key": self.key, **self.parts, "cache_dir": self.config.cache_dir}
        if temperature is not None:
            out["temperature"] = temperature
        return out


def get_teacher(
    data: Split,
    config: TeacherConfig | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Teacher:
    """Train a teacher on ``data``, or load it from the cache.

    Parameters
    ----------
    data
        The real training images (a dataset's train split or a client's partition).
    config
        Architecture and recipe (default :class:`TeacherConfig`).
    seed
        Drives initialization, batch order and augmentation (seed stream ``teacher``).
    device
        Where the teacher trains and runs.

    Returns
    -------
    Teacher
        Frozen, in eval mode, on ``device``.
    """
    cfg = config or TeacherConfig()
    dev = torch.device(device)
    spec = ModelSpec(cfg.model, dict(cfg.model_kwargs))
    recipe = EvalRecipe(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, dsa=cfg.dsa)
    parts = {"dataset": data.info.name, "data": data_fingerprint(data), "seed": seed, **cfg.key_parts()}
    built = []

    def build() -> dict[str, torch.Tensor]:
        built.append(True)
        net = train_model(
            spec, data.info, data.images, data.labels, recipe=recipe, seed=derive_seed(seed, "teacher"), device=dev
        )
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    start = time.perf_counter()
    state = cached_tensors("teacher", build, root=cfg.cache_dir, **parts)
    model = build_model(cfg.model, data.info, **cfg.model_kwargs)
    model.load_state_dict(state)
    model = model.to(dev).eval().requires_grad_(False)
    return Teacher(model, cfg, parts, cached=not built, seconds=round(time.perf_counter() - start, 3))


def teacher_from_metadata(
    meta: dict[str, Any], data: Split, *, device: torch.device | str = "cpu", cache_dir: str | Path | None = None
) -> Teacher:
    """Reload the teacher recorded by :meth:`Teacher.metadata` (retrained if the cache lost it).

    Raises
    ------
    ValueError
        If ``data`` is not the data the teacher was trained on (fingerprint mismatch).
    """
    fp = data_fingerprint(data)
    if meta.get("data") is not None and not fp.startswith(str(meta["data"])):  # earlier sets kept 16 hex digits
        raise ValueError(
            f"teacher {meta.get('key')} was trained on other data (fingerprint {meta.get('data')} != {fp}); "
            "evaluate against the training split the set was distilled from"
        )
    if meta.get("source") == "expert":
        return expert_teacher(meta, data, device=device, cache_dir=cache_dir)
    cfg = TeacherConfig(
        model=meta["arch"],
        model_kwargs=dict(meta["model_kwargs"]),
        epochs=int(meta["epochs"]),
        lr=float(meta["lr"]),
        batch_size=int(meta["batch_size"]),
        dsa=bool(meta["dsa"]),
        cache_dir=str(cache_dir) if cache_dir is not None else meta.get("cache_dir"),
    )
    return get_teacher(data, cfg, seed=int(meta["seed"]), device=device)


#: The fields of a teacher record that determine an expert teacher (:func:`expert_teacher_parts`).
EXPERT_PARTS = (
    "source",
    "dataset",
    "data",
    "arch",
    "model_kwargs",
    "seed",
    "num_experts",
    "epochs",
    "lr",
    "momentum",
    "batch_size",
    "dsa",
)


def expert_teacher_parts(data: Split, config: Any, *, seed: int) -> dict[str, Any]:
    """What determines the teacher that is expert 0's final parameters (TESLA's labeller).

    ``config`` is an :class:`~fedistill.engines.mtt.MTTConfig` (its ``expert_*``, ``num_experts``,
    ``model``, ``model_kwargs`` and ``dsa`` fields); the parts name the expert buffer it comes from.
    """
    return {
        "source": "expert",
        "dataset": data.info.name,
        "data": data_fingerprint(data),
        "arch": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "seed": int(seed),
        "num_experts": int(config.num_experts),
        "epochs": int(config.expert_train_epochs),
        "lr": float(config.expert_lr),
        "momentum": float(config.expert_momentum),
        "batch_size": int(config.expert_batch),
        "dsa": bool(config.dsa),
    }


def expert_teacher(
    parts: dict[str, Any], data: Split, *, device: torch.device | str = "cpu", cache_dir: str | Path | None = None
) -> Teacher:
    """Expert 0's final parameters as a :class:`Teacher` (from the expert cache, retrained if it lost them).

    ``parts`` as :func:`expert_teacher_parts` returns them (or the ``teacher`` record of a set).
    """
    start = time.perf_counter()
    root = str(cache_dir) if cache_dir is not None else parts.get("cache_dir")
    recipe = types.SimpleNamespace(
        model=parts["arch"],
        model_kwargs=dict(parts["model_kwargs"]),
        num_experts=int(parts["num_experts"]),
        expert_train_epochs=int(parts["epochs"]),
        expert_lr=float(parts["lr"]),
        expert_momentum=float(parts["momentum"]),
        expert_batch=int(parts["batch_size"]),
        dsa=bool(parts["dsa"]),
        cache_dir=root,
    )
    seed = int(parts["seed"])
    cached = experts_cached(data, recipe, seed=seed)
    final = expert_trajectories(data, recipe, seed=seed, device=torch.device("cpu"))["expert_0"][-1]
    net = build_model(recipe.model, data.info, **recipe.model_kwargs)
    nn.utils.vector_to_parameters(final.clone(), net.parameters())
    config = TeacherConfig(
        model=recipe.model,
        model_kwargs=recipe.model_kwargs,
        epochs=recipe.expert_train_epochs,
        lr=recipe.expert_lr,
        batch_size=recipe.expert_batch,
        dsa=recipe.dsa,
        cache_dir=root,
    )
    own = {k: parts[k] for k in EXPERT_PARTS}
    model = net.to(device).eval().requires_grad_(False)
    return Teacher(model, config, own, cached=cached, seconds=round(time.perf_counter() - start, 3))
