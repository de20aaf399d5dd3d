"""Privacy benchmark: accuracy against epsilon for DP distillation, and the membership audit.

Points (Fashion-MNIST, IPC 10 by default, delta 1e-5): central ``dp_dm`` and ``dp_dc``
and federated ``oneshot`` with ``dp_dm`` at each epsilon (``inf`` = the same engine with
a negligible noise multiplier, so clipping and noise init stay identical), then
``fedistill audit`` on chosen runs (loss-threshold and offline-LiRA AUC / TPR at 1% FPR
of the synthetic set and of a real subset of matched accuracy). Every point is a real CLI
subprocess into its own directory under ``--workdir`` (kept; a finished point found there
is not run again). The results are ``fedistill report`` over the run directories,
rewritten after every point, so an interrupted run keeps what it measured:
``benchmarks/results/<out>-<date>.md`` (per mode and target epsilon, shown in the group
label: accuracy, the random-subset control beside, the epsilon spent, the most any client
spent in the federated modes; failed runs listed), then the membership-audit table;
``.csv`` (one row per run) and ``.html`` (accuracy against the epsilon spent, one line per
mode).

    python benchmarks/privacy.py --dataset fashion_mnist --epsilons 1,2,5,10,inf \\
        --modes central-dp_dm,central-dp_dc,oneshot10-dp_dm --audit central-dp_dm@1,central-dp_dm@10 \\
        --out privacy_fmnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import point_status, report_results, results_header, run_point, workdir

from fedistill.privacy.report import AUDITED
from fedistill.report_render import Table

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


AUDIT_HEADERS = (
    "run",
    "trained on",
    "images",
    "test acc %",
    "loss AUC",
    "loss TPR@1%FPR",
    "LiRA AUC",
    "LiRA TPR@1%FPR",
)


def audit_table(audits: dict[str, dict]) -> Table:
    """The membership audits (point -> its ``audit.json``) as a table: one row per audited model."""
    rows = []
    for point, result in audits.items():
        for r, name in ((result[key], name) for key, name in AUDITED if key in result):
            loss, lira = r["loss_attack"], r["lira"]
            attacks = (loss["auc"], loss["tpr_at_1pct_fpr"], lira["auc"], lira["tpr_at_1pct_fpr"])
            rows.append(
                (point, name, str(r["train_images"]), f"{r['test_accuracy']:.2f}", *(f"{x:.3f}" for x in attacks))
            )
    title = "Membership audit (`fedistill audit`; members: training records, non-members: test records)"
    return Table(title, AUDIT_HEADERS, rows)


def _done(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "done"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--epsilons", default="1,2,5,10,inf")
    ap.add_argument("--modes", default="central-dp_dm,central-dp_dc,oneshot10-dp_dm")
    ap.add_argument("--audit", default="central-dp_dm@1,central-dp_dm@10,central-dp_dm@inf")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--out", default="privacy_fmnist")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    args = ap.parse_args()
    work = workdir(args.workdir, "priv")
    common = [f"dataset={args.dataset}", f"ipc={args.ipc}", "model.width=32", "device=cpu"]
    header = results_header(
        f"Privacy benchmark ({args.dataset}, IPC {args.ipc}, delta 1e-5)",
        f"Every point: `fedistill <cmd> {' '.join(common)} <mode overrides> method.epsilon=E` with the modes "
        f"{json.dumps(MODES)}; run directories under {work}. `inf` = the same DP engine with sigma 1e-6 "
        "(clipping and noise init unchanged): method.epsilon=None, method.sigma=1e-06 in the group label. "
        "Epsilon: spent (central), the most any client spent (simulate).",
    )
    audits: dict[str, dict] = {}
    for mode in filter(None, args.modes.split(",")):
        cmd, extra = MODES[mode]
        for eps in args.epsilons.split(","):
            run = work / f"{mode}-eps{eps}"
            if _done(run):  # resume: keep it
                status = "done (kept)"
            else:
                summary, wall, _, rc = run_point([*common, *extra, *_eps_args(eps)], run, command=cmd)
                status = point_status(summary, rc, wall)
            print(f"{mode} epsilon={eps}: {status}; {report_results([work], args.out, header)}", flush=True)
    for point in filter(None, args.audit.split(",")):
        mode, eps = point.split("@")
        run = work / f"{mode}-eps{eps}"
        audit_args = [str(run), "members=500", "shadows=4", "epochs=100", "device=cpu"]
        summary, wall, _, rc = run_point(audit_args, run / "audit", command="audit")
        if rc == 0:
            audits[point] = json.loads((run / "audit" / "audit.json").read_text())
        results = report_results([work], args.out, header, [audit_table(audits)])
        print(f"audit {point}: {point_status(summary, rc, wall)}; {results}", flush=True)


if __name__ == "__main__":
    main()
