"""Every engine with its defaults, as a user types it: ``fedistill central dataset=D method=M ipc=I seed=S``.

Each point is one ``fedistill central`` subprocess with nothing but the dataset, the engine,
the IPC and the seed on the command line, so the results show exactly what a new user gets
(the engine's defaults: its config dataclass, through ``configs/method/<engine>.yaml``, the dataset-aware defaults of
``configs/dataset_model`` and ``configs/dataset_method``, the central evaluation recipe).
The results are ``fedistill report`` over the run directories (``--workdir``, kept),
rewritten after every point, so a stopped benchmark keeps what it measured:
``benchmarks/results/<out>-<date>.md`` has per engine and IPC the test accuracy of the set
and of the random real subset of the same size under the same recipe and seeds (mean ±
std over the seeds), their difference, on how many seeds the set beat its own control,
the seconds to distill and evaluate and the peak resident memory of the process tree;
failed runs are listed, and every warning a run printed (below the random subset on the
validation split, or chance level) is in the notes. ``.csv`` has one row per run (its
warnings included) and ``.html`` the synthetic sets' thumbnails.

    python benchmarks/defaults.py --dataset digits --ipcs 1,10 --seeds 0,1,2
    python benchmarks/defaults.py --dataset fashion_mnist --engines dm,dc --ipcs 1
"""

from __future__ import annotations

import argparse
import itertools

from _common import point_status, report_results, results_header, run_point, workdir

ENGINES = "dm,dm_hom,dc,dsa,mtt,tesla,rded,sre2l,gen,dp_dm,dp_dc,dp_dsa"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--engines", default=ENGINES)
    ap.add_argument("--ipcs", default="1,10")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--out", default=None, help="results name (default defaults_<dataset>)")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    opts = ap.parse_args()
    name = opts.out or f"defaults_{opts.dataset}"
    work = workdir(opts.workdir, "defaults")
    extra = opts.extra.split()
    header = results_header(
        f"Engine defaults on {opts.dataset} (`fedistill central`, nothing but dataset, method, ipc, seed)",
        f"Every point: `fedistill central dataset={opts.dataset} method=M ipc=I seed=S {' '.join(extra)}`; run "
        f"directories under {work}.",
        "vs random: test accuracy minus the random real subset of the same size (same recipe, same evaluation "
        "seeds); above random: the seeds on which the set beat its own control. The notes list every warning "
        "a run printed (below the random subset on the validation split, or chance level).",
    )
    grid = itertools.product(opts.engines.split(","), opts.ipcs.split(","), opts.seeds.split(","))
    for engine, ipc, seed in grid:
        args = [f"dataset={opts.dataset}", f"method={engine}", f"ipc={ipc}", f"seed={seed}", *extra]
        summary, wall, _, rc = run_point(args, work / f"{engine}-{ipc}-{seed}", command="central")
        status = point_status(summary, rc, wall)
        print(f"{engine} ipc={ipc} seed={seed}: {status}; {report_results([work], name, header)}")


if __name__ == "__main__":
    main()
