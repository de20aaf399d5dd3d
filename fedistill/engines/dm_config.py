"""The options of distribution matching (:class:`DMConfig`), shared by every DM-family engine
(``dm``, ``dm_hom``, ``feddm``, ``fedaf``, ``dp_dm``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DMConfig"]


@dataclass(frozen=True)
class DMConfig:
    """DM hyperparameters (reference: lr 1, momentum 0.5, 256 real per class, 20k iterations).

    Attributes
    ----------
    iterations
        Optimisation steps on the synthetic images (a fresh network each). The default is the
        CPU budget; the reference's 20,000 are ``preset=paper``.
    lr_img, momentum
        SGD on the synthetic images.
    batch_real
        Real images sampled per class per iteration.
    model, model_kwargs
        The embedding network (a registered model) and its options.
    dsa
        Siamese augmentation on both branches.
    dsa_groups
        ``class``: one random transform per class, shared by its real and synthetic
        images; ``sample`` (as the reference code): every real image gets its own
        transform and synthetic image ``j`` of a class shares real image ``j``'s.
        Fashion-MNIST IPC 10 (width 32, 500 iterations): 79.7 (class) vs 78.9 (sample).
    dsa_op_per_group
        Every DSA group draws its own op (the reference code picks one per class);
        otherwise one op per iteration for all classes. FMNIST anchor: 79.60 vs 79.66.
    real_dtype
        ``auto`` | ``bf16`` | ``fp32`` for the no-grad real branch.
    real_chunk
        Real images per forward pass of the no-grad branch (exact; smaller is
        faster on CPU caches).
    compile
        ``torch.compile`` the no-grad real branch (static shapes): a one-off cost of
        10-20 s (less with a warm inductor cache) that makes each iteration about
        1.7x faster at width 32 and 10x faster at width 128 in bf16 on CPU.
        ``auto`` compiles on CPU when ``iterations >= compile_min_iterations``.
    compile_synthetic
        ``torch.compile`` the synthetic branch (forward and backward) with dynamic
        shapes: compiled once per process (5-20 s; Dynamo's cache is keyed by the code,
        not the network or the batch size), so a Ray actor that distills many clients
        pays it once. About 1.5x faster per iteration at width 32 on CPU; gradients
        agree with eager execution to ~1e-6. ``auto``: on CPU, for runs of at least
        ``compile_min_iterations`` on images of at least ``compile_min_pixels``.
    compile_min_iterations
        Threshold of ``compile="auto"`` and ``compile_synthetic="auto"``.
    compile_min_pixels
        Image area below which ``compile_synthetic="auto"`` stays eager: on 8x8 digits
        an iteration costs ~1 ms and the compilation is never repaid (central DM, digits
        IPC 10: 36 s of distillation compiled vs 16 s eager); a Fashion-MNIST client
        distills ~1.5x faster compiled.
    min_class_samples
        Classes with fewer real samples are not distilled.
    pad_small_classes
        With ``init=real``, a class with fewer than ``2 * ipc`` real samples is padded
        with noise images up to ``ipc`` (``True``) or gets ``max(1, n // 2)`` synthetic
        images (``False``, the default): a noise image matched to a few samples' mean
        adds label noise, and a class with no more real than synthetic images would be
        sent as verbatim copies. This matters on small non-IID client partitions.
    real_per_image
        With ``pad_small_classes=False``, a class of ``n`` real samples gets
        ``min(ipc, max(1, n // real_per_image))`` synthetic images: each summarizes at
        least this many real ones. Raising it on 100 Fashion-MNIST clients made smaller
        unions that lost more to the random subset
        (``benchmarks/results/oneshot_margin_fmnist-2026-12-02.md``), hence 2.
    equal_image_steps
        A class's term of the loss is weighted by its rows / ``ipc``, so every synthetic
        image takes the step it would take in a class of ``ipc`` rows (DM's gradient on an
        image is divided by its class's rows, so an unpadded 1-3-row class on a client
        steps 3-10x further and drifts off the data's range). It removes those off-range
        images but left accuracy unchanged on 3 seeds (same results file), hence off. No
        effect where every class has ``ipc`` rows (``fedistill central``).
    releases
        ``None``: a fresh network, augmentation and real batch every iteration (the
        reference). A number below ``iterations``: that many such *releases* are drawn
        (each from its own seeded stream), their real-branch class statistics computed
        once, and the iterations cycle through them; the synthetic branch still runs
        every iteration. The real branch then costs ``releases`` passes instead of
        ``iterations``: the lever that makes hundreds of federated clients cheap (as
        ``dp_dm``'s releases, without the noise).
    log_every
        Report the loss every this many iterations.
    """

    iterations: int = 300
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dsa: bool = True
    dsa_groups: str = "class"
    dsa_op_per_group: bool = False
    real_dtype: str = "auto"
    real_chunk: int = 128
    compile: bool | str = "auto"
    compile_synthetic: bool | str = "auto"
    compile_min_iterations: int = 200
    compile_min_pixels: int = 256
    min_class_samples: int = 1
    pad_small_classes: bool = False
    real_per_image: int = 2
    equal_image_steps: bool = False
    releases: int | None = None
    log_every: int = 10
