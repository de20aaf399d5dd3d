"""Every engine with its defaults, as a user types it: ``fedistill central dataset=D method=M ipc=I seed=S``.

Each point is one ``fedistill central`` subprocess with nothing but the dataset, the engine,
the IPC and the seed on the command line, so the table shows exactly what a new user gets
(the defaults of ``configs/method/<engine>.yaml``, the dataset-aware defaults of
``configs/dataset_model`` and ``configs/dataset_method``, the central evaluation recipe).
Read from the run's ``summary.json``: test accuracy of the set and of the random real subset
of the same size under the same recipe and seeds (mean over ``eval.runs``), the same on the
validation split (the split a run's own warning uses), the warnings the run printed, the
distillation seconds; measured from outside: wall seconds and the peak resident memory of
the process tree.

    python benchmarks/defaults.py --dataset digits --ipcs 1,10 --seeds 0,1,2
    python benchmarks/defaults.py --dataset fashion_mnist --engines dm,dc --ipcs 1

Writes ``benchmarks/results/<out>-<date>.md`` (rows appended as points finish) and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import append_row, machine_info, results_path, run_point

ENGINES = "dm,dm_hom,dc,dsa,mtt,tesla,rded,sre2l,gen,dp_dm,dp_dc,dp_dsa"
HEADER = (
    "| engine | IPC | seed | labels | accuracy % | random subset % | delta | val delta | wall s | distill s "
    "| peak GB | warned |"
)


def measure(dataset: str, engine: str, ipc: int, seed: int, extra: list[str], work: Path) -> dict:
    """One point: the user's command and what it reported."""
    args = [f"dataset={dataset}", f"method={engine}", f"ipc={ipc}", f"seed={seed}", *extra]
    summary, wall, peak, rc = run_point(args, work / f"{engine}-{ipc}-{seed}", command="central")
    point = {"engine": engine, "ipc": ipc, "seed": seed, "command": "fedistill central " + " ".join(args)}
    point |= {"wall_seconds": round(wall, 1), "peak_gb": round(peak / 2**30, 2), "returncode": rc}
    if rc != 0 or "accuracy" not in summary:
        return point | {"error": summary.get("error", f"exit {rc}")}
    acc, rnd = summary["accuracy"], summary["baselines"]["random_subset"]
    point |= {
        "labels": summary.get("labels"),
        "accuracy": acc["mean"],
        "random_subset": rnd["mean"],
        "val_delta": round(acc["val"]["mean"] - rnd["val"]["mean"], 2) if "val" in acc and "val" in rnd else None,
        "distill_seconds": summary.get("distill_seconds"),
        "warnings": summary.get("warnings", []),
    }
    return point


def row(p: dict) -> str:
    if "error" in p:
        return f"| {p['engine']} | {p['ipc']} | {p['seed']} | error: {p['error']} |||||||||"
    return (
        f"| {p['engine']} | {p['ipc']} | {p['seed']} | {p['labels']} | {p['accuracy']:.2f} | "
        f"{p['random_subset']:.2f} | {p['accuracy'] - p['random_subset']:+.2f} | {p['val_delta']:+.2f} | "
        f"{p['wall_seconds']} | {p['distill_seconds']} | {p['peak_gb']} | {'yes' if p['warnings'] else 'no'} |"
    )


def mean_rows(points: list[dict]) -> list[str]:
    """Per engine and IPC: mean delta over seeds (with its spread) and whether every seed beat random."""
    out = ["", "| engine | IPC | seeds | mean delta | std | beats random on every seed |", "|---|---|---|---|---|---|"]
    keys = sorted({(p["engine"], p["ipc"]) for p in points if "error" not in p})
    for engine, ipc in keys:
        ds = [p["accuracy"] - p["random_subset"] for p in points if (p["engine"], p["ipc"]) == (engine, ipc)]
        ds = [d for d in ds if d == d]
        spread = statistics.stdev(ds) if len(ds) > 1 else 0.0
        beats = "yes" if all(d > 0 for d in ds) else "no"
        out.append(f"| {engine} | {ipc} | {len(ds)} | {statistics.mean(ds):+.2f} | {spread:.2f} | {beats} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--engines", default=ENGINES)
    ap.add_argument("--ipcs", default="1,10")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--out", default=None, help="results name (default defaults_<dataset>)")
    opts = ap.parse_args()
    name = opts.out or f"defaults_{opts.dataset}"
    path = results_path(name)
    extra = opts.extra.split()
    header = [
        f"# Engine defaults on {opts.dataset} (`fedistill central`, nothing but dataset, method, ipc, seed)",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `python benchmarks/defaults.py {' '.join(sys.argv[1:])}`",
        "",
        "delta: test accuracy minus the random real subset of the same size (same recipe, same evaluation "
        "seeds); val delta: the same on the validation split (what the run's own warning reads); warned: the "
        "run printed a warning (below the random subset on validation, or chance level).",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    path.write_text("\n".join(header) + "\n")
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in opts.engines.split(","):
            for ipc in (int(i) for i in opts.ipcs.split(",")):
                for seed in (int(s) for s in opts.seeds.split(",")):
                    p = measure(opts.dataset, engine, ipc, seed, extra, Path(tmp))
                    points.append(p)
                    append_row(path, row(p))
                    results_path(name, ".json").write_text(json.dumps(points, indent=1))
    with open(path, "a") as f:
        f.write("\n".join(mean_rows(points)) + "\n")


if __name__ == "__main__":
    main()
