"""Margins of the suite's federated "beats random real images" claims, over seeds.

The end-to-end tests run each digits configuration once (seed 0) and assert a margin over the
random real subset of the same size; a Ray run per seed per test would not fit the suite's time
budget. This benchmark runs the tests' own configurations (imported from ``tests/``, so the two
cannot drift apart) on every seed given, as real ``fedistill simulate`` subprocesses, and writes
the ``fedistill report`` of them: mean ± std of accuracy and of the random-subset control per
configuration, and on how many seeds the run beat its control. A test's threshold is then set
from that spread, not from one seeded run.

    python benchmarks/margins.py --seeds 0,1,2 --out margins_digits
"""

from __future__ import annotations

import argparse
import sys

from _common import REPO, point_status, report_results, results_header, run_point, workdir

sys.path.insert(0, str(REPO / "tests"))

from test_simulate import FEDDM, ONESHOT
from test_simulate_aggfree import DYNAFED, FEDAF

CLAIMS = {"oneshot": ONESHOT, "feddm": FEDDM, "fedaf": FEDAF, "dynafed": DYNAFED}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--claims", default=",".join(CLAIMS), help=f"which of {sorted(CLAIMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="margins_digits")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    opts = ap.parse_args()
    work = workdir(opts.workdir, "margins")
    names = opts.claims.split(",")
    unknown = sorted(set(names) - set(CLAIMS))
    if unknown:
        ap.error(f"--claims: unknown {unknown}; valid: {sorted(CLAIMS)}")
    header = results_header(
        "Margins of the suite's federated claims (digits)",
        "Every point is one `fedistill simulate` of a test's configuration with `seed=K` (Flower's "
        f"simulation engine on Ray); run directories under {work}.",
        "\n".join(f"- {name}: `{' '.join(CLAIMS[name])}`" for name in names),
    )
    for name in names:
        for seed in opts.seeds.split(","):
            out = work / f"{name}-s{seed}"
            summary, wall, _, code = run_point([*CLAIMS[name], f"seed={seed}"], out)
            print(f"{name} seed {seed}: {point_status(summary, code, wall)}", flush=True)
            print(report_results([work], opts.out, header), flush=True)


if __name__ == "__main__":
    main()
