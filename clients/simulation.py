"""The ClientApp that ``fedistill simulate`` runs: the production handlers plus fault and attack injection.

Deployments run ``clients.app:app``, which has no fault or attack code at all; the simulation reads the
node's data through :func:`clients.attacks.attacked_data` and wraps the same handlers in
:func:`clients.faults.fault_mod` (outer: a fault acts on what an attack produced) and
:func:`clients.attacks.attack_mod`, so that tests and robustness studies can plan misbehaving and
hostile clients (the ``faults`` and ``attack`` config groups).
"""

from __future__ import annotations

from clients.app import client_app
from clients.attacks import attack_mod, attacked_data
from clients.faults import fault_mod

__all__ = ["app"]

app = client_app(mods=[fault_mod, attack_mod], load=attacked_data)
