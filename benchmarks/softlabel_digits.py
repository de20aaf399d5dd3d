"""Soft-label engines on digits at IPC 10: soft vs hard vs the teacher-relabelled random subset, LRS/ARS.

Protocol (CPU, the CLI defaults): engines with their ``configs/method`` defaults (the
teacher: BatchNorm ConvNet-64, 30 epochs, cached); evaluation: fresh ConvNet width
128 (instance norm) trained 300 epochs with DSA (SGD lr 0.01 -- ``--soft-lr`` for
the KD runs --, momentum 0.9, wd 5e-4, lr x0.1 at half), final-epoch test accuracy,
``--runs`` runs, KD at temperature 4 with the soft labels stored in the set. The
whole-set baseline (for LRS) trains ``--whole-epochs`` epochs (cached in the artefact cache). Every
soft-label result sits beside the same images with hard labels, the random real
subset with hard labels, and the same random subset relabelled by the same teacher
under the same recipe and seeds. LRS and ARS (DD-Ranking, in percent) for every set.

Results go to ``benchmarks/results/softlabel_digits-ipc<IPC>-<date>.md`` (and ``.json``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/softlabel_digits.py
    OMP_NUM_THREADS=1 python benchmarks/softlabel_digits.py --methods rded sre2l --runs 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time

from _common import machine_info, results_path

from fedistill.data import load_dataset
from fedistill.engines import build_engine
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic
from fedistill.io import cache_dir

VARIANTS = {
    "rded": ("rded", {}, "real"),
    "rded-f2": ("rded", {"factor": 2}, "real"),
    "sre2l": ("sre2l", {}, "real"),
    "sre2l-noise-cda": ("sre2l", {"cda": True}, "noise"),
    "gen": ("gen", {}, "real"),
}


def run_one(
    data, name: str, *, ipc: int, recipe: EvalRecipe, whole: EvalRecipe, width: int, runs: int, seed: int
) -> dict:
    """Distill one variant and evaluate it with all baselines and DD-Ranking scores."""
    method, opts, init = VARIANTS[name]
    start = time.perf_counter()
    syn = build_engine(method, **opts).distill(data.train, ipc, init=init, device="cpu", seed=seed)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    spec = ModelSpec("convnet", {"width": width})
    res = evaluate_synthetic(
        syn,
        data,
        models=[spec],
        recipe=recipe,
        whole_recipe=whole,
        runs=runs,
        seed=seed,
        ranking=True,
        cache_dir=cache_dir(),
    )
    fmt = lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "-"  # noqa: E731
    rk = res["ranking"]
    return {
        "variant": name,
        "init": init,
        "labels": res["labels"],
        "synthetic": fmt(res["accuracy"]),
        "hard_label": fmt(res.get("hard_label")),
        "random_subset": fmt(res["baselines"]["random_subset"]),
        "random_subset_soft": fmt(res["baselines"].get("random_subset_soft")),
        "whole": fmt(res["baselines"]["whole_dataset"]),
        "teacher_test": res.get("teacher", {}).get("test"),
        "lrs": rk["lrs"]["lrs"],
        "ars": rk["ars"]["ars"],
        "distill_seconds": round(seconds, 1),
        "peak_rss_mib": round(peak, 1),
        "raw": res,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--soft-lr", type=float, default=0.1)
    ap.add_argument("--whole-epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load_dataset("digits")
    recipe = EvalRecipe(epochs=args.epochs, soft_lr=args.soft_lr)
    whole = EvalRecipe(epochs=args.whole_epochs)
    rows = []
    for name in args.methods:
        kw = {"ipc": args.ipc, "recipe": recipe, "whole": whole, "width": args.width, "runs": args.runs}
        rows.append(run_one(data, name, seed=args.seed, **kw))
        print({k: v for k, v in rows[-1].items() if k != "raw"}, flush=True)
    cols = [
        "variant",
        "init",
        "labels",
        "synthetic",
        "hard_label",
        "random_subset",
        "random_subset_soft",
        "whole",
        "teacher_test",
        "lrs",
        "ars",
        "distill_seconds",
        "peak_rss_mib",
    ]
    lines = [
        f"# Soft-label engines on digits, IPC {args.ipc} ({datetime.date.today()})",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `OMP_NUM_THREADS=1 python {' '.join(sys.argv)}`",
        "",
        f"Evaluation: ConvNet-{args.width}, {args.epochs} epochs with DSA, {args.runs} runs, KD temperature 4, "
        f"soft lr {args.soft_lr or recipe.lr} (hard lr {recipe.lr}); whole set {args.whole_epochs} epochs (hard); "
        "test accuracy %; `synthetic` uses the set's own labels "
        "(soft for rded/sre2l); `random_subset_soft` is the same random subset relabelled by the same teacher. "
        "LRS/ARS in percent (DD-Ranking). peak_rss_mib: the process's peak RSS after distilling (cumulative).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) if r[c] is not None else "-" for c in cols) + " |" for r in rows]
    path = results_path(f"softlabel_digits-ipc{args.ipc}")
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
