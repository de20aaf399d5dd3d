"""Model registry: ``build_model(name, info, **kwargs)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedistill.data.base import DatasetInfo
from fedistill.registry import Registry

__all__ = ["MODELS", "build_model", "register_model", "reinitialize"]

MODELS: Registry[type[nn.Module]] = Registry("model")
register_model = MODELS.register


def build_model(name: str, info: DatasetInfo, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model for ``info``'s image shape and classes.

    Parameters
    ----------
    name
        Registry name (``convnet``, ``mlp``, ``lenet``, ``resnet18``).
    info
        Dataset description (channels, image size, classes).
    seed
        If given, parameters are initialized from this seed without touching the
        global RNG (see :func:`reinitialize`).
    **kwargs
        Architecture options (``width``, ``depth``, ``norm`` ...).
    """
    cls = MODELS.get(name)
    try:
        # construction draws default inits; keep them off the global RNG when seeded
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            model = cls(channels=info.channels, num_classes=info.num_classes, image_size=info.image_size, **kwargs)
    except TypeError as exc:
        raise TypeError(f"model {name!r}: bad options {sorted(kwargs)} ({exc})") from exc
    return model if seed is None else reinitialize(model, seed)


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-run every submodule's default ``reset_parameters`` from ``seed``.

    The global RNG state is saved and restored, so this neither depends on nor
    disturbs other random streams.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model
