"""Engine comparison on Fashion-MNIST under one CPU protocol (a benchmark, not a test).

For every engine (default: dm, dc, dsa, mtt, tesla, dm_hom) at every IPC (default 1 and
10) a fresh child process composes the ``fedistill central`` config
(``compose_config("central", ["dataset=fashion_mnist", "method=<engine>", "preset=cpu",
...])``), builds the engine as :func:`fedistill.central.run_central` does, distils, and
evaluates with :func:`fedistill.evaluation.evaluate_synthetic` under
:func:`fedistill.central.eval_settings` -- the functions behind ``fedistill central``'s
summary, including its random real subset baseline (same recipe, same seeds).

Measured per point:

* s/it: median wall time between consecutive iterations (``log_every=1``); the first
  iteration (``torch.compile`` where the engine compiles) is reported separately.
* memory: ``ru_maxrss`` of the child (``os.wait4``; whole process: data, distillation,
  evaluation) and the peak RSS the distillation adds (``VmHWM`` reset through
  ``/proc/self/clear_refs`` after loading the data and the expert buffer, minus the RSS
  at that point).
* test accuracy (%, final epoch) of the distilled set and of the random subset, mean ±
  std over the evaluation runs. MTT/TESLA's expert buffer is built (or loaded from the
  disk cache) before the distillation and timed separately.

Each point is appended to ``benchmarks/results/engines_fmnist-<date>.md`` (and a
``.jsonl``) as soon as it finishes, so a partial run keeps what it measured. A point
whose child runs past ``--point-timeout`` seconds, or that would start after
``--deadline``, is recorded as skipped with the reason.

Usage::

    python benchmarks/engines.py --iterations dm=300,dc=10 --epochs 300 --runs 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info, results_path

ENGINES = ("dm", "dc", "dsa", "mtt", "tesla", "dm_hom")
#: Published Fashion-MNIST accuracy at IPC 1 / 10 (ConvNet-128; ../shared/REFERENCE.md section 1).
PUBLISHED: dict[str, dict[int, str]] = {
    "random": {1: "51.4 (recalled)", 10: "73.8 (recalled)"},
    "dc": {1: "70.5", 10: "82.3"},
    "dsa": {1: "70.6", 10: "84.6"},
    "dm": {1: "70.7 (recalled)", 10: "83.5 (recalled)"},
    "mtt": {1: "75.1 (recalled)", 10: "87.2 (recalled)"},
    "tesla": {1: "n/a (CIFAR-10 only)", 10: "n/a (CIFAR-10 only)"},
    "dm_hom": {1: "n/a (fedistill variant)", 10: "n/a (fedistill variant)"},
}
#: Published iteration counts (REFERENCE.md section 3, configs/preset/method/*_paper.yaml).
PAPER_ITERATIONS = {"dm": 20000, "dm_hom": 20000, "dc": 1000, "dsa": 1000, "mtt": 5000, "tesla": 5000}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def overrides(args: argparse.Namespace, engine: str, ipc: int | str) -> list[str]:
    """The ``fedistill central`` overrides of one point (also printed as its equivalent CLI call)."""
    out = [
        "dataset=fashion_mnist",
        f"method={engine}",
        "preset=cpu",
        f"ipc={ipc}",
        f"seed={args.seed}",
        "device=cpu",
        f"model.width={args.width}",
        f"eval.epochs={args.epochs}",
        f"eval.runs={args.runs}",
        "eval.ranking=false",
        f"method.iterations={args.iters.get(engine, '<N>')}",
        "method.log_every=1",
    ]
    if engine in ("mtt", "tesla"):
        out += [f"method.{k}" for k in args.expert.split(",") if k]
    return out


def run_point(args: argparse.Namespace, engine: str, ipc: int) -> dict[str, Any]:
    """Child process: distil and evaluate one point; returns its result row."""
    torch.set_num_threads(1)
    from fedistill.central import eval_settings
    from fedistill.cli import compose_config
    from fedistill.data import load_dataset
    from fedistill.engines import build_engine
    from fedistill.engines.experts import expert_trajectories
    from fedistill.evaluation import evaluate_synthetic

    cfg = compose_config("central", overrides(args, engine, ipc))
    bundle = load_dataset(cfg["dataset"]["name"], val_fraction=float(cfg["data"]["val_fraction"]))
    method, model = dict(cfg["method"]), dict(cfg["model"])
    name = method.pop("name")
    eng = build_engine(name, model=model.pop("name"), model_kwargs=model, **method)
    dev, seed = torch.device("cpu"), int(cfg["seed"])
    row: dict[str, Any] = {"engine": engine, "ipc": ipc, "iterations": eng.config.iterations}
    if engine in ("mtt", "tesla"):  # the same call (and cache key) as MTTEngine.distill makes
        t = time.perf_counter()
        expert_trajectories(bundle.train, eng.config, seed=seed, device=dev)
        row["expert_seconds"] = round(time.perf_counter() - t, 1)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _status_kib("VmRSS")
    stamps: list[float] = []
    start = time.perf_counter()
    syn = eng.distill(
        bundle.train,
        ipc,
        init=eng.resolve_init(cfg["init"]),
        device=dev,
        progress=lambda s, t, rec: stamps.append(rec["seconds"]),
        seed=seed,
    )
    row["distill_seconds"] = round(time.perf_counter() - start, 1)
    row["distill_peak_mib"] = round((_status_kib("VmHWM") - before) / 1024)
    diffs = [b - a for a, b in itertools.pairwise(stamps)]
    row["s_it"] = statistics.median(diffs) if diffs else stamps[0]
    row["first_it"] = stamps[0]
    t = time.perf_counter()
    res = evaluate_synthetic(syn, bundle, seed=seed, device=dev, **eval_settings(cfg))
    row["eval_seconds"] = round(time.perf_counter() - t, 1)
    row["accuracy"], row["random_subset"] = res["accuracy"], res["baselines"]["random_subset"]
    row["labels"] = res["labels"]
    if "hard_label" in res:
        row["hard_label"] = res["hard_label"]
    return row


def measure(args: argparse.Namespace, engine: str, ipc: int) -> dict[str, Any]:
    """Run one point in a fresh child; adds the child's ``ru_maxrss``; a row with ``skipped`` on failure."""
    out = Path(args.out).with_suffix(f".{engine}-{ipc}.tmp.json")
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{engine}:{ipc}", "--child-out", str(out)]
    proc = subprocess.Popen(cmd)
    timer = threading.Timer(args.point_timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.is_file():
        why = f"killed after {args.point_timeout} s (--point-timeout)" if proc.returncode == -9 else "child failed"
        return {"engine": engine, "ipc": ipc, "skipped": f"{why}, exit code {proc.returncode}"}
    row = json.loads(out.read_text())
    out.unlink()
    row["maxrss_mib"] = round(usage.ru_maxrss / 1024)
    return row


def _acc(r: dict[str, Any]) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}"


