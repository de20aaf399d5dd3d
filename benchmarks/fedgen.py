"""FedGen against one-shot pixel payloads: accuracy and uplink bytes, as real `fedistill simulate` runs.

Points (same dataset, clients, alpha, ipc, server recipe): ``strategy=oneshot`` with
each ``--oneshot-methods`` engine (clients upload float32 pixels), and ``strategy=fedgen``
(a federated generator, then latents + labels). The run directories stay under
``--workdir``; the results, rewritten after every point, are ``fedistill report`` over them
(``benchmarks/results/<out>-<date>.md``, ``.csv``, ``.html``: accuracy, the random-subset
control, total uplink, seconds, peak GB, the Pareto front of accuracy against uplink,
failed runs with their error) followed by the payload table: for fedgen the uplink split
into phase 1 (the generator's FedAvg rounds) and phase 2 (the latents), the pixel bytes of
the same decoded images, and the downlink.

    python benchmarks/fedgen.py --dataset fashion_mnist --clients 10 --alpha 0.1 \\
        --extra "strategy.server.epochs=100" --out fedgen_fmnist
"""

from __future__ import annotations

import argparse

from _common import point_status, report_results, results_header, run_point, workdir

from fedistill.report_render import Table

HEADERS = ("strategy", "method", "phase 1 MB", "phase 2 MB", "phase 2 as pixels MB", "payload ratio", "downlink MB")
"""The payload table (accuracy, the random-subset control, total uplink, seconds, peak GB: the report's)."""


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def row(strategy: str, method: str, s: dict) -> tuple[str, ...]:
    """One payload-table row from a run's summary (``-``: not in it, e.g. a failed run)."""
    up = s.get("uplink") or {}
    ratio = up.get("payload_saving_ratio")
    phases = (_mb(up.get("phase1_bytes")), _mb(up.get("phase2_bytes", s.get("bytes_up"))))
    pixels = (_mb(up.get("phase2_pixel_equivalent_bytes")), "-" if ratio is None else f"{ratio:.1f}x")
    return (strategy, method, *phases, *pixels, _mb(s.get("bytes_down")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--oneshot-methods", default="gen", help="engines of the pixel-payload oneshot points")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--fedgen-extra", default="", help="overrides for the fedgen point only (strategy.gen_rounds=5)")
    ap.add_argument("--out", default="fedgen")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    opts = ap.parse_args()
    work = workdir(opts.workdir, "fedgen")
    header = results_header(
        f"FedGen vs one-shot pixel payloads ({opts.dataset}, {opts.clients} clients, alpha {opts.alpha})",
        "Each point is one `fedistill simulate` subprocess (Flower simulation engine on Ray). Uplink counts\n"
        "every reply byte (arrays plus JSON metadata/metrics). Phase 1: fedgen's generator rounds (each\n"
        "client uploads the whole CVAE every round). Phase 2 as pixels: the same decoded images sent as\n"
        "float32 pixels + int64 labels; payload ratio: pixel arrays / latent arrays.",
    )
    common = [f"dataset={opts.dataset}", f"clients={opts.clients}", f"alpha={opts.alpha}"]
    common += opts.extra.split() if opts.extra else []
    points = [("oneshot", m, [f"method={m}"]) for m in opts.oneshot_methods.split(",") if m]
    points.append(("fedgen", "gen", opts.fedgen_extra.split()))
    rows: list[tuple[str, ...]] = []
    for strategy, method, args in points:
        out = work / f"{strategy}-{method}"
        s, wall, _, rc = run_point([f"strategy={strategy}", *args, *common], out)
        rows.append(row(strategy, method, s))
        status = point_status(s, rc, wall)
        table = Table("Payloads", HEADERS, rows)
        print(f"{out.name}: {status}; {report_results([work], opts.out, header, [table])}")


if __name__ == "__main__":
    main()
