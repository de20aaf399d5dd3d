"""Privacy benchmark: accuracy against epsilon for DP distillation, and the membership audit.

Points (Fashion-MNIST, IPC 10 by default, delta 1e-5): central ``dp_dm`` and ``dp_dc``
and federated ``oneshot`` with ``dp_dm`` at each epsilon (``inf`` = the same engine with
a negligible noise multiplier, so clipping and noise init stay identical), then
``fedistill audit`` on chosen runs (loss-threshold and offline-LiRA AUC / TPR at 1% FPR
of the synthetic set and of a real subset of matched accuracy). Every point is a real CLI
subprocess; the markdown table under ``benchmarks/results/`` is rewritten after each one,
so an interrupted run keeps what it measured.

    python benchmarks/privacy.py --dataset fashion_mnist --epsilons 1,2,5,10,inf \\
        --modes central-dp_dm,central-dp_dc,oneshot10-dp_dm --audit central-dp_dm@1,central-dp_dm@10 \\
        --out privacy_fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info, results_path

REPO = Path(__file__).resolve().parents[1]

#: CPU protocol per mode: the CLI command and its overrides (width-32 ConvNet everywhere).
MODES: dict[str, tuple[str, list[str]]] = {
    "central-dp_dm": ("central", ["method=dp_dm", "method.batch_real=256", "eval.runs=2"]),
    "central-dp_dc": (
        "central",
        [
            "method=dp_dc",
            "method.iterations=10",
            "method.outer_loop=5",
            "method.inner_loop=10",
            "method.batch_real=128",
            "eval.runs=2",
        ],
    ),
    "oneshot10-dp_dm": ("simulate", ["method=dp_dm", "clients=10", "alpha=0.5", "method.batch_real=256"]),
    "oneshot100-dp_dm": ("simulate", ["method=dp_dm", "clients=100", "alpha=0.5", "method.iterations=200"]),
}


def _eps_args(eps: str) -> list[str]:
    return ["method.epsilon=null", "method.sigma=1e-6"] if eps == "inf" else [f"method.epsilon={eps}"]


def _cli(args: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedistill.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    err = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
    return proc.returncode, time.perf_counter() - start, err


def _row(mode: str, eps: str, run: Path, wall: float, err: str) -> dict:
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    p = s.get("privacy") or {}
    if "accuracy" in s:  # central
        acc, rnd = s["accuracy"]["mean"], s["baselines"]["random_subset"]["mean"]
        spent = p.get("epsilon_spent")
    else:
        acc, rnd = s.get("final_accuracy"), ((s.get("baselines") or {}).get("random_subset") or {}).get("accuracy")
        spent = p.get("epsilon_max")
    return {
        "mode": mode,
        "epsilon": eps,
        "spent": spent,
        "acc": acc,
        "random": rnd,
        "wall": wall,
        "error": err,
        "run": str(run),
    }


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write(path: Path, header: str, rows: list[dict], audits: list[dict]) -> None:
    lines = [
        header,
        "",
        "| mode | target epsilon | epsilon spent (max client) | accuracy % | random real subset % | wall s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['epsilon']} | {_fmt(r['spent'], 3)} | {_fmt(r['acc'])} | {_fmt(r['random'])} "
            f"| {r['wall']:.0f} | {r['error']} |"
        )
    if audits:
        lines += [
            "",
            "Membership audit (`fedistill audit`, members = training records, non-members = test records):",
            "",
            "| run | trained on | images | test acc % | loss AUC | loss TPR@1%FPR | LiRA AUC | LiRA TPR@1%FPR |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a in audits:
            for key, name in (("synthetic", "synthetic set"), ("matched_real_subset", "real subset, matched acc")):
                if key in a["result"]:
                    r = a["result"][key]
                    lines.append(
                        f"| {a['point']} | {name} | {r['train_images']} | {r['test_accuracy']:.2f} "
                        f"| {r['loss_attack']['auc']:.3f} | {r['loss_attack']['tpr_at_1pct_fpr']:.3f} "
                        f"| {r['lira']['auc']:.3f} | {r['lira']['tpr_at_1pct_fpr']:.3f} |"
                    )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--epsilons", default="1,2,5,10,inf")
    ap.add_argument("--modes", default="central-dp_dm,central-dp_dc,oneshot10-dp_dm")
    ap.add_argument("--audit", default="central-dp_dm@1,central-dp_dm@10,central-dp_dm@inf")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--out", default="privacy_fmnist")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fd-priv-"))
    path = results_path(args.out)
    common = [f"dataset={args.dataset}", f"ipc={args.ipc}", "model.width=32", "device=cpu"]
    header = (
        f"# Privacy benchmark ({args.dataset}, IPC {args.ipc}, delta 1e-5)\n\nMachine: {machine_info()}\n\n"
        f"Command: `python benchmarks/privacy.py {' '.join(sys.argv[1:])}`; every point: `fedistill <cmd> "
        f"{' '.join(common)} <mode overrides> method.epsilon=E` (see MODES in the script). "
        "`inf` = the same DP engine with sigma 1e-6 (clipping and noise init unchanged)."
    )
    rows: list[dict] = []
    audits: list[dict] = []
    for mode in filter(None, args.modes.split(",")):
        cmd, extra = MODES[mode]
        for eps in args.epsilons.split(","):
            run = work / f"{mode}-eps{eps}"
            done = run / "summary.json"
            if done.is_file() and json.loads(done.read_text()).get("status") == "done":  # resume: keep it
                wall, err = float(json.loads((run / "wall.json").read_text())["wall"]), ""
            else:
                _, wall, err = _cli([cmd, *common, *extra, *_eps_args(eps), f"hydra.run.dir={run}"])
                (run / "wall.json").write_text(json.dumps({"wall": wall}))
            rows.append(_row(mode, eps, run, wall, err))
            print(rows[-1], flush=True)
            write(path, header, rows, audits)
    for point in filter(None, args.audit.split(",")):
        mode, eps = point.split("@")
        run = work / f"{mode}-eps{eps}"
        code, wall, err = _cli(["audit", str(run), "members=500", "shadows=4", "epochs=100", "device=cpu"])
        if code == 0:
            audits.append({"point": point, "result": json.loads((run / "audit" / "audit.json").read_text())})
        print(point, code, round(wall), err, flush=True)
        write(path, header, rows, audits)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
