"""DM accuracy on Fashion-MNIST under a documented CPU protocol (a benchmark, not a test).

Protocol (CPU): ConvNet width 32 (instance norm, avg pool), DM with 256 real images per
class, DSA, SGD on images (lr 1, momentum 0.5), real init; evaluation: fresh ConvNet
width 32 trained 300 epochs with DSA (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256,
lr x0.1 at half), final-epoch test accuracy, 3 runs; the random real subset of the same
size under the same recipe and seeds. Two parts:

* ``anchor``: IPC 10, 500 iterations -- the protocol at which the reference
  implementation (DatasetCondensation's DM) measured 80.2% +- 0.4 in 231 s here.
* ``sweep``: IPC 1 / 10 / 50 at ``--iterations`` (default 1000).

Results go to ``benchmarks/results/dm_accuracy-<date>.md`` (and ``.json``) with the machine
and the command.

Usage::

    python benchmarks/dm_accuracy.py                 # anchor + sweep
    python benchmarks/dm_accuracy.py --parts anchor
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from _common import machine_info, results_path

from fedistill.data import load_dataset
from fedistill.engines import build_engine
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic

REFERENCE_ANCHOR = {"accuracy": 80.2, "std": 0.4, "seconds": 231.0, "real_init": 72.5}


def run_one(
    data, *, ipc: int, iterations: int, width: int, epochs: int, runs: int, seed: int, engine_opts: dict
) -> dict:
    """Distill with DM and evaluate against the random subset; returns a result row."""
    engine = build_engine("dm", iterations=iterations, batch_real=256, model_kwargs={"width": width}, **engine_opts)
    start = time.perf_counter()
    syn = engine.distill(data.train, ipc, init="real", device="cpu", seed=seed)
    seconds = time.perf_counter() - start
    res = evaluate_synthetic(
        syn,
        data,
        models=[ModelSpec("convnet", {"width": width})],
        recipe=EvalRecipe(epochs=epochs),
        runs=runs,
        seed=seed,
        device="cpu",
    )
    row = {
        "ipc": ipc,
        "iterations": iterations,
        "distill_seconds": round(seconds, 1),
        "dm": res["accuracy"],
        "random_subset": res["baselines"]["random_subset"],
        "compile": engine.compiles(torch.device("cpu")),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="anchor,sweep")
    p.add_argument("--iterations", type=int, default=1000, help="DM iterations of the IPC sweep")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-dtype", default="auto", help="DM real branch: auto | bf16 | fp32")
    p.add_argument("--dsa-groups", default="class", help="DM DSA groups: class | sample")
    p.add_argument("--out", default=None, help="markdown path (default benchmarks/results/dm_accuracy-DATE.md)")
    p.add_argument("--dsa-op-per-group", action="store_true", help="each DSA group draws its own op")
    args = p.parse_args()
    data = load_dataset("fashion_mnist")
    parts = args.parts.split(",")
    common = {"width": args.width, "epochs": args.epochs, "runs": args.runs, "seed": args.seed}
    common["engine_opts"] = {
        "real_dtype": args.real_dtype,
        "dsa_groups": args.dsa_groups,
        "dsa_op_per_group": args.dsa_op_per_group,
    }
    rows = {}
    if "anchor" in parts:
        rows["anchor"] = [run_one(data, ipc=10, iterations=500, **common)]
    if "sweep" in parts:
        rows["sweep"] = [run_one(data, ipc=int(i), iterations=args.iterations, **common) for i in args.ipcs.split(",")]

    def fmt(r: dict) -> str:
        return f"{r['mean']:.2f} ± {r['std']:.2f}"

    lines = [
        f"# DM accuracy on Fashion-MNIST (CPU protocol), {datetime.date.today()}",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Protocol: ConvNet width {args.width}, DM 256 real/class, DSA (groups: {args.dsa_groups}, op per group: "
        f"{args.dsa_op_per_group}), lr_img 1, "
        f"momentum 0.5, real init, real branch dtype {args.real_dtype}; "
        f"evaluation {args.epochs} epochs with DSA, {args.runs} runs, final-epoch test accuracy (%), "
        "random real subset under the same recipe and seeds.",
        "",
        "| part | IPC | iterations | DM | random subset | distill s | compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, rs in rows.items():
        for r in rs:
            lines.append(
                f"| {part} | {r['ipc']} | {r['iterations']} | {fmt(r['dm'])} | {fmt(r['random_subset'])} "
                f"| {r['distill_seconds']} | {r['compile']} |"
            )
    if "anchor" in rows:
        a = rows["anchor"][0]
        ref = REFERENCE_ANCHOR
        lines += [
            "",
            f"Reference anchor (DatasetCondensation DM, same protocol, this machine): {ref['accuracy']} ± {ref['std']} "
            f"in {ref['seconds']:.0f} s (random real init {ref['real_init']}). fedistill: {fmt(a['dm'])} in "
            f"{a['distill_seconds']} s ({ref['seconds'] / a['distill_seconds']:.2f}x faster); target: accuracy >= "
            f"{ref['accuracy']} in <= {ref['seconds'] / 2:.0f} s.",
        ]
    md = Path(args.out) if args.out else results_path("dm_accuracy")
    js = md.with_suffix(".json")
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"command": sys.argv, "machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
