"""FedGen building blocks without Flower: a federated generator and latent-code payloads.

``strategy=fedgen`` has two phases (:mod:`strategies.fedgen`):

1. *generator rounds* — every client trains the server's conditional VAE
   (:class:`fedistill.engines.gen.CVAE`) for a few local epochs on its own data
   (:func:`generator_task`); the server FedAvgs the weights
   (:func:`fedistill.federated.weighted_average`);
2. *one distill round* — every client optimizes latent codes through the frozen,
   shared decoder with the ``gen`` engine and uploads only latents and labels
   (:func:`latent_task`, :func:`encode_latents`); the server validates them and
   decodes them with the same generator (:func:`decode_latent_payload`).

A latent payload is about ``latent_dim / (C*H*W)`` of a pixel payload of the same
images (float32 latents against float32 pixels; int64 labels in both).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedistill.data.base import DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet, SyntheticSetError
from fedistill.engines import build_engine
from fedistill.engines.base import NothingToDistillError
from fedistill.engines.gen import CVAE, decode_latents, new_cvae, train_cvae
from fedistill.federated.client import _setup, model_spec, task_request

__all__ = [
    "LATENT_KEYS",
    "build_generator",
    "decode_latent_payload",
    "encode_latents",
    "generator_task",
    "latent_task",
    "reconstruction_error",
]

LATENT_KEYS = ("latents", "labels")
"""The only arrays a latent-code reply may carry (never pixels)."""


def build_generator(info: DatasetInfo, state: Mapping[str, torch.Tensor], *, latent_dim: int, hidden: int) -> CVAE:
    """A frozen CPU :class:`CVAE` holding ``state`` (raises ``RuntimeError`` on a key/shape mismatch)."""
    model = new_cvae(info, latent_dim=latent_dim, hidden=hidden, seed=0)
    model.load_state_dict(dict(state))
    return model.eval().requires_grad_(False)


def reconstruction_error(generator: CVAE, data: Split, *, batch_size: int = 1024) -> float:
    """Mean squared error per pixel of decoding the posterior means of ``data`` (lower is better)."""
    generator = generator.to("cpu").eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, y = data.images[i : i + batch_size], data.labels[i : i + batch_size]
            total += float(F.mse_loss(generator.decode(generator.encode(x, y)[0], y), x, reduction="sum"))
    return total / max(1, data.images.numel())


def generator_task(
    split: Split, state: Mapping[str, torch.Tensor], task: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Local epochs of the global generator on this client's data (FedGen phase 1).

    Parameters
    ----------
    split
        The client's data.
    state
        The global generator's weights.
    task
        ``generator``: ``{"latent_dim", "hidden", "epochs", "lr", "beta"}``; ``seed``, ``device``, ``threads``.

    Returns
    -------
    state, metrics
        The local weights and ``{"examples", "recon_mse", "seconds"}``.
    """
    device = _setup(task)
    start = time.perf_counter()
    g = dict(task["generator"])
    model = train_cvae(
        split,
        latent_dim=int(g["latent_dim"]),
        hidden=int(g["hidden"]),
        epochs=int(g["epochs"]),
        lr=float(g["lr"]),
        beta=float(g["beta"]),
        seed=int(task["seed"]),
        device=device,
        init_state=state,
    )
    new = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return new, {
        "examples": len(split),
        "recon_mse": round(reconstruction_error(model, split), 6),
        "seconds": round(time.perf_counter() - start, 3),
    }


