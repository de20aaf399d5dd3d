"""Federated DP utility: aggregate-then-distill (``strategy=dp_stats``) against per-client DP distillation.

Every point is a real ``fedistill simulate`` subprocess (Flower's simulation engine on Ray)
with the user's defaults plus the overrides of its mode; 3 seeds by default. Each run's
random-subset control (real, non-private images of the same class counts, same server
recipe) is reported beside it. The markdown table is rewritten after every run, so an
interrupted benchmark keeps what it measured.

    python benchmarks/dp_stats.py --dataset digits --clients 10 --alpha 0.5 --epsilons 2 \\
        --modes dp_stats,dp_stats-secure,oneshot-dp_dm --seeds 0,1,2 --out dp_stats_digits
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info, results_path

REPO = Path(__file__).resolve().parents[1]

#: mode -> overrides (on top of dataset, clients, alpha, epsilon, seed).
MODES: dict[str, list[str]] = {
    "dp_stats": ["strategy=dp_stats", "strategy.secure_aggregation=false"],
    "dp_stats-secure": ["strategy=dp_stats", "strategy.secure_aggregation=true"],
    # per-client DP distillation with the same engine settings (the user's default model)
    "oneshot-dp_dm": ["strategy=oneshot", "method=dp_dm"],
    # ... and with dp_stats' model on digits (two ConvNet blocks: configs/dataset_model/digits_convnet_dp_stats.yaml)
    "oneshot-dp_dm-depth2": ["strategy=oneshot", "method=dp_dm", "model.depth=2"],
}


def _run(args: list[str], run: Path) -> tuple[dict, float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedistill.cli", "simulate", *args, f"hydra.run.dir={run}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    err = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return summary, wall, err


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write(path: Path, header: str, rows: list[dict]) -> None:
    """The per-run table and the mean ± std per (mode, epsilon)."""
    lines = [header, "", "## Per run", ""]
    lines += [
        "| mode | epsilon | seed | accuracy % | random real subset % | images | epsilon spent (max client) "
        "| uplink MB | wall s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['epsilon']} | {r['seed']} | {_stat([r['acc']] if r['acc'] is not None else [])} "
            f"| {_stat([r['random']] if r['random'] is not None else [])} | {r['images']} | {r['spent']} "
            f"| {r['uplink']} | {r['wall']:.0f} | {r['error']} |"
        )
    lines += ["", "## Mean ± std over seeds", ""]
    lines += ["| mode | epsilon | seeds | accuracy % | random real subset % |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["epsilon"]), []).append(r)
    for (mode, eps), rs in groups.items():
        acc = [r["acc"] for r in rs if r["acc"] is not None]
        rnd = [r["random"] for r in rs if r["random"] is not None]
        lines.append(f"| {mode} | {eps} | {len(acc)} | {_stat(acc)} | {_stat(rnd)} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--epsilons", default="2")
    ap.add_argument("--modes", default="dp_stats,dp_stats-secure,oneshot-dp_dm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--extra", default="", help="more overrides for every run, space-separated")
    ap.add_argument("--out", default="dp_stats")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fd-dpstats-"))
    path = results_path(args.out)
    common = [f"dataset={args.dataset}", f"clients={args.clients}", f"alpha={args.alpha}", *args.extra.split()]
    header = (
        f"# Federated DP: aggregate-then-distill vs per-client distillation ({args.dataset}, {args.clients} clients, "
        f"alpha {args.alpha})\n\nMachine: {machine_info()}\n\nCommand: `python benchmarks/dp_stats.py "
        f"{' '.join(sys.argv[1:])}`; every run: `fedistill simulate {' '.join(common)} <mode> method.epsilon=E "
        f"seed=S` with the modes {json.dumps(MODES)}. Accuracy is the global model's on the test split; the "
        "random real subset is each run's control (non-private real images, same class counts and server recipe)."
    )
    rows: list[dict] = []
    for eps in args.epsilons.split(","):
        for mode in args.modes.split(","):
            for seed in args.seeds.split(","):
                run = work / f"{mode}-e{eps}-s{seed}"
                overrides = [*common, *MODES[mode], f"method.epsilon={eps}", f"seed={seed}"]
                summary, wall, err = _run(overrides, run)
                control = (summary.get("baselines") or {}).get("random_subset") or {}
                rows.append(
                    {
                        "mode": mode,
                        "epsilon": eps,
                        "seed": seed,
                        "acc": summary.get("final_accuracy"),
                        "random": control.get("accuracy"),
                        "images": summary.get("synthetic_images", "-"),
                        "spent": (summary.get("privacy") or {}).get("epsilon_max", "-"),
                        "uplink": round(summary["bytes_up"] / 1e6, 2) if "bytes_up" in summary else "-",
                        "wall": wall,
                        "error": err,
                    }
                )
                write(path, header, rows)
                print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
