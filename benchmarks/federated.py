"""Federated benchmark: `fedistill simulate` strategies on a dataset, as real subprocesses.

For each (strategy, clients, alpha) point it runs the CLI, then reads the run's
``summary.json`` and records final accuracy, rounds, uplink/downlink bytes, wall time and
the peak resident memory of the whole process tree (Ray's GCS, raylet and workers are
descendants of the driver; sampled from /proc every 0.5 s). Results are appended to a
dated markdown table under ``benchmarks/results/`` after every point, so a partial run
keeps what it measured.

    python benchmarks/federated.py --dataset fashion_mnist --strategies oneshot,feddm,fedavg \\
        --clients 10,100 --alphas 0.1,0.5 --out federated_fmnist
    python benchmarks/federated.py --dataset fashion_mnist --strategies oneshot --clients 100,500 \\
        --alphas 0.5 --out federated_scale
    python benchmarks/federated.py --dataset digits --strategies fedavg,fedaf,dynafed --policies union,screen \\
        --clients 10 --alphas 0.1 --out federated_digits

``--policies`` varies the server policy of the strategies that receive synthetic sets
(``fedavg`` and ``dynafed`` run once). Beside the table it writes ``<out>-<date>.json``
(every point's per-round accuracy and cumulative bytes) and ``<out>-<date>.png``
(accuracy against cumulative uplink + downlink bytes); "rounds to FedAvg" is the first
round at which a point reaches the final accuracy of the ``fedavg`` point with the same
clients and alpha (when one ran first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import append_row, machine_info, results_path

REPO = Path(__file__).resolve().parents[1]


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def run_point(args: list[str], out: Path, *, command: str = "simulate") -> tuple[dict, float, int, int]:
    """Run one ``fedistill <command>``; returns its summary, wall seconds, peak tree RSS and the exit code."""
    cmd = [sys.executable, "-m", "fedistill.cli", command, *args, f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if proc.returncode != 0:
        summary.setdefault("error", err.strip().splitlines()[-1] if err.strip() else "failed")
    return summary, wall, peak[0], proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--strategies", default="oneshot,feddm,fedavg")
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--alphas", default="0.1,0.5")
    ap.add_argument("--policies", default="union", help="server policies for the synthetic-set strategies")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--out", default="federated")
    opts = ap.parse_args()
    path = results_path(opts.out)
    cmdline = "python benchmarks/federated.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Federated benchmark ({opts.dataset})",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `{cmdline}`",
        "",
        "Each point is one `fedistill simulate` subprocess (Flower simulation engine on Ray, local cluster).",
        "Accuracy: global model on the real test set after the last round. Peak memory: resident memory",
        "of the whole process tree (driver, Ray GCS/raylet, workers). Random subset: the server recipe on",
        "random real images with the merged synthetic set's class counts. Server s: the server's own",
        "work summed over rounds (aggregation, policy, training, evaluation). Rounds to FedAvg: first",
        "round reaching the final accuracy of the FedAvg point with the same clients and alpha.",
        "",
        "| strategy | policy | clients | alpha | rounds | accuracy % | random subset % | rounds to FedAvg "
        "| uplink MB | downlink MB | server s | failed | wall s | peak GB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    path.write_text("\n".join(lines) + "\n")
    extra = opts.extra.split() if opts.extra else []
    curves: list[dict] = []
    fedavg_final: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in opts.strategies.split(","):
            policies = ["-"] if strategy in MODEL_STRATEGIES else opts.policies.split(",")
            for policy, clients, alpha in itertools.product(policies, opts.clients.split(","), opts.alphas.split(",")):
                args = [f"dataset={opts.dataset}", f"strategy={strategy}", f"clients={clients}", f"alpha={alpha}"]
                args += [] if policy == "-" else [f"policy={policy}"]
                out = Path(tmp) / f"{strategy}-{policy}-{clients}-{alpha}"
                s, wall, peak, rc = run_point([*args, *extra], out)
                rounds = _round_records(out)
                if strategy == "fedavg" and rounds:
                    fedavg_final[(clients, alpha)] = rounds[-1]["accuracy"]
                target = fedavg_final.get((clients, alpha))
                reach = next((r["round"] for r in rounds if target is not None and r["accuracy"] >= target), "-")
                base = (s.get("baselines") or {}).get("random_subset") or {}
                row = (
                    f"| {strategy} | {policy} | {clients} | {alpha} | {s.get('rounds_completed', '-')} "
                    f"| {s.get('final_accuracy', float('nan')):.2f} | {base.get('accuracy', float('nan')):.2f} "
                    f"| {reach} | {s.get('bytes_up', 0) / 1e6:.3f} | {s.get('bytes_down', 0) / 1e6:.3f} "
                    f"| {sum(r.get('server_seconds', 0.0) for r in rounds):.0f} "
                    f"| {s.get('clients_failed', '-')} | {wall:.0f} | {peak / 2**30:.2f} "
                    f"| {'ok' if rc == 0 else s.get('error', 'failed')} |"
                )
                append_row(path, row)
                curves.append(
                    {
                        "label": f"{strategy}" + ("" if policy == "-" else f"/{policy}") + f" c{clients} a{alpha}",
                        "accuracy": [r["accuracy"] for r in rounds],
                        "bytes": [r["bytes_up_total"] + r["bytes_down_total"] for r in rounds],
                    }
                )
                _write_curves(path, curves)
    print(f"wrote {path}")


MODEL_STRATEGIES = {"fedavg", "dynafed"}
"""Strategies whose clients send models: the server policy does not apply."""


def _round_records(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [e for e in events if e["event"] == "round"]


def _write_curves(table: Path, curves: list[dict]) -> None:
    """The per-round curves as JSON and as a plot of accuracy against cumulative bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        if c["bytes"]:
            ax.plot([b / 1e6 for b in c["bytes"]], c["accuracy"], marker="o", ms=3, label=c["label"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink + downlink (MB)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(table.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
