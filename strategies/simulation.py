"""``fedistill simulate``: Flower's simulation engine on Ray, in-process.

The only module that calls Flower's (deprecated but in-process) ``run_simulation``;
everything else sees a ServerApp and a ClientApp. ``ray.address`` attaches to an
existing Ray cluster (``auto`` or ``HOST:PORT``) instead of starting a local one.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["CLIENT_APP", "backend_config", "load_component", "quiet_logs", "run_simulate", "with_window"]

CLIENT_APP = "clients.simulation:app"
"""The simulation's ClientApp by its component string: the production handlers of
``[tool.flwr.app.components] clientapp`` plus fault injection (``clients/simulation.py``). The server
side loads it by name and never imports the ``clients`` package."""


def load_component(ref: str) -> Any:
    """The object a Flower component string ``"module:attribute"`` names (imported on demand)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def backend_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources and bounded ``ray.init`` arguments.

    ``cfg`` is a composed ``simulate`` config (its ``client`` and ``ray`` groups).
    """
    client, ray_cfg = cfg["client"], cfg["ray"]
    resources = {"num_cpus": float(client["num_cpus"]), "num_gpus": float(client["num_gpus"])}
    init: dict[str, Any] = {
        "logging_level": str(ray_cfg["logging_level"]).upper(),
        "log_to_driver": bool(ray_cfg["log_to_driver"]),
    }
    if ray_cfg["address"]:
        init["address"] = str(ray_cfg["address"])
    else:
        init["num_cpus"] = int(ray_cfg["num_cpus"] or os.cpu_count() or 1)
        if ray_cfg["num_gpus"] is not None:
            init["num_gpus"] = int(ray_cfg["num_gpus"])
        if ray_cfg["object_store_memory"]:
            init["object_store_memory"] = int(ray_cfg["object_store_memory"])
    return {"client_resources": resources, "init_args": init}


class _BelowError(logging.Filter):
    """Drops Flower's records below ERROR (``verbose=false``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_logs(*, verbose: bool) -> logging.Filter:
    """Set Flower's and alembic's loggers for a run; returns the filter to remove from ``flwr`` afterwards.

    Call before Flower is imported: it logs the deprecation of ``run_simulation`` (this module
    is its one caller) and its INFO chatter, and importing it sets up alembic's plugins at INFO
    level under Hydra's root logger; fedistill reports rounds and client failures itself.
    ``verbose=False`` keeps Flower's errors and alembic's warnings; ``verbose=True`` restores
    both at INFO (``run_simulation(verbose_logging=True)`` then adds Flower's DEBUG lines).
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)
    quiet = _BelowError()
    if not verbose:  # run_simulation sets Flower's logger level itself (DEBUG lines at teardown): filter them
        logging.getLogger("flwr").addFilter(quiet)
    return quiet


def with_window(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``max_in_flight`` resolved for the simulation: 4 x the clients Ray runs at once (when null)."""
    if cfg["max_in_flight"] is not None:
        return cfg
    resources = backend_config(cfg)
    cpus = resources["init_args"].get("num_cpus") or os.cpu_count() or 1
    concurrent = max(1, int(cpus // max(resources["client_resources"]["num_cpus"], 1e-9)))
    return {**cfg, "max_in_flight": 4 * concurrent}


def run_simulate(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg["clients"]`` virtual SuperNodes and the configured strategy; returns the summary.

    With ``attack.clean_run`` the same run without attackers (``attack.fraction=0``: same
    seed, defence and recipe) follows in ``out_dir/clean``, and its accuracy (and for a
    backdoor the trigger's success rate on the clean model) is added to the summary's
    ``attack`` as ``clean``.
    """
    from fedistill.checkpoint import resume_config
    from fedistill.tracking import check_installed

    if cfg["resume"]:  # continue an interrupted run with the config it was started with
        cfg = resume_config(cfg["resume"])
    check_installed(cfg)  # tracking=... without its extra fails here, before Ray starts
    summary = _run_once(cfg, out_dir)
    attack = cfg["attack"]
    if attack["kind"] and attack["clean_run"]:
        summary = _clean_twin(cfg, Path(out_dir))
        from fedistill.reporting import run_line

        clean, drop = summary["attack"]["clean"]["accuracy"], summary["attack"]["accuracy_drop"]
        result = f"final accuracy {summary['final_accuracy']:.2f}%; clean twin {clean:.2f}%, drop {drop:.2f} points"
        print(run_line(out_dir, result))  # the main run, after the twin's own last line
    return summary


def _clean_twin(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run (or reuse, when already done) the attack-free twin in ``out_dir/clean``; report it in the summary."""
    from fedistill.reporting import RunDir

    clean_dir = out_dir / "clean"
    done = clean_dir / "summary.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "done":
        clean = json.loads(done.read_text())
    else:
        twin = copy.deepcopy(cfg)
        twin["attack"] = {**twin["attack"], "fraction": 0.0, "clean_run": False}
        twin["resume"] = None
        from omegaconf import OmegaConf

        RunDir(clean_dir).write_config(OmegaConf.to_yaml(twin))
        clean = _run_once(twin, clean_dir)
    run = RunDir(out_dir, resume=True)
    attack = dict(run.summary["attack"])
    attack["clean"] = {"accuracy": clean["final_accuracy"], "run_dir": str(clean_dir)}
    if "attack_success_rate" in (clean.get("attack") or {}):
        attack["clean"]["attack_success_rate"] = clean["attack"]["attack_success_rate"]
    attack["accuracy_drop"] = round(attack["clean"]["accuracy"] - float(attack["accuracy"]), 4)
    return run.update_summary(attack=attack)


def _run_once(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """One simulation: a local Ray (or the configured cluster), the ServerApp and the ClientApp."""
    quiet = quiet_logs(verbose=bool(cfg["verbose"]))  # before Flower is imported
    import ray
    from flwr.simulation import run_simulation

    from strategies.app import make_server_app

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    started_here = not ray.is_initialized()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(
                server_app=make_server_app(with_window(cfg), out_dir),
                client_app=load_component(CLIENT_APP),
                num_supernodes=int(cfg["clients"]),
                backend_config=backend_config(cfg),
                verbose_logging=bool(cfg["verbose"]),
            )
    finally:
        logging.getLogger("flwr").removeFilter(quiet)
        if started_here and ray.is_initialized():
            ray.shutdown()
    return json.loads((Path(out_dir) / "summary.json").read_text())
