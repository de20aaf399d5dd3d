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

Every run directory stays under ``--workdir``. The results, rewritten after every point (a
stopped benchmark keeps what it measured), are ``fedistill report`` over those directories
with this benchmark's profile table after it: ``benchmarks/results/<out>-<date>.md``
(per number of clients: accuracy mean ± std over seeds, the random-subset control beside,
uplink, seconds, peak GB; then one profile row per run), ``.csv`` and ``.html`` (the
report's), ``.json`` (every point's profile, wall seconds and peak memory) and ``.png``
(log-log wall time and peak memory against clients). ``--render`` rewrites the profile
table and plot from the JSON of earlier runs (with the report of their run directories
where these still exist).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import point_status, report_results, results_header, results_path, run_point, workdir

from fedistill.report_render import Table, markdown_table


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


PROFILE = (
    ("clients", "clients"),
    ("seed", "seed"),
    ("synthetic_images", "synthetic images"),
    ("wall_seconds", "wall s"),
    ("exchange_seconds", "exchange s"),
    ("client_compute_seconds", "client compute s"),
    ("client_seconds_mean", "client mean s"),
    ("data_seconds", "data s"),
    ("accept_seconds", "accept s"),
    ("server_train_seconds", "train s"),
    ("evaluate_seconds", "evaluate s"),
    ("control_seconds", "control s"),
    ("client_peak_rss_mb", "client MB"),
    ("clients_failed", "failed clients"),
)
"""The per-run profile table: point key -> column (accuracy, uplink, seconds, peak GB: the report's)."""


def profile_table(points: list[dict]) -> Table:
    """Where each run's time and memory went (``-``: not measured, e.g. a failed run)."""
    rows = [tuple("-" if p.get(key) is None else str(p[key]) for key, _ in PROFILE) for p in points]
    return Table("Per-run profile (seconds summed over rounds)", tuple(col for _, col in PROFILE), rows)


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
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    ap.add_argument("--render", nargs="*", default=None, help="JSON files of earlier runs: re-render their points")
    opts = ap.parse_args()
    header = results_header(
        f"Scale benchmark ({opts.dataset}, alpha {opts.alpha})",
        f"Each point: `fedistill simulate dataset={opts.dataset} alpha={opts.alpha} clients=N seed=S {opts.extra}`",
        "Seconds (the report's): start to the main result in summary.json (the random-subset control runs\n"
        "after it); peak GB: the whole process tree (driver, Ray GCS/raylet, workers). In the profile table,\n"
        "wall: the whole command, Ray start to exit; the other columns are summed over rounds:\n"
        "exchange = messages out and replies back (client work on the Ray actors, Ray scheduling, actor\n"
        "start, serialization); client compute = the clients' own distillation seconds summed over clients\n"
        "(divide by the actors, 2 here, for its share of the exchange); data = per-client data loading\n"
        "(cached per actor); accept = server decoding and validation; train = server training; control =\n"
        "the random-subset control. Client MB: the largest peak RSS of one client's actor process; failed\n"
        "clients: client replies that failed, summed over rounds.",
    )
    if opts.render is not None:  # one table and plot from the points of earlier runs (and their report, if kept)
        points = sorted((p for f in opts.render for p in json.loads(Path(f).read_text())), key=lambda p: p["clients"])
        kept = [Path(p["run"]) for p in points if p.get("run") and Path(p["run"]).is_dir()]
        _write(points, kept, opts.out, header)
        return
    work = workdir(opts.workdir, "scale")
    extra = opts.extra.split() if opts.extra else []
    points: list[dict] = []
    for clients in opts.clients.split(","):
        for seed in opts.seeds.split(","):
            args = [f"dataset={opts.dataset}", f"alpha={opts.alpha}", f"clients={clients}", f"seed={seed}"]
            out = work / f"c{clients}-s{seed}"
            s, wall, peak, rc = run_point([*args, *extra], out)
            prof = round_profile(out, s, wall) if (out / "metrics.jsonl").is_file() else {}
            point = {"clients": int(clients), "seed": int(seed), "synthetic_images": s.get("synthetic_images")}
            point |= {"wall_seconds": round(wall, 1), "peak_gb": round(peak / 1e9, 2), "run": str(out), **prof}
            points.append(point)
            print(f"{out.name}: {point_status(s, rc, wall)}", flush=True)
            _write(points, [work], opts.out, header)


def _write(points: list[dict], dirs: list[Path], name: str, header: str) -> None:
    """The results: the report of ``dirs`` with the profile table (just the table without run
    directories), the points as JSON, the plot of wall time and peak memory against clients."""
    if dirs:
        md = report_results(dirs, name, header, [profile_table(points)])
    else:
        md = results_path(name)
        md.write_text("\n".join([header, "", *markdown_table(profile_table(points))]) + "\n")
    results_path(name, ".json").write_text(json.dumps(points, indent=1) + "\n")
    if len({p["clients"] for p in points}) > 1:
        _plot(points, results_path(name, ".png"))
    print(f"results: {md}", flush=True)


if __name__ == "__main__":
    main()