def table_row(r: dict[str, Any]) -> str:
    """One markdown row (the published numbers beside the measured ones)."""
    eng, ipc = r["engine"], r["ipc"]
    pub = f"{PUBLISHED[eng][ipc]} / {PUBLISHED['random'][ipc]}"
    if "skipped" in r:
        return f"| {eng} | {ipc} | – | – | – | – | – | – | – | {pub} | skipped: {r['skipped']} |"
    acc = _acc(r["accuracy"])
    notes = []
    if r["labels"] == "soft":
        acc += " (soft labels)"
        notes.append(f"same images, hard labels: {_acc(r['hard_label'])}")
    if "expert_seconds" in r:
        built = r["expert_seconds"] > 5  # else loaded from the disk cache
        notes.append(f"expert buffer {'built in' if built else 'loaded from cache in'} {r['expert_seconds']} s")
    notes.append(f"first it {r['first_it']:.1f} s, distill {r['distill_seconds']} s, eval {r['eval_seconds']} s")
    return (
        f"| {eng} | {ipc} | {r['iterations']} | {r['s_it']:.3f} | {r['distill_peak_mib']} | {r['maxrss_mib']} "
        f"| {acc} | {_acc(r['random_subset'])} | {r['accuracy']['mean'] - r['random_subset']['mean']:+.2f} "
        f"| {pub} | {'; '.join(notes)} |"
    )


