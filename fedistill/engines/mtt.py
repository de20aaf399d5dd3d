"""Trajectory matching: MTT (Cazenavette et al., CVPR 2022) and TESLA (Cui et al., ICML 2023).

Experts are networks trained on the real data whose parameters are saved after
every epoch (:func:`expert_trajectories`, cached on disk as safetensors, keyed by
the data's fingerprint, architecture, seed and training settings). Each iteration
picks an expert and a random start epoch ``<= max_start_epoch``, starts a student
at the expert's parameters there, takes ``syn_steps`` SGD steps on synthetic
minibatches with a learnable step size, and minimises the normalized distance to
the expert ``expert_epochs`` later::

    ||theta_N - theta*_{t+M}||^2 / ||theta_t - theta*_{t+M}||^2

``mtt`` differentiates through the unrolled steps with autograd (memory grows with
``syn_steps``: every step's activations are kept). ``tesla`` computes *the same
gradient* with memory independent of ``syn_steps`` in activations: a forward pass
without graph that keeps only the parameter vectors, then a reverse (adjoint) pass
that rebuilds one step's graph at a time and propagates the parameter adjoint with
Hessian-vector products. (The public TESLA code drops that Hessian term; this one is
exact, see ``tests/test_mtt.py``.) TESLA also assigns soft labels from an expert.

In a federated client the experts are trained on that client's own data, which
makes these the costly engines there: ``num_experts x expert_epochs_total`` epochs
of real-data training before any distillation (cached per client data afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedistill.augment import DSA, DSAConfig, DSAParams
from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.engines.base import Engine, Progress, StepLog, init_synthetic, register_engine, resolve_device
from fedistill.engines.experts import FlatModel, data_fingerprint, expert_trajectories
from fedistill.engines.loops import classification_loss
from fedistill.engines.teacher import expert_teacher_parts
from fedistill.io import cache_key
from fedistill.models import build_model
from fedistill.seeding import derive_seed, torch_generator

__all__ = [
    "FlatModel",
    "MTTConfig",
    "MTTEngine",
    "StepPlan",
    "TESLAEngine",
    "data_fingerprint",
    "expert_trajectories",
    "plan_steps",
    "tesla_backward",
    "unrolled_loss",
]


@dataclass(frozen=True)
class MTTConfig:
    """Trajectory-matching hyperparameters: CPU defaults for digits (CIFAR-10 IPC 10 reference in ``preset=paper``).

    Attributes
    ----------
    iterations
        Optimisation steps on the synthetic images (the CPU default; ``preset=paper`` for the
        published budgets).
    syn_steps
        Student SGD steps unrolled per iteration.
    expert_epochs
        How many expert epochs ahead the target lies.
    max_start_epoch
        Largest start epoch drawn (clipped to the trajectory length).
    lr_img, lr_lr, momentum
        SGD on the images and on the learnable step size (both with ``momentum``).
    lr_init
        Initial student step size (the experts' lr in the reference).
    lr_floor
        The step size is clamped to at least this after every update (stays positive).
    batch_syn
        Synthetic images per student step (``None``: all).
    num_experts, expert_train_epochs, expert_lr, expert_momentum, expert_batch
        The expert buffer: that many networks trained that long on the real data (batches of
        32 give digits' 1.6k images enough expert steps per epoch).
    model, model_kwargs
        Student and expert architecture (a registered model) and its options.
    dsa
        DSA on the student's synthetic minibatches and the experts' real batches.
    soft_labels, label_temperature
        Train the student on (and return) soft labels ``softmax(expert logits / T)``
        of the initial images from the first expert's final parameters (TESLA).
    cache_dir
        Expert cache (default ``$FEDISTILL_CACHE`` or ``~/.cache/fedistill``).
    min_class_samples, log_every
        As in the other engines.
    """

    iterations: int = 100
    syn_steps: int = 10
    expert_epochs: int = 2
    max_start_epoch: int = 4
    lr_img: float = 100.0
    lr_lr: float = 1e-7
    momentum: float = 0.5
    lr_init: float = 0.01
    lr_floor: float = 1e-5
    batch_syn: int | None = None
    num_experts: int = 3
    expert_train_epochs: int = 10
    expert_lr: float = 0.01
    expert_momentum: float = 0.0
    expert_batch: int = 32
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dsa: bool = True
    soft_labels: bool = False
    label_temperature: float = 1.0
    cache_dir: str | None = None
    min_class_samples: int = 1
    log_every: int = 5


@dataclass
class StepPlan:
    """Minibatch rows and DSA parameters of each unrolled step (shared by MTT and TESLA)."""

    batches: list[torch.Tensor]
    augment: list[DSAParams | None]


def plan_steps(
    n: int, steps: int, batch: int | None, *, dsa: DSA | None, generator: torch.Generator, image_size: tuple[int, int]
) -> StepPlan:
    """Draw ``steps`` minibatches (epochs over a fresh permutation) and per-image DSA parameters."""
    batch = n if batch is None else min(batch, n)
    batches: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        batches.append(perm[pos : pos + batch])
        pos += batch
    augment = [dsa.sample(batch, generator, image_size=image_size) if dsa else None for _ in range(steps)]
    return StepPlan(batches, augment)


def _step_loss(
    model: FlatModel,
    theta: torch.Tensor,
    syn: torch.Tensor,
    targets: torch.Tensor,
    plan: StepPlan,
    k: int,
    dsa: DSA | None,
) -> torch.Tensor:
    idx = plan.batches[k].to(syn.device)
    x = syn[idx]
    params = plan.augment[k]
    if dsa is not None and params is not None:
        x = dsa.apply(x, params)
    return classification_loss(model(theta, x), targets[idx])


def unrolled_loss(
    model: FlatModel,
    syn: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    plan: StepPlan,
    *,
    dsa: DSA | None = None,
) -> torch.Tensor:
    """The normalized trajectory-matching loss with the full unrolled graph (MTT)."""
    theta = start.detach().requires_grad_(True)
    for k in range(len(plan.batches)):
        (grad,) = torch.autograd.grad(_step_loss(model, theta, syn, targets, plan, k, dsa), theta, create_graph=True)
        theta = theta - lr * grad
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


def tesla_backward(
    model: FlatModel,
    syn: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    plan: StepPlan,
    *,
    dsa: DSA | None = None,
) -> torch.Tensor:
    """The loss of :func:`unrolled_loss`; adds its exact gradient to ``.grad`` of the leaves.

    Leaves: ``syn`` and ``lr`` (and ``targets`` when it requires grad). Memory holds
    one step's graph and the ``syn_steps + 1`` parameter vectors, not every step's
    activations.
    """
    step = lr.detach()
    thetas = [start.detach()]
    for k in range(len(plan.batches)):
        theta = thetas[-1].requires_grad_(True)
        (grad,) = torch.autograd.grad(_step_loss(model, theta, syn.detach(), targets.detach(), plan, k, dsa), theta)
        thetas.append((theta - step * grad).detach())
    final = thetas.pop()
    denom = ((start - target) ** 2).sum()
    value = (((final - target) ** 2).sum() / denom).detach()
    adjoint = 2 * (final - target) / denom  # dL/dtheta_N
    leaves = [syn] + ([targets] if targets.requires_grad else [])
    totals = [torch.zeros_like(t) for t in leaves]
    lr_grad = torch.zeros_like(step)
    for k in reversed(range(len(thetas))):
        theta = thetas[k].requires_grad_(True)
        (grad,) = torch.autograd.grad(_step_loss(model, theta, syn, targets, plan, k, dsa), theta, create_graph=True)
        dot = (grad * adjoint).sum()
        hvp, *leaf_grads = torch.autograd.grad(dot, [theta, *leaves])
        # theta_{k+1} = theta_k - lr * g_k(theta_k, X)
        lr_grad -= dot.detach()
        for total, g in zip(totals, leaf_grads, strict=True):
            total -= step * g
        adjoint = adjoint - step * hvp
    for leaf, total in zip([*leaves, lr], [*totals, lr_grad], strict=True):
        leaf.grad = total if leaf.grad is None else leaf.grad + total
    return value


@register_engine("mtt")
class MTTEngine(Engine):
    """Matching training trajectories (``method=mtt``); the costly engine in a federated client."""

    name = "mtt"
    Config = MTTConfig
    accepts = frozenset({"experts"})

    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
        experts: Sequence[torch.Tensor] | None = None,
    ) -> SyntheticSet:
        """See :meth:`Engine.distill`. Trains (or loads) the expert buffer first.

        ``experts`` (``[T, P]`` parameter vectors each, in the student's parameter
        order) replaces the buffer: e.g. the server's recorded global-model
        trajectory in DynaFed, where ``data`` only fixes the classes.
        """
        cfg = self.config
        dev = resolve_device(device)
        teacher = None  # the labeller of soft labels, recorded when the experts come from ``data``
        if experts is None:
            experts = list(expert_trajectories(data, cfg, seed=seed, device=dev).values())
            if cfg.soft_labels:
                parts = expert_teacher_parts(data, cfg, seed=seed)  # the record Teacher.metadata writes
                teacher = {"key": cache_key("teacher", **parts), **parts, "cache_dir": cfg.cache_dir}
        experts = [t.to(dev) for t in experts]
        images, labels = init_synthetic(data, ipc, init=init, seed=seed, min_class_samples=cfg.min_class_samples)
        net = build_model(cfg.model, data.info, seed=derive_seed(seed, "mtt-student"), **cfg.model_kwargs).to(dev)
        model = FlatModel(net)
        syn = images.to(dev).requires_grad_(True)
        soft = None
        if cfg.soft_labels:
            with torch.no_grad():
                soft = F.softmax(model(experts[0][-1], syn) / cfg.label_temperature, dim=1)
        targets = soft if soft is not None else labels.to(dev)
        lr = torch.tensor(cfg.lr_init, device=dev).requires_grad_(True)
        opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum)
        opt_lr = torch.optim.SGD([lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        gen = torch_generator(seed, f"{self.name}-steps")
        dsa = DSA(DSAConfig(flip=data.info.flip)) if cfg.dsa else None
        last_start = max(0, min(cfg.max_start_epoch, len(experts[0]) - 1 - cfg.expert_epochs))
        steps = StepLog(cfg.iterations, every=cfg.log_every, progress=progress)
        for it in range(cfg.iterations):
            e = int(torch.randint(len(experts), (1,), generator=gen))
            s = int(torch.randint(last_start + 1, (1,), generator=gen))
            start, target = experts[e][s], experts[e][min(s + cfg.expert_epochs, len(experts[e]) - 1)]
            plan = plan_steps(
                len(syn), cfg.syn_steps, cfg.batch_syn, dsa=dsa, generator=gen, image_size=data.info.image_size
            )
            opt_img.zero_grad(set_to_none=True)
            opt_lr.zero_grad(set_to_none=True)
            loss = self.match(model, syn, targets, lr, start, target, plan, dsa=dsa)
            opt_img.step()
            opt_lr.step()
            with torch.no_grad():
                lr.clamp_(min=cfg.lr_floor)
            steps.log(it, loss=loss, lr=lr.detach())
        meta = {"method": self.name, "ipc": ipc, "init": init, "seed": seed, "iterations": cfg.iterations}
        meta |= {"syn_lr": float(lr.detach()), "loss_history": steps.history}
        if teacher is not None:  # evaluation relabels the random subset with the same expert
            meta["teacher"] = teacher | {"temperature": cfg.label_temperature}
        soft_out = None if soft is None else soft.detach().cpu().float().contiguous()
        return SyntheticSet(syn.detach().cpu().contiguous(), labels, data.info, soft_out, metadata=meta)

    def match(
        self,
        model: FlatModel,
        syn: torch.Tensor,
        targets: torch.Tensor,
        lr: torch.Tensor,
        start: torch.Tensor,
        target: torch.Tensor,
        plan: StepPlan,
        *,
        dsa: DSA | None,
    ) -> torch.Tensor:
        """One iteration's loss; leaves its gradient in ``syn.grad`` and ``lr.grad``."""
        loss = unrolled_loss(model, syn, targets, lr, start, target, plan, dsa=dsa)
        loss.backward()
        return loss.detach()


@dataclass(frozen=True)
class TESLAConfig(MTTConfig):
    """:class:`MTTConfig` with expert soft labels on (``method=tesla``)."""

    soft_labels: bool = True


@register_engine("tesla")
class TESLAEngine(MTTEngine):
    """MTT's gradient with constant activation memory, plus expert soft labels (``method=tesla``)."""

    name = "tesla"
    Config = TESLAConfig

    def match(
        self,
        model: FlatModel,
        syn: torch.Tensor,
        targets: torch.Tensor,
        lr: torch.Tensor,
        start: torch.Tensor,
        target: torch.Tensor,
        plan: StepPlan,
        *,
        dsa: DSA | None,
    ) -> torch.Tensor:
        """See :meth:`MTTEngine.match`; computed by :func:`tesla_backward`."""
        return tesla_backward(model, syn, targets, lr, start, target, plan, dsa=dsa)
