"""Federated benchmark: `fedistill simulate` strategies on a dataset, as real subprocesses.

Every (strategy, policy, clients, alpha, seed) point is one CLI run into its own directory
(``--workdir``, kept); :func:`_common.run_point` records the peak resident memory of the
whole process tree (Ray's GCS, raylet and workers are descendants of the driver) beside it.
The results are ``fedistill report`` over those directories, rewritten after every run, so a
stopped benchmark keeps what it measured: ``benchmarks/results/<out>-<date>.md`` (mean ± std
over seeds per setting, the random-subset control beside, uplink, seconds, peak GB, the
Pareto front of accuracy against uplink, failed runs listed), ``.csv`` (one row per run) and
``.html`` (accuracy against rounds and against cumulative uplink).

    python benchmarks/federated.py --dataset fashion_mnist --strategies oneshot,feddm,fedavg \\
        --clients 10,100 --alphas 0.1,0.5 --seeds 0,1,2 --out federated_fmnist
    python benchmarks/federated.py --dataset digits --strategies fedavg,fedaf,dynafed --policies union,screen \\
        --clients 10 --alphas 0.1 --out federated_digits

``--policies`` varies the server policy of the strategies that receive synthetic sets
(``fedavg`` and ``dynafed`` run once).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

from _common import machine_info, point_status, report_results, run_point

MODEL_STRATEGIES = {"fedavg", "dynafed"}
"""Strategies whose clients send models: the server policy does not apply."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--strategies", default="oneshot,feddm,fedavg")
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--alphas", default="0.1,0.5")
    ap.add_argument("--policies", default="union", help="server policies for the synthetic-set strategies")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--out", default="federated")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    opts = ap.parse_args()
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="fd-federated-"))
    extra = opts.extra.split() if opts.extra else []
    header = "\n".join(
        [
            f"# Federated benchmark ({opts.dataset})",
            "",
            f"Machine: {machine_info()}",
            "",
            f"Command: `python benchmarks/federated.py {' '.join(sys.argv[1:])}`; every point is one "
            f"`fedistill simulate dataset={opts.dataset} strategy=S [policy=P] clients=N alpha=A seed=K "
            f"{' '.join(extra)}` (Flower's simulation engine on Ray, a local cluster); run directories under {work}.",
            "",
            "Accuracy: the global model on the real test set after the last round. Peak GB: resident memory of",
            "the whole process tree (driver, Ray GCS/raylet, workers), sampled every 0.5 s.",
        ]
    )
    for strategy in opts.strategies.split(","):
        policies = ["-"] if strategy in MODEL_STRATEGIES else opts.policies.split(",")
        grid = itertools.product(policies, opts.clients.split(","), opts.alphas.split(","), opts.seeds.split(","))
        for policy, clients, alpha, seed in grid:
            args = [f"dataset={opts.dataset}", f"strategy={strategy}", f"clients={clients}", f"alpha={alpha}"]
            args += [f"seed={seed}"] + ([] if policy == "-" else [f"policy={policy}"])
            out = work / f"{strategy}-{policy}-c{clients}-a{alpha}-s{seed}"
            s, wall, _, rc = run_point([*args, *extra], out)
            status = point_status(s, rc, wall)
            print(f"{out.name}: {status}; {report_results([work], opts.out, header)}", flush=True)


if __name__ == "__main__":
    main()
