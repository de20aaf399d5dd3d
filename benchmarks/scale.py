"""Scale benchmark: wall time, memory and accuracy of `fedistill simulate` against the number of clients.

Each point is one `fedistill simulate` subprocess (Flower's simulation engine on a local Ray),
measured from outside: wall time and the peak resident memory of the whole process tree
(driver, Ray GCS/raylet, workers). From the run's ``metrics.jsonl`` it adds where the time
went (the round profile: client compute, data loading, exchange overhead = Ray scheduling,
actor start and serialization, server validation, server training, evaluation, the
random-subset control) and the memory of one active client (its actor's peak RSS).

    python benchmarks/scale.py --clients 10,100,500,1000 --out scale
    python benchmarks/scale.py --clients 100 --seeds 0,1,2 --extra "method.releases=null" --out scale-fresh
    python benchmarks/scale.py --clients 100 --extra "strategy=feddm" --out scale-feddm

Writes ``benchmarks/results/<out>-<date>.md`` (a table per point, appended as points finish),
``.json`` (every point's numbers) and ``.png`` (log-log wall time and peak memory against
clients).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import append_row, machine_info, results_path, run_point


def round_profile(run_dir: Path, summary: dict, wall: float) -> dict:
    """Where a run's time went, from its ``metrics.jsonl`` and ``summary.json``."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e.get("event") == "round"]
    clients = [m for r in rounds for m in r.get("client_metrics", {}).values()]
    timing = [r.get("timing", {}) for r in rounds]
    total = sum(r["seconds"] for r in rounds)

    def sum_of(key: str) -> float:
        return round(sum(t.get(key, 0.0) for t in timing), 2)

    compute = sum(c.get("seconds", 0.0) for c in clients)
    return {
        "rounds_seconds": round(total, 2),
        "startup_seconds": round(wall - total - float(summary.get("control_seconds") or 0.0), 2),
        "exchange_seconds": sum_of("exchange"),
        "client_compute_seconds": round(compute, 2),
        "client_seconds_mean": round(statistics.mean(c.get("seconds", 0.0) for c in clients), 3) if clients else None,
        "data_seconds": round(sum(c.get("data_seconds", 0.0) for c in clients), 2),
        "accept_seconds": sum_of("accept"),
        "server_train_seconds": sum_of("update"),
        "evaluate_seconds": sum_of("evaluate"),
        "control_seconds": summary.get("control_seconds"),
        "client_peak_rss_mb": max((c.get("peak_rss_mb", 0.0) for c in clients), default=None),
        "clients_failed": sum(r.get("clients_failed", 0) for r in rounds),
    }


def row(p: dict) -> str:
    """One point as a row of the results table."""
    return (
        f"| {p['clients']} | {p['seed']} | {p['accuracy']} | {p['random_subset']} | {p['synthetic_images']} "
        f"| {(p['bytes_up'] or 0) / 1e6:.2f} | {p['wall_seconds']} | {p['main_seconds']} "
        f"| {p.get('exchange_seconds')} | {p.get('client_compute_seconds')} "
        f"| {p.get('client_seconds_mean')} | {p.get('data_seconds')} | {p.get('accept_seconds')} "
        f"| {p.get('server_train_seconds')} | {p.get('evaluate_seconds')} | {p.get('control_seconds')} "
        f"| {p['peak_gb']} | {p.get('client_peak_rss_mb')} | {p.get('clients_failed')} |"
        + (f" error: {p['error']}" if p.get("returncode") else "")
    )


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = [p["clients"] for p in points]
    a.loglog(xs, [p["wall_seconds"] for p in points], "o-")
    a.set(xlabel="clients", ylabel="wall seconds", title="wall time")
    b.loglog(xs, [p["peak_gb"] for p in points], "o-")
    b.set(xlabel="clients", ylabel="peak GB (process tree)", title="peak memory")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--alpha", default="0.1")
    ap.add_argument("--clients", default="10,100,500")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--out", default="scale")
    ap.add_argument("--render", nargs="*", default=None, help="JSON files of earlier runs: re-render their points")
    opts = ap.parse_args()
    path = results_path(opts.out)
    cmdline = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    header = [
        f"# Scale benchmark ({opts.dataset}, alpha {opts.alpha})",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `{cmdline}` (each point: `fedistill simulate dataset={opts.dataset} alpha={opts.alpha} "
        f"clients=N seed=S {opts.extra}`)",
        "",
        "Wall: the whole command, Ray start to exit. Main s: start to the main result in summary.json",
        "(wall_seconds; the random-subset control runs after it). Profile columns are summed over rounds:",
        "exchange = messages out and replies back (client work on the Ray actors, Ray scheduling, actor",
        "start, serialization); client compute = the clients' own distillation seconds summed over clients",
        "(divide by the actors, 2 here, for its share of the exchange); data = per-client data loading",
        "(cached per actor); accept = server decoding and validation; train = server training; control =",
        "the random-subset control. Client MB: the largest peak RSS of one client's actor process.",
        "",
        "GPU numbers: not yet measured (no GPU machine was lent to this session; `benchmarks/gpu_scale.sh`).",
        "",
        "| clients | seed | accuracy % | random subset % | synthetic images | uplink MB | wall s | main s "
        "| exchange s | client compute s | client mean s | data s | accept s | train s | evaluate s "
        "| control s | peak GB | client MB | failed |",
        "|" + "---|" * 19,
    ]
    path.write_text("\n".join(header) + "\n")
    if opts.render is not None:  # one table and plot from the points of earlier runs
        points = sorted((p for f in opts.render for p in json.loads(Path(f).read_text())), key=lambda p: p["clients"])
        for p in points:
            append_row(path, row(p))
        results_path(opts.out, ".json").write_text(json.dumps(points, indent=1) + "\n")
        _plot(points, results_path(opts.out, ".png"))
        return
    extra = opts.extra.split() if opts.extra else []
    points: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in opts.clients.split(","):
            for seed in opts.seeds.split(","):
                args = [f"dataset={opts.dataset}", f"alpha={opts.alpha}", f"clients={clients}", f"seed={seed}"]
                out = Path(tmp) / f"c{clients}-s{seed}"
                s, wall, peak, rc = run_point([*args, *extra], out)
                prof = round_profile(out, s, wall) if (out / "metrics.jsonl").is_file() else {}
                base = ((s.get("baselines") or {}).get("random_subset") or {}).get("accuracy", "-")
                point = {
                    "clients": int(clients),
                    "seed": int(seed),
                    "accuracy": s.get("final_accuracy"),
                    "random_subset": base,
                    "synthetic_images": s.get("synthetic_images"),
                    "bytes_up": s.get("bytes_up"),
                    "wall_seconds": round(wall, 1),
                    "main_seconds": s.get("wall_seconds"),
                    "peak_gb": round(peak / 1e9, 2),
                    "returncode": rc,
                    "error": s.get("error"),
                    **prof,
                }
                points.append(point)
                append_row(path, row(point))
                results_path(opts.out, ".json").write_text(json.dumps(points, indent=1) + "\n")
    if len({p["clients"] for p in points}) > 1:
        _plot(points, results_path(opts.out, ".png"))


if __name__ == "__main__":
    main()
