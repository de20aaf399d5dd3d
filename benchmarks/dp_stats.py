"""Federated DP utility: aggregate-then-distill (``strategy=dp_stats``) against per-client DP distillation.

Every point is a real ``fedistill simulate`` subprocess (Flower's simulation engine on Ray)
with the user's defaults plus the overrides of its mode; 3 seeds by default. The results
are ``fedistill report`` over the run directories (rewritten after every run, so an
interrupted benchmark keeps what it measured): mean ± std per setting, each run's
random-subset control (real, non-private images of the same class counts, same server
recipe) beside it, uplink and the most any client spent of epsilon; ``.csv`` per run.

    python benchmarks/dp_stats.py --dataset digits --clients 10 --alpha 0.5 --epsilons 2 \\
        --modes dp_stats,dp_stats-secure,oneshot-dp_dm --seeds 0,1,2 --out dp_stats_digits
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import machine_info, point_status, report_results, run_point

#: mode -> overrides (on top of dataset, clients, alpha, epsilon, seed).
MODES: dict[str, list[str]] = {
    "dp_stats": ["strategy=dp_stats", "strategy.secure_aggregation=false"],
    "dp_stats-secure": ["strategy=dp_stats", "strategy.secure_aggregation=true"],
    # per-client DP distillation with the same engine settings (the user's default model)
    "oneshot-dp_dm": ["strategy=oneshot", "method=dp_dm"],
    # ... and with dp_stats' model on digits (two ConvNet blocks: configs/dataset_model/digits_convnet_dp_stats.yaml)
    "oneshot-dp_dm-depth2": ["strategy=oneshot", "method=dp_dm", "model.depth=2"],
}


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
    common = [f"dataset={args.dataset}", f"clients={args.clients}", f"alpha={args.alpha}", *args.extra.split()]
    header = (
        f"# Federated DP: aggregate-then-distill vs per-client distillation ({args.dataset}, {args.clients} clients, "
        f"alpha {args.alpha})\n\nMachine: {machine_info()}\n\nCommand: `python benchmarks/dp_stats.py "
        f"{' '.join(sys.argv[1:])}`; every run: `fedistill simulate {' '.join(common)} <mode> method.epsilon=E "
        f"seed=S` with the modes {json.dumps(MODES)}. Accuracy is the global model's on the test split; the "
        "random real subset is each run's control (non-private real images, same class counts and server recipe)."
    )
    for eps in args.epsilons.split(","):
        for mode in args.modes.split(","):
            for seed in args.seeds.split(","):
                overrides = [*common, *MODES[mode], f"method.epsilon={eps}", f"seed={seed}"]
                summary, wall, _, rc = run_point(overrides, work / f"{mode}-e{eps}-s{seed}")
                status = point_status(summary, rc, wall)
                print(f"{mode} epsilon={eps} seed={seed}: {status}; {report_results([work], args.out, header)}")


if __name__ == "__main__":
    main()
