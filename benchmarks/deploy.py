"""Deployment benchmark: a real SuperLink and N SuperNodes over loopback vs. the same run in simulation.

Each deployment point starts ``flower-superlink`` (insecure, loopback) and N
``flower-supernode`` processes with ``threads=1`` and a ``max-memory-mb`` cap, each
holding one ~600-image IID partition of the dataset (``fedistill deploy node-data``
with ``clients=PARTS``: the first N partitions), submits a ``oneshot`` DM run with
``flwr run`` and reads the result from ``flwr list`` and the run directory:

- round wall seconds (the server's round record: send, all clients, merge, train, evaluate),
- per client: distillation seconds and the peak RSS of its ClientApp process (the edge
  footprint; both reported by the client itself in its reply),
- Flower's compute time (ServerApp and ClientApp process seconds).

The simulation point runs ``fedistill simulate`` with ``clients=PARTS`` and
``strategy.fraction=N/PARTS``: N sampled virtual clients of the same partition size.

    python benchmarks/deploy.py --nodes 1,3,8 --simulate 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import append_row, machine_info, results_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedistill.cli import compose_config  # noqa: E402
from fedistill.deploy.loopback import Loopback  # noqa: E402
from fedistill.deploy.nodedata import write_partitions  # noqa: E402


def _round(run_dir: Path) -> dict:
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "round")


def _row(mode: str, n: int, rec: dict, summary: dict, elapsed: float, compute: dict | None) -> str:
    cm = [m for m in rec.get("client_metrics", {}).values() if "seconds" in m]
    secs = [m["seconds"] for m in cm]
    rss = [m.get("peak_rss_mb", float("nan")) for m in cm]
    cpu = [m["cpu_seconds"] for m in cm if "cpu_seconds" in m]
    client_s = f"{sum(secs) / len(secs):.1f} / {max(secs):.1f}" if secs else "-"
    peak = f"{max(rss):.0f}" if rss else "-"
    cpu_s = f"{sum(cpu) / len(cpu):.1f}" if cpu else "-"
    proc = "-"
    if compute:
        proc = f"{compute['serverapp-seconds']:.0f} / {compute['clientapp-seconds']:.0f}"
    return (
        f"| {mode} | {n} | {rec['clients_succeeded']}/{rec['clients_sampled']} | {rec['seconds']:.1f} | {elapsed:.0f} "
        f"| {client_s} | {cpu_s} | {peak} | {proc} | {summary.get('final_accuracy', float('nan')):.2f} "
        f"| {rec['bytes_up'] / 1e6:.3f} |"
    )


def deploy_point(n: int, args: argparse.Namespace, work: Path) -> str:
    cfg = compose_config("simulate", [f"dataset={args.dataset}", f"clients={args.parts}", "partition=iid", "seed=0"])
    paths = write_partitions(work / "data", cfg, nodes=range(n))
    run_dir = work / f"run-deploy-{n}"
    with Loopback(work / f"fed-{n}", env={"OMP_NUM_THREADS": "1"}) as lb:
        lb.start_superlink()
        for i, p in enumerate(paths):
            lb.start_supernode(f"node{i}", {"data-path": str(p), "threads": 1, "max-memory-mb": args.max_memory_mb})
        t0 = time.perf_counter()
        run_id = lb.submit(REPO, {**_run_config(args, n), "run-dir": str(run_dir)})
        st = lb.wait_run(run_id, timeout=3600, poll=2.0)
        elapsed = time.perf_counter() - t0
        if st["status"] != "finished:completed":
            return f"| deployment | {n} | run {st['status']}: {st.get('status-details')} |"
    summary = json.loads((run_dir / "summary.json").read_text())
    return _row("deployment", n, _round(run_dir), summary, elapsed, st.get("compute-time"))


def _run_config(args: argparse.Namespace, n: int) -> dict:
    return {
        "dataset": args.dataset,
        "clients": n,
        "ipc": args.ipc,
        "strategy.server.epochs": args.server_epochs,
        "strategy.random_baseline": False,
        "device": "cpu",
    }


def simulate_point(n: int, args: argparse.Namespace, work: Path) -> str:
    run_dir = work / f"run-sim-{n}"
    cmd = [sys.executable, "-m", "fedistill.cli", "simulate", f"dataset={args.dataset}", f"clients={args.parts}"]
    cmd += ["partition=iid", f"strategy.fraction={n / args.parts}", f"ipc={args.ipc}", "device=cpu"]
    cmd += [f"strategy.server.epochs={args.server_epochs}", "strategy.random_baseline=false"]
    cmd += ["ray.num_cpus=2", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        return f"| simulation | {n} | failed ({res.returncode}): {res.stderr[-300:]} |"
    summary = json.loads((run_dir / "summary.json").read_text())
    return _row("simulation", n, _round(run_dir), summary, elapsed, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--parts", type=int, default=90, help="partitions of the training set (90: ~600 FMNIST images)")
    p.add_argument("--nodes", default="1,3,8", help="SuperNode counts of the deployment points")
    p.add_argument("--simulate", default="3", help="client counts of the simulation points ('' for none)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--server-epochs", type=int, default=100)
    p.add_argument("--max-memory-mb", type=int, default=1536)
    p.add_argument("--out", default="deploy_fmnist")
    p.add_argument("--append", action="store_true", help="add rows to an existing results file of today")
    args = p.parse_args()
    out = results_path(args.out)
    header = [
        f"# Deployment benchmark ({args.dataset}, oneshot DM, IPC {args.ipc}, ConvNet width 32)",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `python benchmarks/deploy.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Nodes hold one IID partition of {args.parts} (~{54000 // args.parts} images for FMNIST); SuperNodes run "
        f"with `threads=1 max-memory-mb={args.max_memory_mb}` over loopback (insecure). Client s: distillation seconds "
        "reported by each client (mean / max); client process CPU s: user+system CPU seconds of the ClientApp "
        "process that distilled (imports, data load, distillation; unaffected by other load); "
        "peak RSS: the ClientApp process's ru_maxrss (max over clients; for "
        "simulation the Ray worker's, which also holds the full dataset). Flower process s: ServerApp / sum of "
        "ClientApp process seconds from `flwr list` (each message is one ClientApp process: Python start, imports, "
        f"data load). Server: {args.server_epochs} epochs on the merged set.",
        "",
        "| mode | nodes | ok/sampled | round s | run wall s | client s (mean / max) | client process CPU s (mean) "
        "| client peak RSS MB "
        "| Flower process s (server / clients) | accuracy % | uplink MB | load avg (start / end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if args.append and out.is_file():
        with open(out, "a") as f:
            f.write(f"\nCommand: `python benchmarks/deploy.py {shlex.join(sys.argv[1:])}`\n\n")
    else:
        out.write_text("\n".join(header) + "\n")
    with tempfile.TemporaryDirectory(prefix="fdb-", dir="/tmp") as tmp:
        points = [("deploy", int(n)) for n in args.nodes.split(",") if n]
        points += [("sim", int(n)) for n in args.simulate.split(",") if n]
        for mode, n in points:
            load = os.getloadavg()[0]
            row = deploy_point(n, args, Path(tmp)) if mode == "deploy" else simulate_point(n, args, Path(tmp))
            row += f" {load:.1f} / {os.getloadavg()[0]:.1f} |"
            append_row(out, row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
