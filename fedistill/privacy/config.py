"""Privacy options shared by the DP engines, and the step they call to release real statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedistill.privacy.accounting import PrivacyLedger, calibrate_noise
from fedistill.privacy.mechanisms import add_group_noise, clipped_group_sums, noisy_group_sums

__all__ = ["PUBLIC_SIDE_CHANNELS", "PrivacyConfig", "PrivateRelease", "check_private_setup"]

#: What a DP engine's output reveals beyond the accounted releases (listed in every summary).
PUBLIC_SIDE_CHANNELS = (
    "class_counts: the number of real records per class (the noisy sums are divided by the expected sample size)",
    "classes_present: which classes have enough records to be distilled",
)


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level (epsilon, delta)-DP options of a DP engine (fields of its config).

    Attributes
    ----------
    epsilon
        The data holder's total budget over all planned releases (every round); the
        noise multiplier is calibrated from it with Opacus. ``None``: use ``sigma``.
    delta
        Target delta (choose well below 1 / number of records).
    sigma
        An explicit noise multiplier (overrides ``epsilon`` calibration; the spent
        epsilon is still accounted and reported).
    clip
        L2 bound of every record's contribution (embedding or gradient).
    sample_rate
        Poisson sampling rate per release; ``None``: ``batch_real`` over the largest class.
    accountant
        Opacus accountant: ``rdp`` or ``prv``.
    releases
        Distinct noisy releases per distillation; ``None``: one per optimisation step.
        Fewer releases reused cyclically cost less budget (reuse is post-processing).
    planned_rounds
        Rounds the holder will release in; ``None``: the run's ``rounds`` in
        ``fedistill simulate``, 1 in ``fedistill central``. Calibration spreads
        ``epsilon`` over all of them.
    """

    epsilon: float | None = 10.0
    delta: float = 1e-5
    sigma: float | None = None
    clip: float = 1.0
    sample_rate: float | None = None
    accountant: str = "rdp"
    releases: int | None = None
    planned_rounds: int | None = None

    def privacy_options(self) -> dict[str, Any]:
        """Just the privacy fields (for metadata and summaries)."""
        names = {f.name for f in dataclasses.fields(PrivacyConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}


def check_private_setup(*, init: str, net: nn.Module, engine: str) -> None:
    """Refuse configurations that break the DP guarantee, saying why.

    Raises
    ------
    ValueError
        For ``init="real"`` (real images would be released verbatim as the start of the
        synthetic set) and for BatchNorm layers (batch statistics mix records, so a
        record's influence is not bounded by the per-sample clip).
    """
    if init != "noise":
        raise ValueError(
            f"method={engine} is differentially private and needs init=noise: init={init} would start the "
            "synthetic set from real images and release them verbatim"
        )
    bn = [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(
            f"method={engine} cannot use BatchNorm (layers {bn[:3]}): batch statistics mix records, so one "
            "record's influence is not bounded by the clip; use model.norm=instance (the default) or none"
        )


class PrivateRelease:
    """The privacy step a DP engine calls: calibrated, accounted noisy per-class sums.

    On construction it fixes the noise multiplier (from ``epsilon`` for
    ``releases * planned_rounds`` releases, or ``sigma``) and *reserves* this
    distillation's ``releases`` in ``ledger``, so a holder over budget refuses before any
    work. :meth:`sums` then releases clipped, noised per-class sums.

    Parameters
    ----------
    config
        The engine's privacy options.
    ledger
        The holder's cumulative ledger (a fresh one with ``config.epsilon`` as budget when ``None``).
    releases
        Releases this distillation makes.
    sample_rate
        Poisson rate of every release.
    generator
        Drives the noise.
    noise_share
        Distributed DP under secure aggregation: this holder adds noise of std
        ``noise_share * sigma * clip`` so that the *sum* of at least ``1 / noise_share^2``
        holders' releases carries the full ``sigma * clip`` (the ledger accounts ``sigma``:
        the guarantee holds against a server that sees only that sum). ``1``: local DP.
    """

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        ledger: PrivacyLedger | None,
        releases: int,
        sample_rate: float,
        generator: torch.Generator,
        noise_share: float = 1.0,
    ) -> None:
        if not 0 < noise_share <= 1:
            raise ValueError(f"noise_share={noise_share}: must be in (0, 1]")
        self.config = config
        self.noise_share = noise_share
        if config.sigma is not None:
            sigma = float(config.sigma)
        elif config.epsilon is not None:
            planned = releases * max(1, int(config.planned_rounds or 1))
            sigma = calibrate_noise(
                epsilon=config.epsilon,
                delta=config.delta,
                sample_rate=sample_rate,
                steps=planned,
                accountant=config.accountant,
            )
        else:
            raise ValueError(
                "a DP engine needs method.epsilon (a budget) or method.sigma (a noise multiplier); both are null"
            )
        if ledger is None:
            ledger = PrivacyLedger(accountant=config.accountant, budget=config.epsilon, delta=config.delta)
        self.ledger, self.sigma, self.sample_rate, self.releases = ledger, sigma, sample_rate, releases
        self.epsilon = ledger.spend(sigma=sigma, sample_rate=sample_rate, steps=releases)
        self.generator = generator

    def sums(self, rows: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Clipped per-group sums of ``rows`` plus ``N(0, sigma^2 clip^2)`` noise (one reserved release)."""
        return noisy_group_sums(
            rows, groups, num_groups, clip=self.config.clip, sigma=self.local_sigma, generator=self.generator
        )

    @property
    def local_sigma(self) -> float:
        """The noise multiplier this holder adds itself (``sigma``, times ``noise_share`` under secure aggregation)."""
        return self.sigma * self.noise_share

    def clipped_sums(
        self, rows: torch.Tensor, groups: torch.Tensor, num_groups: int, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Clipped per-group sums of ``rows`` without noise, added into ``out`` (rows may come in chunks).

        Release the finished sums with :meth:`noised`; nothing is private before that.
        """
        return clipped_group_sums(rows, groups, num_groups, clip=self.config.clip, out=out)

    def noised(self, sums: torch.Tensor) -> torch.Tensor:
        """One reserved release of sums from :meth:`clipped_sums` (e.g. accumulated chunk by chunk).

        Draws the same noise as :meth:`sums` would on the same rows.
        """
        return add_group_noise(sums, clip=self.config.clip, sigma=self.local_sigma, generator=self.generator)

    def report(self) -> dict[str, Any]:
        """What the synthetic set's metadata records about the guarantee."""
        return {
            **self.config.privacy_options(),
            "sigma": self.sigma,
            "noise_share": self.noise_share,
            "sample_rate": self.sample_rate,
            "releases": self.releases,
            "epsilon_spent": self.ledger.epsilon,
            "ledger": self.ledger.state_dict(),
            "public": list(PUBLIC_SIDE_CHANNELS),
        }
