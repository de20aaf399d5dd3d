"""Engine API shared by every distillation family.

An engine is registered by name (``method=dm``), has a frozen config dataclass, and
turns labelled real data into a :class:`~fedistill.data.SyntheticSet` via
:meth:`Engine.distill`. Engines are pure library code: no Flower, no global RNG
state, deterministic for a seed on CPU, and device-agnostic.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.registry import Registry
from fedistill.seeding import torch_generator

if TYPE_CHECKING:
    from fedistill.checkpoint import Checkpoint
    from fedistill.privacy.accounting import PrivacyLedger

__all__ = [
    "ARRAY_INPUTS",
    "ENGINES",
    "REQUEST_INPUTS",
    "DistillRequest",
    "Engine",
    "NothingToDistillError",
    "Progress",
    "StepLog",
    "build_engine",
    "compiled",
    "init_synthetic",
    "real_branch_dtype",
    "register_engine",
    "resolve_device",
]

Progress = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total, metrics)``, called by engines every few iterations."""

ENGINES: Registry[type[Engine]] = Registry("method")
register_engine = ENGINES.register

#: The optional inputs of a :class:`DistillRequest`; an engine names those it reads in :attr:`Engine.accepts`.
REQUEST_INPUTS = ("base_state", "global_logits", "experts", "generator_state", "ledger", "checkpoint")
#: The request inputs that are one array, which a server may send in a message's ``inputs`` record.
ARRAY_INPUTS = ("global_logits",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillRequest:
    """One distillation: what to condense and how, plus the optional inputs of the engines that read them.

    Attributes
    ----------
    data
        Real labelled images (a dataset's train split or one client's partition).
    ipc
        Images per class.
    init
        ``real``, ``noise`` or ``auto`` (the engine's :attr:`~Engine.default_init`).
    seed
        Drives the engine's random streams (init, network sampling, augmentation).
    device
        ``cpu``, ``cuda`` or ``auto``.
    progress
        Optional callback ``progress(step, total, metrics)``.
    base_state
        A network to match around (the global model a server sent: ``feddm``, ``fedaf``).
    global_logits
        ``[K, K]`` class-wise mean logits of the federation (``fedaf``'s SWD term).
    experts
        Expert trajectories (``[T, P]`` parameter vectors each) replacing the buffer (``mtt``, ``tesla``).
    generator_state
        A generator's state dict replacing the one trained on ``data`` (``gen``).
    ledger
        The data holder's cumulative privacy ledger, continued and charged (the DP engines).
    checkpoint
        Saves the optimisation state and resumes from it (the resumable engines).
    """

    data: Split
    ipc: int
    init: str = "auto"
    seed: int = 0
    device: str | torch.device = "cpu"
    progress: Progress | None = None
    base_state: Mapping[str, torch.Tensor] | None = None
    global_logits: torch.Tensor | None = None
    experts: Sequence[torch.Tensor] | None = None
    generator_state: Mapping[str, torch.Tensor] | None = None
    ledger: PrivacyLedger | None = None
    checkpoint: Checkpoint | None = None

    def inputs(self) -> dict[str, Any]:
        """The optional inputs this request carries (those not ``None``)."""
        return {k: getattr(self, k) for k in REQUEST_INPUTS if getattr(self, k) is not None}


class Engine(ABC):
    """Base class of distillation engines.

    Subclasses set ``Config`` to a frozen dataclass of hyperparameters and
    implement :meth:`distill`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: What ``init="auto"`` means for this engine (DP engines must start from noise).
    default_init: ClassVar[str] = "real"
    #: The optional :class:`DistillRequest` inputs (:data:`REQUEST_INPUTS`) :meth:`distill` takes as
    #: keywords: ``ledger`` marks a differentially private engine, ``checkpoint`` a resumable one.
    accepts: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    def resolve_init(self, init: str) -> str:
        """``auto`` -> this engine's :attr:`default_init`; anything else as given."""
        return self.default_init if init == "auto" else init

    @classmethod
    def takes(cls, name: str) -> bool:
        """Whether :meth:`distill` reads the request input ``name`` (e.g. ``ledger``: a DP engine)."""
        if name not in REQUEST_INPUTS:
            raise ValueError(f"unknown request input {name!r}; valid: {', '.join(REQUEST_INPUTS)}")
        return name in cls.accepts

    def run(self, request: DistillRequest) -> SyntheticSet:
        """Distill as ``request`` says: the one entry point of the CLI, the clients and the server.

        Raises
        ------
        ValueError
            When the request carries an input this engine does not read (the message names
            the input and the engines that read it), before any work.
        """
        inputs = request.inputs()
        for name in sorted(set(inputs) - self.accepts):
            takers = ", ".join(n for n in ENGINES.names() if ENGINES.get(n).takes(name)) or "none"
            raise ValueError(f"method={self.name} does not take {name}; the engines that do: {takers}")
        init = self.resolve_init(request.init)
        return self.distill(
            request.data,
            request.ipc,
            init=init,
            device=request.device,
            progress=request.progress,
            seed=request.seed,
            **inputs,
        )

    @abstractmethod
    def distill(
        self,
        data: Split,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        seed: int = 0,
    ) -> SyntheticSet:
        """Condense ``data`` into ``ipc`` synthetic images per class present in it.

        The parameters are the fields of a :class:`DistillRequest` (there documented); the optional
        inputs an engine lists in :attr:`accepts` come as keywords. Callers use :meth:`run`.
        """


class StepLog:
    """Loss history and progress callbacks of an engine's optimisation loop.

    ``log(it, loss=..., **more)`` records iteration ``it`` every ``every`` iterations and
    at the last one (with the seconds since the log was made) and forwards it to ``progress``.
    Metrics may be (detached) tensors: they are read, a host sync on CUDA, only on the
    iterations that are recorded, so engines need not sync every iteration.
    """

    def __init__(self, total: int, *, every: int, progress: Progress | None) -> None:
        self.total, self.every, self.progress = total, max(1, every), progress
        self.history: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def log(self, it: int, **metrics: float | torch.Tensor) -> None:
        """Record iteration ``it`` (0-based) when due (tensor metrics become floats then)."""
        if it % self.every and it != self.total - 1:
            return
        values = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        rec = {"iteration": it, **values, "seconds": time.perf_counter() - self._t0}
        self.history.append(rec)
        if self.progress is not None:
            self.progress(it + 1, self.total, rec)


def build_engine(name: str, **config: Any) -> Engine:
    """Instantiate the engine registered as ``name`` with config overrides.

    Raises
    ------
    UnknownNameError
        For an unknown engine (the message lists the valid ones).
    TypeError
        For an unknown config key (the message lists the valid keys).
    """
    cls = ENGINES.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(f"method {name!r}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    return cls(cls.Config(**config))


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available; use device=cpu or device=auto")
    return dev


@lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def real_branch_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The dtype of no-grad real-data branches, or ``None`` for fp32.

    Parameters
    ----------
    mode
        ``fp32``, ``bf16`` or ``auto`` (bf16 where the hardware runs it fast:
        CPUs with AVX512-BF16/AMX, CUDA GPUs with native bf16, not emulated as on T4/V100).
    """
    if mode == "fp32":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"unknown real_dtype {mode!r}; valid: auto, bf16, fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    return torch.bfloat16 if _cpu_has_fast_bf16() else None


class NothingToDistillError(ValueError):
    """The data has no class with enough samples (e.g. a tiny non-IID client partition)."""


def init_synthetic(
    data: Split,
    ipc: int,
    *,
    init: str,
    seed: int,
    min_class_samples: int = 1,
    pad_small: bool = True,
    real_per_image: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial synthetic images, class-ordered, ``ipc`` per class present in ``data``.

    Classes with fewer than ``min_class_samples`` real samples get no synthetic
    images. With ``init="real"`` a class with fewer than ``ipc`` samples is topped
    up with noise images (``pad_small=True``), so every present class has exactly
    ``ipc`` rows, or gets ``min(ipc, max(1, n // real_per_image))`` rows
    (``pad_small=False``): every synthetic image then summarizes at least
    ``real_per_image`` real ones where the class has that many, instead of starting as
    (and, its gradient being zero, staying) a verbatim copy.

    Returns
    -------
    images, labels
        ``[R, C, H, W]`` float32 and ``[R]`` int64, ``R = K' * ipc`` when padded.
    """
    if init not in ("real", "noise"):
        raise ValueError(f"unknown init {init!r}; valid: real, noise")
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    g = torch_generator(seed, "synthetic-init")
    counts = data.class_counts()
    classes = [c for c in range(data.info.num_classes) if int(counts[c]) >= max(1, min_class_samples)]
    if not classes:
        raise NothingToDistillError(f"no class has at least {max(1, min_class_samples)} samples; nothing to distill")
    images = torch.randn(len(classes) * ipc, *data.info.shape, generator=g)
    keep = torch.ones(len(images), dtype=torch.bool)
    if init == "real":
        for i, c in enumerate(classes):
            idx = torch.nonzero(data.labels == c).flatten()
            rows = ipc if pad_small else max(1, len(idx) // real_per_image)
            take = idx[torch.randperm(len(idx), generator=g)[: min(ipc, rows)]]
            images[i * ipc : i * ipc + len(take)] = data.images[take]
            if not pad_small:
                keep[i * ipc + len(take) : (i + 1) * ipc] = False
    labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(ipc)
    return images[keep].contiguous(), labels[keep]


def compiled(features: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(features, dynamic=True)``, called on standard-stride inputs of 2+ rows.

    Dynamic shapes make one compilation per process serve every batch size, and Dynamo's
    cache is keyed by the code, not the network instance: a Ray actor that distills many
    clients compiles once. One-row batches run eagerly (Dynamo would specialize them,
    a second compilation for almost no work). Where compilation fails (a device without a
    C++ compiler, an op the backend lacks) it warns once and runs eagerly: a client on an
    edge device finishes its task instead of failing it.
    """
    fast: list[Callable[[torch.Tensor], torch.Tensor]] = [torch.compile(features, dynamic=True)]

    def call(x: torch.Tensor) -> torch.Tensor:
        if len(x) < 2 or not fast:
            return features(x)
        try:  # DSA ops (crop) can return permuted strides, which would trigger a recompilation
            return fast[0](x.clone(memory_format=torch.contiguous_format))
        except Exception as err:  # compilation failed before anything ran: the eager call redoes the work
            reason = f"{type(err).__name__}: {err}"
            warnings.warn(f"torch.compile of the synthetic branch failed ({reason}); running eagerly", stacklevel=2)
            fast.clear()
            return features(x)

    return call
