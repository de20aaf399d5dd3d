"""The fedistill ServerApp: one entry point for simulation and deployment.

``make_server_app(cfg, out_dir)`` builds a ServerApp around a resolved config (what
``fedistill simulate`` does); the module-level ``app`` composes the config from the
Flower run config (``flwr run . CONNECTION --run-config 'strategy="feddm" clients=10'``),
whose keys are Hydra overrides of the ``simulate`` config plus ``run-dir`` and
``node-data`` (:mod:`fedistill.deploy.runconfig`; docs/deploy.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedistill.checkpoint import CheckpointError
from fedistill.privacy import privacy_line
from fedistill.reporting import RunDir, run_line
from strategies import dp_stats, dynafed, fedaf, fedavg, feddm, fedgen, oneshot  # noqa: F401  (registration)
from strategies.base import STRATEGIES
from strategies.rundata import data_summary, open_run

__all__ = ["app", "data_summary", "make_server_app", "serve"]


def serve(grid: Grid, cfg: dict[str, Any], out_dir: str | Path, *, node_data: str = "partition") -> dict[str, Any]:
    """Run the configured strategy on ``grid``; writes the run directory; returns the summary.

    ``node_data="own"`` (a deployment: nodes hold their own data) skips the plot of the
    simulated partition, which no node uses then, and records none (:func:`data_summary`).
    """
    resume = bool(cfg["resume"])
    run = RunDir(out_dir, resume=resume)
    if resume and run.summary.get("status") == "done":
        raise CheckpointError(f"{out_dir} already finished (summary.json status: done); nothing to resume")
    with run.track(cfg):  # the tracker (tracking=...) gets the summary and artefacts however the run ends
        return _serve(grid, cfg, run, node_data)


def _serve(grid: Grid, cfg: dict[str, Any], run: RunDir, node_data: str) -> dict[str, Any]:
    resume = bool(cfg["resume"])
    bundle = open_run(cfg, run, node_data=node_data)
    strategy = STRATEGIES.get(cfg["strategy"]["name"])(cfg, run, bundle)
    summary = strategy.run_rounds(grid, resume=resume)
    summary = run.summary
    _print_table(summary, strategy.history)
    for warning in summary.get("warnings", []):
        print(f"fedistill: warning: {warning}")
    print(run_line(run.path, f"final accuracy {summary['final_accuracy']:.2f}%"))
    return summary


def make_server_app(cfg: dict[str, Any], out_dir: str | Path) -> ServerApp:
    """A ServerApp that runs :func:`serve` with this config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, out_dir)

    return server


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    from omegaconf import OmegaConf

    from fedistill.config import compose_config, validate_config
    from fedistill.deploy import NODE_DATA, hydra_overrides

    rc = context.run_config
    node_data = str(rc.get("node-data") or "partition")
    if node_data not in NODE_DATA:
        raise ValueError(f"run config node-data={node_data!r}: choose one of {list(NODE_DATA)}")
    cfg = compose_config("simulate", hydra_overrides(rc))
    validate_config("simulate", cfg)  # ConfigError: one line naming the run-config key, the value and the fix
    out = rc.get("run-dir") or f"outputs/flwr/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    RunDir(out).write_config(OmegaConf.to_yaml(cfg))
    serve(grid, cfg, str(out), node_data=node_data)


def _print_table(summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{summary['strategy']} ({summary['method']}) on {summary['dataset']}, {summary['clients']} clients"
    )
    for col in ("round", "accuracy %", "clients ok/sampled", "uplink MB (cum.)", "seconds"):
        t.add_column(col)
    for h in history:
        ok = f"{h['clients_succeeded']}/{h['clients_sampled']}"
        t.add_row(
            str(h["round"]), f"{h['accuracy']:.2f}", ok, f"{h['bytes_up_total'] / 1e6:.3f}", f"{h['seconds']:.1f}"
        )
    base = (summary.get("baselines") or {}).get("random_subset")
    if base:
        t.caption = f"random real subset of {base['images']} images, same server recipe: {base['accuracy']:.2f}%"
    Console().print(t)
    if "privacy" in summary:
        print(privacy_line(summary["privacy"]))
