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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine_info, results_path

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


def run_point(args: list[str], out: Path) -> tuple[dict, float, int, int]:
    """Run one simulation; returns its summary, wall seconds, peak tree RSS and the exit code."""
    cmd = [sys.executable, "-m", "fedistill.cli", "simulate", *args, f"hydra.run.dir={out}"]
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
        "random real images with the merged synthetic set's class counts.",
        "",
        "| strategy | clients | alpha | rounds | accuracy % | random subset % | uplink MB | downlink MB "
        "| failed | wall s | peak GB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    path.write_text("\n".join(lines) + "\n")
    extra = opts.extra.split() if opts.extra else []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in opts.strategies.split(","):
            for clients in opts.clients.split(","):
                for alpha in opts.alphas.split(","):
                    args = [f"dataset={opts.dataset}", f"strategy={strategy}", f"clients={clients}", f"alpha={alpha}"]
                    out = Path(tmp) / f"{strategy}-{clients}-{alpha}"
                    s, wall, peak, rc = run_point([*args, *extra], out)
                    base = (s.get("baselines") or {}).get("random_subset") or {}
                    row = (
                        f"| {strategy} | {clients} | {alpha} | {s.get('rounds_completed', '-')} "
                        f"| {s.get('final_accuracy', float('nan')):.2f} | {base.get('accuracy', float('nan')):.2f} "
                        f"| {s.get('bytes_up', 0) / 1e6:.3f} | {s.get('bytes_down', 0) / 1e6:.3f} "
                        f"| {s.get('clients_failed', '-')} | {wall:.0f} | {peak / 2**30:.2f} "
                        f"| {'ok' if rc == 0 else s.get('error', 'failed')} |"
                    )
                    print(row, flush=True)
                    with open(path, "a") as f:
                        f.write(row + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
