"""``fedistill simulate``: Flower's simulation engine on Ray, in-process.

The only module that calls Flower's (deprecated but in-process) ``run_simulation``;
everything else sees a ServerApp and a ClientApp. ``ray.address`` attaches to an
existing Ray cluster (``auto`` or ``HOST:PORT``) instead of starting a local one.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["backend_config", "run_simulate"]


def backend_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources and bounded ``ray.init`` arguments."""
    client = cfg.get("client", {})
    ray_cfg = cfg.get("ray", {})
    resources = {"num_cpus": float(client.get("num_cpus", 1)), "num_gpus": float(client.get("num_gpus", 0.0))}
    init: dict[str, Any] = {
        "logging_level": str(ray_cfg.get("logging_level", "WARNING")).upper(),
        "log_to_driver": bool(ray_cfg.get("log_to_driver", False)),
    }
    if ray_cfg.get("address"):
        init["address"] = str(ray_cfg["address"])
    else:
        init["num_cpus"] = int(ray_cfg.get("num_cpus") or os.cpu_count() or 1)
        if ray_cfg.get("num_gpus") is not None:
            init["num_gpus"] = int(ray_cfg["num_gpus"])
        if ray_cfg.get("object_store_memory"):
            init["object_store_memory"] = int(ray_cfg["object_store_memory"])
    return {"client_resources": resources, "init_args": init}


def run_simulate(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg["clients"]`` virtual SuperNodes and the configured strategy; returns the summary."""
    import ray
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedistill.checkpoint import resume_config
    from strategies.app import make_server_app

    # Flower logs the deprecation of run_simulation (this module is its one caller) and its
    # INFO chatter; fedistill reports rounds and client failures itself.
    logging.getLogger("flwr").setLevel(logging.INFO if cfg.get("verbose") else logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if cfg.get("resume"):  # continue an interrupted run with the config it was started with
        cfg = resume_config(cfg["resume"])
    started_here = not ray.is_initialized()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(
                server_app=make_server_app(cfg, out_dir),
                client_app=client_app,
                num_supernodes=int(cfg["clients"]),
                backend_config=backend_config(cfg),
                verbose_logging=bool(cfg.get("verbose", False)),
            )
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    return json.loads((Path(out_dir) / "summary.json").read_text())
