"""Helpers for running fedistill on real Flower infrastructure (docs/deploy.md).

Nothing here imports Flower: :mod:`~fedistill.deploy.certs` writes TLS certificates
and SuperNode keys, :mod:`~fedistill.deploy.nodedata` writes a node's ``data-path``,
:mod:`~fedistill.deploy.runconfig` maps the Flower run config to Hydra overrides and
:mod:`~fedistill.deploy.commands` is ``fedistill deploy``.
"""

from fedistill.deploy.runconfig import DEPLOY_KEYS, NODE_DATA, hydra_overrides

__all__ = ["DEPLOY_KEYS", "NODE_DATA", "hydra_overrides"]