def encode_latents(syn: SyntheticSet) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Arrays (latents ``[N, d]`` float32, labels ``[N]`` int64) and metadata of a ``gen`` set, without pixels."""
    if "latents" not in syn.metadata or syn.labels is None:
        raise SyntheticSetError("latents", "the set carries no latent codes (distill with method=gen)")
    tensors = {
        "latents": torch.as_tensor(syn.metadata["latents"], dtype=torch.float32).contiguous(),
        "labels": syn.labels.detach().cpu().contiguous(),
    }
    meta = {k: v for k, v in syn.metadata.items() if k not in ("latents", "loss_history")}
    return tensors, meta


def latent_task(
    split: Split, state: Mapping[str, torch.Tensor], task: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], dict[str, Any]]:
    """Latent codes of this client's data through the given generator (FedGen phase 2).

    Runs the ``gen`` engine with ``task["method_options"]`` and ``generator_state=state``.

    Returns
    -------
    tensors, metadata, metrics
        The latent payload (``None`` when no class has enough samples), its metadata
        (with the generator's digest) and ``{"examples", "class_counts", "rows", "seconds"}``.
    """
    device = _setup(task)
    start = time.perf_counter()
    spec = model_spec(task["model"])
    engine = build_engine("gen", model=spec.name, model_kwargs=spec.kwargs, **task["method_options"])
    metrics: dict[str, Any] = {"examples": len(split), "class_counts": split.class_counts().tolist()}
    tensors: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    try:
        syn = engine.run(task_request(split, task, device, generator_state=state))
        tensors, meta = encode_latents(syn)
    except NothingToDistillError:
        pass
    rows = 0 if tensors is None else len(tensors["labels"])
    metrics.update(rows=rows, seconds=round(time.perf_counter() - start, 3))
    return tensors, meta, metrics


def decode_latent_payload(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    generator: CVAE,
    info: DatasetInfo,
    *,
    max_size: int,
    digest: str | None = None,
) -> SyntheticSet:
    """Validate a latent payload and decode it with ``generator`` into a synthetic set.

    Parameters
    ----------
    tensors, metadata
        The client's arrays (:data:`LATENT_KEYS`) and metadata.
    generator
        The server's generator (the one the client was sent).
    info
        The server's dataset description.
    max_size
        Per-client cap on rows.
    digest
        When given, the payload's ``metadata["generator"]["digest"]`` must match it.

    Raises
    ------
    SyntheticSetError
        Naming the field: unexpected or missing arrays, wrong shape or dtype,
        non-finite latents, labels out of range, too many rows, another generator.
    """
    extra = sorted(set(tensors) - set(LATENT_KEYS))
    if extra:
        raise SyntheticSetError("payload", f"unexpected arrays {extra}", f"send only {list(LATENT_KEYS)}")
    for key in LATENT_KEYS:
        if key not in tensors:
            raise SyntheticSetError(key, "missing from the payload")
    z, y = tensors["latents"], tensors["labels"]
    d = generator.latent_dim
    if z.dtype != torch.float32 or z.ndim != 2 or z.shape[1] != d:
        raise SyntheticSetError("latents", f"expected float32 [N, {d}], got {z.dtype} {tuple(z.shape)}")
    n = z.shape[0]
    if n == 0:
        raise SyntheticSetError("latents", "the set is empty")
    if n > max_size:
        raise SyntheticSetError("latents", f"{n} latent codes exceed the cap of {max_size}", "lower ipc")
    if not torch.isfinite(z).all():
        raise SyntheticSetError("latents", "contains NaN or infinite values")
    if y.dtype != torch.int64 or tuple(y.shape) != (n,):
        raise SyntheticSetError("labels", f"expected int64 ({n},), got {y.dtype} {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
        raise SyntheticSetError(
            "labels", f"values must lie in [0, {info.num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )
    if not isinstance(metadata, Mapping):
        raise SyntheticSetError("metadata", f"expected a JSON object, got {type(metadata).__name__}")
    ref = metadata.get("generator")
    got = ref.get("digest") if isinstance(ref, Mapping) else None
    if digest is not None and got != digest:
        raise SyntheticSetError("metadata", f"latents were optimized for generator {got}, the server's is {digest}")
    meta = {**metadata, "latents": z.tolist()}
    syn = SyntheticSet(decode_latents(generator, z, y), y.clone(), info, metadata=meta)
    return syn.validate(info, max_size=max_size)
