"""Privacy summaries for ``summary.json``: one holder (central) or every client (federated)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from fedistill.privacy.accounting import PrivacyLedger

__all__ = ["AUDITED", "ClientLedgers", "audit_line", "audit_table", "privacy_line", "privacy_summary"]

_KEYS = ("epsilon_spent", "delta", "sigma", "sample_rate", "releases", "accountant", "clip", "epsilon", "public")


def privacy_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary fields of a DP engine's ``metadata["privacy"]`` (target ``epsilon``, spent, noise, public)."""
    out = {k: report[k] for k in _KEYS if k in report}
    out["target_epsilon"] = out.pop("epsilon", None)
    return out


class ClientLedgers:
    """The server's mirror of every client's cumulative ledger (from the clients' replies).

    It is sent back in each client's task, so a node that lost its state continues
    from what it already spent; :meth:`state_dict` goes into checkpoints.
    """

    def __init__(self) -> None:
        self.ledgers: dict[str, dict[str, Any]] = {}
        self.public: list[str] = []

    def record(self, client: str, report: Mapping[str, Any]) -> float:
        """Store a client's ledger from its set's privacy metadata; returns its cumulative epsilon."""
        ledger = PrivacyLedger.from_state(report["ledger"])
        previous = self.ledgers.get(client)
        if previous is not None and PrivacyLedger.from_state(previous).releases > ledger.releases:
            raise ValueError(f"client {client} reported a ledger with fewer releases than it had already spent")
        self.ledgers[client] = ledger.state_dict()
        self.public = list(report.get("public", self.public))
        return ledger.epsilon

    def epsilons(self) -> dict[str, float]:
        """Cumulative epsilon of every client seen so far."""
        return {c: PrivacyLedger.from_state(s).epsilon for c, s in self.ledgers.items()}

    def summary(self) -> dict[str, Any]:
        """``epsilon_max``, ``epsilon_median``, ``delta``, per-client epsilons and the public side channels."""
        eps = self.epsilons()
        if not eps:
            return {}
        delta = next(iter(self.ledgers.values()))["delta"]
        return {
            "epsilon_max": max(eps.values()),
            "epsilon_median": statistics.median(eps.values()),
            "delta": delta,
            "clients": {c: round(e, 6) for c, e in eps.items()},
            "public": self.public,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able snapshot."""
        return {"ledgers": dict(self.ledgers), "public": list(self.public)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.ledgers = dict(state.get("ledgers", {}))
        self.public = list(state.get("public", []))


#: what an audit attacks (its result's keys) and how tables name them
AUDITED = (("synthetic", "synthetic set"), ("matched_real_subset", "real subset (matched acc)"))


def audit_table(result: Mapping[str, Any]) -> Any:
    """A rich table of an audit: accuracy, AUC and TPR at low FPR per audited model and attack."""
    from rich.table import Table

    title = f"membership audit: {result.get('method')}"
    if "privacy" in result:
        p = result["privacy"]
        eps = p.get("epsilon_spent", p.get("epsilon_max"))
        title += f" (epsilon {eps:.2f}, delta {p.get('delta'):g})"
    table = Table(title=title)
    for col in ("trained on", "images", "test acc %", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"):
        table.add_column(col)
    for key, name in AUDITED:
        if key not in result:
            continue
        r = result[key]
        for attack in ("loss_attack", "lira"):
            a = r[attack]
            table.add_row(
                name,
                str(r["train_images"]),
                f"{r['test_accuracy']:.2f}",
                attack.replace("_attack", ""),
                f"{a['auc']:.3f}",
                f"{a['tpr_at_1pct_fpr']:.3f}",
                f"{a['tpr_at_0.1pct_fpr']:.3f}",
            )
    return table


def audit_line(result: Mapping[str, Any]) -> str:
    """An audit's headline: the attacks' AUC per audited model (``synthetic set: loss AUC 0.514, LiRA AUC 0.600``)."""
    parts = [
        f"{name}: loss AUC {result[key]['loss_attack']['auc']:.3f}, LiRA AUC {result[key]['lira']['auc']:.3f}"
        for key, name in AUDITED
        if key in result
    ]
    return "; ".join(parts)


def privacy_line(privacy: Mapping[str, Any] | None) -> str:
    """One line for the terminal: the epsilon actually spent (central, per client, or FedAvg's)."""
    if not privacy:
        return "privacy: none (no DP engine or DP strategy in this run)"
    delta = privacy.get("delta")
    if "epsilon_max" in privacy:
        return (
            f"privacy: per-client epsilon max {privacy['epsilon_max']:.3f}, median {privacy['epsilon_median']:.3f} "
            f"(delta {delta:g}, record-level, cumulative over rounds)"
        )
    if "epsilon_spent" in privacy:
        return (
            f"privacy: epsilon {privacy['epsilon_spent']:.3f} of {privacy.get('target_epsilon')} "
            f"(delta {delta:g}, sigma {privacy['sigma']:.3f}, {privacy['releases']} releases, record-level)"
        )
    if "epsilon" in privacy:
        return f"privacy: epsilon {privacy['epsilon']:.3f} (delta {delta:g}, {privacy.get('level', '')})"
    return "privacy: no DP; released without noise: " + "; ".join(p.split(":")[0] for p in privacy.get("public", []))
