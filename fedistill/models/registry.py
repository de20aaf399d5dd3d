"""Model registry: ``build_model(name, info, **kwargs)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

    The draws always come from the CPU generator (seeded alone: the CUDA generators are
    neither reseeded nor read), on a CPU twin of every parameter and buffer that lives
    on another device, whose values are then copied back in place; so a model on CUDA
    gets exactly the weights the same model gets on CPU. The global CPU RNG state is
    saved and restored, so this neither depends on nor disturbs other random streams.
    """
    with torch.random.fork_rng(devices=[]), _cpu_twin(model):
        torch.default_generator.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


@contextlib.contextmanager
def _cpu_twin(model: nn.Module, *, everything: bool = False) -> Iterator[None]:
    """Swap every non-CPU parameter and buffer of ``model`` (all when ``everything``) for a CPU copy.

    On exit the CPU values are copied back into the original tensors (in place, so
    optimizers and hooks holding them stay valid) and the originals are put back.
    A model wholly on CPU is left untouched unless ``everything``.
    """
    twins: dict[int, torch.Tensor] = {}  # id(original) -> CPU twin (tied weights share one)
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is None or (t.device.type == "cpu" and not everything):
                    continue
                if id(t) not in twins:
                    cpu = t.detach().to("cpu", copy=True)
                    is_param = isinstance(t, nn.Parameter)
                    twins[id(t)] = nn.Parameter(cpu, requires_grad=t.requires_grad) if is_param else cpu
                swapped.append((store, name, t))
                store[name] = twins[id(t)]
    try:
        yield
    finally:
        with torch.no_grad():
            for store, name, t in swapped:
                t.copy_(store[name])
                store[name] = t
