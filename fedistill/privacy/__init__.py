"""Differential privacy for distillation: mechanisms, Opacus accounting, the membership audit.

Engines never add noise themselves: they call :class:`PrivateRelease`, which calibrates
the noise multiplier, reserves the releases in the data holder's :class:`PrivacyLedger`
and returns clipped, noised per-class sums.
"""

from fedistill.privacy.accounting import ACCOUNTANTS, BudgetExceededError, PrivacyLedger, calibrate_noise
from fedistill.privacy.config import PUBLIC_SIDE_CHANNELS, PrivacyConfig, PrivateRelease, check_private_setup
from fedistill.privacy.mechanisms import clip_rows, noisy_group_sums, poisson_indices
from fedistill.privacy.report import ClientLedgers, privacy_line, privacy_summary

__all__ = [
    "ACCOUNTANTS",
    "PUBLIC_SIDE_CHANNELS",
    "BudgetExceededError",
    "ClientLedgers",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivateRelease",
    "calibrate_noise",
    "check_private_setup",
    "clip_rows",
    "noisy_group_sums",
    "poisson_indices",
    "privacy_line",
    "privacy_summary",
]