def header(args: argparse.Namespace) -> list[str]:
    """Title, machine, command and protocol of the results file."""
    iters = ", ".join(f"{e} {args.iters_text(e)} (paper {PAPER_ITERATIONS[e]})" for e in args.engines)
    experts = " ".join(f"method.{k}" for k in args.expert.split(",") if k)
    return [
        f"# Engines on Fashion-MNIST (CPU protocol), {datetime.date.today()}",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/engines.py {' '.join(sys.argv[1:])}`",
        "",
        f"Each point equals `fedistill central {' '.join(overrides(args, '<engine>', '<IPC>'))}` "
        f"(MTT/TESLA add `{experts}`), run in a fresh child process with 1 torch thread.",
        "",
        f"Protocol (all engines): ConvNet-3 width {args.width} (instance norm, avg pool) for distillation and "
        f"evaluation; each engine's defaults (its config dataclass; DC/DSA: the reference (outer, inner) "
        f"schedule by IPC); seed {args.seed}; iterations: {iters}. MTT/TESLA expert buffer: "
        f"`{experts}` (the digits defaults are 3 experts x 10 epochs at batch 32; the paper's 100 x 50 at "
        f"batch 256). Evaluation: `evaluate_synthetic` with the central eval config: {args.epochs} epochs with "
        f"DSA, SGD lr 0.01 (soft labels: KD T=4 at lr 0.1), momentum 0.9, wd 5e-4, batch 256, lr x0.1 at half, "
        f"final-epoch test accuracy, {args.runs} runs (fixed seeds, shared by the set and its random real "
        "subset of the same per-class size).",
        "",
        "Differences from the published protocol: width 128 -> "
        f"{args.width}; iterations above instead of the papers'; evaluation {args.epochs} epochs x {args.runs} runs "
        "instead of 1000 epochs (DSA/DM/MTT) x 5+ runs; MTT/TESLA experts far fewer and shorter; no ZCA; "
        "10% of every training class held out as validation (54k training images). Published numbers (% , "
        "ConvNet-128, REFERENCE.md section 1) are engine / random subset; '(recalled)' marks secondary copies.",
        "",
        "s/it: median over iterations after the first. distill Δ MiB: peak RSS the distillation adds (VmHWM reset "
        "after data and experts are loaded). maxrss MiB: whole child process (ru_maxrss via os.wait4). Accuracy: %, "
        "mean ± std over the runs. Δ: engine minus random subset.",
        "",
        "| engine | IPC | iterations | s/it | distill Δ MiB | maxrss MiB | accuracy | random subset | Δ | "
        "published (engine / random) | notes |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--iterations", default="", help="per engine and IPC: dm=300,dc@10=5 (engine@ipc wins)")
    p.add_argument("--default-iterations", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert", default="num_experts=2,expert_train_epochs=6,expert_batch=256")
    p.add_argument("--point-timeout", type=float, default=1800.0, help="seconds before a point is killed")
    p.add_argument("--deadline", default=None, help="UTC HH:MM after which no point starts")
    p.add_argument("--out", default=None, help="markdown path (default benchmarks/results/engines_fmnist-DATE.md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.engines = args.engines.split(",")
    spec = dict(kv.split("=") for kv in args.iterations.split(",") if kv)
    args.out = args.out or str(results_path("engines_fmnist"))
    if args.child:
        engine, ipc = args.child.split(":")
        args.iters = {engine: int(spec.get(f"{engine}@{ipc}", spec.get(engine, args.default_iterations)))}
        row = run_point(args, engine, int(ipc))
        Path(args.child_out).write_text(json.dumps(row))
        return
    md, js = Path(args.out), Path(args.out).with_suffix(".jsonl")
    ipcs = [int(i) for i in args.ipcs.split(",")]
    args.iters = {}

    def iters_text(e: str) -> str:
        return " / ".join(f"{spec.get(f'{e}@{i}', spec.get(e, args.default_iterations))} at IPC {i}" for i in ipcs)

    args.iters_text = iters_text
    md.write_text("\n".join(header(args)) + "\n")
    js.write_text("")
    for ipc in ipcs:
        for engine in args.engines:
            args.iters[engine] = int(spec.get(f"{engine}@{ipc}", spec.get(engine, args.default_iterations)))
            now = datetime.datetime.now(datetime.UTC).strftime("%H:%M")
            if args.deadline and now >= args.deadline:
                row = {"engine": engine, "ipc": ipc, "skipped": f"not started: past the --deadline {args.deadline} UTC"}
            else:
                row = measure(args, engine, ipc)
                row.setdefault("iterations", args.iters[engine])
            print(json.dumps(row), flush=True)
            with md.open("a") as f:
                f.write(table_row(row) + "\n")
            with js.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
