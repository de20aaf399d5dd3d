"""Privacy accounting with Opacus accountants, cumulative across rounds.

One :class:`PrivacyLedger` per data holder (a client, or the whole training set in a
central run) records every Gaussian release as ``(noise_multiplier, sample_rate,
steps)``. Its epsilon is the composition of *all* releases so far, so a client that
distills in several rounds reports its cumulative budget, not a per-round one. The
ledger is a plain JSON-able dict (:meth:`PrivacyLedger.state_dict`), so it survives in a
node's state, in a server checkpoint and in ``summary.json``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["ACCOUNTANTS", "BudgetExceededError", "PrivacyLedger", "calibrate_noise"]

#: Opacus accountants fedistill supports (``privacy.accountant``).
ACCOUNTANTS = ("rdp", "prv")


class BudgetExceededError(RuntimeError):
    """A release would take a data holder's epsilon past its budget."""


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; valid: {', '.join(ACCOUNTANTS)}")
    return name


def _quiet(fn: Any, /, **kwargs: Any) -> Any:
    # Opacus warns when the optimal RDP order is the largest one tried (a loose but
    # valid bound at tiny sampling rates); the number is still an upper bound.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return fn(**kwargs)


def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier sigma that spends ``(epsilon, delta)`` over ``steps`` releases.

    Uses Opacus' ``get_noise_multiplier`` (binary search on the accountant), so the
    result is exactly what the accountant will later report for the same plan.

    Parameters
    ----------
    epsilon, delta
        Target budget for all ``steps`` releases together.
    sample_rate
        Poisson sampling rate of every release (1 for a release on all records).
    steps
        Planned number of releases (all rounds together).
    accountant
        ``rdp`` (default) or ``prv``.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number (method.epsilon), got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (method.delta), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"the number of planned releases must be >= 1, got {steps}")
    return _calibrated(float(epsilon), float(delta), float(sample_rate), int(steps), _check_accountant(accountant))


# Opacus' RDP at fractional orders and small sampling rates costs ~0.4 s per epsilon and a
# calibration ~5 s on one core; a client reports, checks and re-checks the same plans, and
# clients with equal partition sizes share them. Both are pure functions of their arguments.
@functools.lru_cache(maxsize=1024)
def _calibrated(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier  # lazy: importing Opacus costs ~2 s per process

    return float(
        _quiet(
            get_noise_multiplier,
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(accountant: str, delta: float, history: tuple[tuple[float, float, int], ...]) -> float:
    from opacus.accountants import create_accountant  # lazy: importing Opacus costs ~2 s per process

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(_quiet(acc.get_epsilon, delta=delta))


class PrivacyLedger:
    """Cumulative (epsilon, delta) of one data holder over all its releases.

    Parameters
    ----------
    accountant
        ``rdp`` or ``prv`` (Opacus).
    budget
        The holder's epsilon budget; :meth:`spend` refuses a release that would exceed it.
        ``None`` records without a limit.
    delta
        The delta at which epsilon is reported and the budget is checked.
    """

    def __init__(self, *, accountant: str = "rdp", budget: float | None = None, delta: float = 1e-5) -> None:
        self.accountant_name = _check_accountant(accountant)
        self.budget = None if budget is None else float(budget)
        self.delta = float(delta)
        #: ``[sigma, q, steps]`` per release segment, in order.
        self.history: list[tuple[float, float, int]] = []

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        return _composed_epsilon(self.accountant_name, self.delta, tuple(tuple(h) for h in history))

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before any release)."""
        return self._epsilon(self.history)

    @property
    def releases(self) -> int:
        """Releases recorded so far."""
        return sum(steps for _, _, steps in self.history)

    def _added(self, sigma: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        if sigma <= 0 or not 0 < sample_rate <= 1 or steps < 1:
            raise ValueError(f"invalid release: sigma={sigma}, sample_rate={sample_rate}, steps={steps}")
        hist = list(self.history)
        if hist and hist[-1][0] == sigma and hist[-1][1] == sample_rate:
            hist[-1] = (sigma, sample_rate, hist[-1][2] + steps)  # same segment: compose in one entry
        else:
            hist.append((float(sigma), float(sample_rate), int(steps)))
        return hist

    def epsilon_after(self, *, sigma: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon if ``steps`` more releases with ``(sigma, sample_rate)`` were made."""
        return self._epsilon(self._added(sigma, sample_rate, steps))

    def spend(self, *, sigma: float, sample_rate: float, steps: int = 1) -> float:
        """Record ``steps`` releases, or refuse them when they would exceed the budget.

        Returns
        -------
        float
            Epsilon after the releases.

        Raises
        ------
        BudgetExceededError
            When the budget is set and would be exceeded (nothing is recorded).
        """
        hist = self._added(sigma, sample_rate, steps)
        eps = self._epsilon(hist)
        # 1% slack: calibration is a binary search to Opacus' default tolerance of 0.01.
        if self.budget is not None and eps > self.budget * 1.01:
            raise BudgetExceededError(
                f"release refused: {steps} more release(s) at sigma={sigma:.4g}, q={sample_rate:.4g} would bring "
                f"epsilon from {self.epsilon:.3f} to {eps:.3f}, over the budget of {self.budget:g} "
                f"(delta={self.delta:g}); raise method.epsilon or plan fewer rounds / method.releases"
            )
        self.history = hist
        return eps

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (restore with :meth:`from_state`)."""
        return {
            "accountant": self.accountant_name,
            "budget": self.budget,
            "delta": self.delta,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`state_dict` output."""
        try:
            ledger = cls(accountant=state["accountant"], budget=state.get("budget"), delta=float(state["delta"]))
            ledger.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"malformed privacy ledger state ({type(err).__name__}: {err}); expected keys "
                "accountant, delta, history=[[sigma, q, steps], ...]"
            ) from err
        return ledger
