"""The ClientApp that ``fedistill simulate`` runs: the production handlers plus fault injection.

Deployments run ``clients.app:app``, which has no fault code at all; the simulation wraps the same
handlers in :func:`clients.faults.fault_mod` so that tests and robustness studies can plan
misbehaving clients (the ``faults`` config group).
"""

from __future__ import annotations

from clients.app import client_app
from clients.faults import fault_mod

__all__ = ["app"]

app = client_app(mods=[fault_mod])
