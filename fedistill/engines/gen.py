"""Distillation through a class-conditional generator (GLaD-style latents; FedDGM's payload idea).

A small conditional VAE is trained on the real data; its decoder ``G(z, y)`` is the
generator. The synthetic set is a set of latent codes ``z`` (``ipc`` per class),
optimized through the frozen decoder with the DM loss (per-class mean embeddings of
decoded and real images under fresh random networks and siamese DSA). The set
carries the decoded images, the latents (``metadata["latents"]``) and a reference to
the cached generator (``metadata["generator"]``), so anyone holding the generator
(a federated server) can decode the latents again bit for bit on CPU
(:func:`decode_latents`).

The generator is a plain ``nn.Module`` whose ``state_dict`` holds float tensors only,
so a federated strategy can FedAvg it across clients and load the average with
:meth:`CVAE.load_state_dict` before decoding client latents. ``distill(...,
generator_state=...)`` optimizes latents through a *given* generator (the federated
one, ``strategy=fedgen``) instead of training and caching its own; the set then refers
to it by :func:`generator_digest`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.data.base import DatasetInfo, Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import Engine, Progress, init_synthetic, register_engine, resolve_device
from fedistill.engines.experts import data_fingerprint
from fedistill.engines.matching import RealSampler, real_class_means
from fedistill.io import cache_key, cached_tensors
from fedistill.models import build_model, reinitialize
from fedistill.seeding import derive_seed, torch_generator

__all__ = [
    "CVAE",
    "GenConfig",
    "GenEngine",
    "decode_latents",
    "generator_digest",
    "get_generator",
    "new_cvae",
    "train_cvae",
]


class CVAE(nn.Module):
    """Conditional VAE with MLP encoder and decoder; the decoder is the generator.

    Parameters
    ----------
    info
        Image shape and number of classes.
    latent_dim, hidden
        Latent size and hidden units.
    """

    def __init__(self, info: DatasetInfo, *, latent_dim: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.shape, self.num_classes, self.latent_dim = info.shape, info.num_classes, latent_dim
        d = info.channels * info.image_size[0] * info.image_size[1]
        k = info.num_classes
        self.encoder = nn.Sequential(nn.Linear(d + k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_stats = nn.Linear(hidden, 2 * latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d)
        )

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).float()

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, ``[N, latent_dim]`` each."""
        h = self.encoder(torch.cat([x.flatten(1), self._onehot(y)], 1))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` (normalized space) for latents ``z`` and labels ``y``."""
        return self.decoder(torch.cat([z, self._onehot(y)], 1)).view(-1, *self.shape)


def new_cvae(info: DatasetInfo, *, latent_dim: int, hidden: int, seed: int) -> CVAE:
    """A freshly initialized :class:`CVAE` (initialization stream ``gen-init`` of ``seed``)."""
    model = CVAE(info, latent_dim=latent_dim, hidden=hidden)
    return reinitialize(model, derive_seed(seed, "gen-init"))


def generator_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a generator's weights (names, dtypes and bytes, in key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def train_cvae(
    data: Split,
    *,
    latent_dim: int,
    hidden: int,
    epochs: int,
    lr: float,
    beta: float,
    seed: int,
    device: torch.device,
    init_state: Mapping[str, torch.Tensor] | None = None,
) -> CVAE:
    """Train a :class:`CVAE` (MSE reconstruction + ``beta`` * KL) with Adam.

    ``init_state`` starts from given weights (a federated client's local epochs from the
    global generator) instead of a fresh initialization.
    """
    model = new_cvae(data.info, latent_dim=latent_dim, hidden=hidden, seed=seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch_generator(seed, "gen-train")
    x_all, y_all = data.images.to(device), data.labels.to(device)
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=g).to(device)
        for i in range(0, len(perm), 128):
            x, y = x_all[perm[i : i + 128]], y_all[perm[i : i + 128]]
            mu, logvar = model.encode(x, y)
            eps = torch.randn(mu.shape, generator=g).to(device)
            rec = model.decode(mu + eps * (0.5 * logvar).exp(), y)
            kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1).mean()
            loss = F.mse_loss(rec, x, reduction="none").flatten(1).sum(1).mean() + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class GenConfig:
    """Generative engine hyperparameters.

    Attributes
    ----------
    latent_dim, hidden, gen_epochs, gen_lr, beta
        The conditional VAE and its training (Adam, batch 128).
    iterations, lr
        Latent optimization steps (Adam) with the DM loss.
    batch_real
        Real images per class per step.
    model, model_kwargs
        The random embedding networks of the DM loss.
    dsa
        Siamese augmentation on decoded and real images.
    cache_dir
        Artefact cache of the generator (default ``$FEDISTILL_CACHE`` or ``~/.cache/fedistill``).
    min_class_samples, log_every
        As in DM.
    """

    latent_dim: int = 16
    hidden: int = 256
    gen_epochs: int = 60
    gen_lr: float = 1e-3
    beta: float = 1.0
    iterations: int = 200
    lr: float = 0.05
    batch_real: int = 256
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dsa: bool = True
    cache_dir: str | None = None
    min_class_samples: int = 1
    log_every: int = 10


def get_generator(data: Split, config: GenConfig, *, seed: int, device: torch.device) -> tuple[CVAE, dict[str, Any]]:
    """The cached conditional VAE for ``data`` and its reference (cache key and parts)."""
    parts = {
        "dataset": data.info.name,
        "data": data_fingerprint(data),
        "seed": seed,
        "arch": "cvae-mlp",
        "latent_dim": config.latent_dim,
        "hidden": config.hidden,
        "epochs": config.gen_epochs,
        "lr": config.gen_lr,
        "beta": config.beta,
    }
    kw = {k: parts[k] for k in ("latent_dim", "hidden", "epochs", "lr", "beta")}

    def build() -> dict[str, torch.Tensor]:
        return train_cvae(data, seed=seed, device=device, **kw).state_dict()

    state = cached_tensors("generator", build, root=config.cache_dir, **parts)
    model = CVAE(data.info, latent_dim=config.latent_dim, hidden=config.hidden)
    model.load_state_dict(state)
    ref = {"key": cache_key("generator", **parts), **parts, "cache_dir": config.cache_dir}
    return model.to(device).eval().requires_grad_(False), ref


def decode_latents(generator: CVAE, latents: torch.Tensor | list, labels: torch.Tensor) -> torch.Tensor:
    """Decode latent codes (a tensor or the JSON list of ``metadata["latents"]``) on the CPU."""
    z = torch.as_tensor(latents, dtype=torch.float32)
    with torch.no_grad():
        return generator.to("cpu").decode(z, labels.to("cpu")).contiguous()


@register_engine("gen")
class GenEngine(Engine):
    """Latent codes of a class-conditional generator matched with DM (``method=gen``)."""

    name = "gen"
    Config = GenConfig
    accepts = frozenset({"generator_state"})

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        generator_state: Mapping[str, torch.Tensor] | None = None,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`. ``init="real"`` starts from the encoder means of real images.

        ``generator_state`` (a :class:`CVAE` state dict, e.g. the federated generator)
        replaces the cached generator trained on ``data``; ``metadata["generator"]`` then
        holds its :func:`generator_digest`.
        """
        cfg = self.config
        dev = resolve_device(device)
        if generator_state is None:
            generator, ref = get_generator(data, cfg, seed=seed, device=dev)
        else:
            generator = CVAE(data.info, latent_dim=cfg.latent_dim, hidden=cfg.hidden)
            generator.load_state_dict(generator_state)
            generator = generator.to(dev).eval().requires_grad_(False)
            ref = {"digest": generator_digest(generator_state), "latent_dim": cfg.latent_dim, "hidden": cfg.hidden}
        images, labels = init_synthetic(data, ipc, init=init, seed=seed, min_class_samples=cfg.min_class_samples)
        y = labels.to(dev)
        if init == "real":
            z0 = generator.encode(images.to(dev), y)[0]
        else:
            z0 = torch.randn(len(labels), cfg.latent_dim, generator=torch_generator(seed, "gen-latents")).to(dev)
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=cfg.lr)
        classes = labels[::ipc].tolist()
        sampler = RealSampler(data, classes, cfg.batch_real, dev, torch_generator(seed, "gen-real"))
        aug_gen = torch_generator(seed, "gen-dsa")
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        net = build_model(cfg.model, data.info, **cfg.model_kwargs).to(dev).requires_grad_(False)
        syn_groups = torch.arange(len(classes), device=dev).repeat_interleave(ipc)
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        for it in range(cfg.iterations):
            reinitialize(net, derive_seed(seed, "gen-net", it))
            params = dsa.sample(len(classes), aug_gen, image_size=data.info.image_size) if dsa else None
            real = real_class_means(
                net.embed, sampler.sample(), sampler.groups, sampler.counts, dsa=dsa, params=params, chunk=256
            )
            syn = generator.decode(z, y)
            syn = dsa.apply(syn, params, syn_groups) if dsa else syn
            emb = net.embed(syn)
            loss = ((real - emb.view(len(classes), ipc, -1).mean(1)) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % cfg.log_every == 0 or it == cfg.iterations - 1:
                rec = {
                    "iteration": it,
                    "loss": float(loss.detach()) / len(classes),
                    "seconds": time.perf_counter() - start,
                }
                history.append(rec)
                if progress is not None:
                    progress(it + 1, cfg.iterations, rec)
        latents = z.detach().cpu()
        meta = {
            "method": self.name,
            "ipc": ipc,
            "init": init,
            "seed": seed,
            "iterations": cfg.iterations,
            "generator": ref,
            "latents": latents.tolist(),
            "loss_history": history,
        }
        return SyntheticSet(decode_latents(generator, latents, labels), labels, data.info, metadata=meta)
