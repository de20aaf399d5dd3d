"""Choose DM's image learning rate for digits on the validation split (a benchmark, not a test).

For each candidate ``lr_img``: distill digits at IPC 10 (ConvNet width 128, default DM
settings otherwise), train 3 fresh evaluators (300 epochs, DSA) and record the final-epoch
*validation* accuracy, which alone picks the winner; test accuracy is printed for
information only. Result (benchmarks/results/dm_tune_digits-*.md): the reference lr of 1
ties with 10 on validation, so the default stays at the reference value.

Usage::

    python benchmarks/dm_tune_digits.py --lrs 1,10,100
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import machine_info, results_path

from fedistill.data import load_dataset
from fedistill.engines import build_engine
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default="1,10,100")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = load_dataset("digits")
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        start = time.perf_counter()
        syn = build_engine("dm", iterations=args.iterations, lr_img=lr, model_kwargs={"width": args.width}).distill(
            data.train, 10, seed=args.seed
        )
        seconds = time.perf_counter() - start
        res = evaluate_synthetic(
            syn,
            data,
            models=[ModelSpec("convnet", {"width": args.width})],
            recipe=EvalRecipe(epochs=300),
            runs=args.runs,
            seed=args.seed,
        )
        rows.append(
            {"lr_img": lr, "seconds": round(seconds, 1), "val": res["accuracy"]["val"], "test": res["accuracy"]}
        )
        rows[-1]["random_subset"] = res["baselines"]["random_subset"]
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["val"]["mean"])
    lines = [
        "# DM image learning rate on digits, chosen by validation accuracy",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine_info()}",
        "",
        f"IPC 10, {args.iterations} iterations, ConvNet width {args.width}, evaluation 300 epochs with DSA, "
        f"{args.runs} runs. Selection by **validation** accuracy only.",
        "",
        "| lr_img | val acc | (test acc, not used) | random subset test | distill s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr_img']:g} | {r['val']['mean']:.2f} ± {r['val']['std']:.2f} | {r['test']['mean']:.2f} "
            f"| {r['random_subset']['mean']:.2f} | {r['seconds']} |"
        )
    lines += ["", f"Chosen: lr_img = {best['lr_img']:g}"]
    results_path("dm_tune_digits").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
