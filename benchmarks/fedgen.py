"""FedGen against one-shot pixel payloads: accuracy and uplink bytes, as real `fedistill simulate` runs.

Points (same dataset, clients, alpha, ipc, server recipe): ``strategy=oneshot`` with
each ``--oneshot-methods`` engine (clients upload float32 pixels), and ``strategy=fedgen``
(a federated generator, then latents + labels). For fedgen the table splits the uplink
into phase 1 (the generator's FedAvg rounds) and phase 2 (the latents) and gives the
pixel bytes of the same decoded images. Results go to a dated markdown table under
``benchmarks/results/`` after every point.

    python benchmarks/fedgen.py --dataset fashion_mnist --clients 10 --alpha 0.1 \\
        --extra "strategy.server.epochs=100" --out fedgen_fmnist
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import append_row, machine_info, results_path, run_point

HEADER = [
    "| strategy | method | accuracy % | random subset % | uplink MB (total) | phase 1 MB | phase 2 MB "
    "| phase 2 as pixels MB | payload ratio | downlink MB | wall s | peak GB | status |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def row(strategy: str, method: str, s: dict, wall: float, peak: int, rc: int) -> str:
    """One table row from a run's summary."""
    base = (s.get("baselines") or {}).get("random_subset") or {}
    up = s.get("uplink") or {}
    ratio = up.get("payload_saving_ratio")
    return (
        f"| {strategy} | {method} | {s.get('final_accuracy', float('nan')):.2f} "
        f"| {base.get('accuracy', float('nan')):.2f} | {_mb(s.get('bytes_up', 0))} | {_mb(up.get('phase1_bytes'))} "
        f"| {_mb(up.get('phase2_bytes', s.get('bytes_up')))} | {_mb(up.get('phase2_pixel_equivalent_bytes'))} "
        f"| {'-' if ratio is None else f'{ratio:.1f}x'} | {_mb(s.get('bytes_down', 0))} | {wall:.0f} "
        f"| {peak / 2**30:.2f} | {'ok' if rc == 0 else s.get('error', 'failed')} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--oneshot-methods", default="gen", help="engines of the pixel-payload oneshot points")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--fedgen-extra", default="", help="overrides for the fedgen point only (strategy.gen_rounds=5)")
    ap.add_argument("--out", default="fedgen")
    opts = ap.parse_args()
    path = results_path(opts.out)
    lines = [
        f"# FedGen vs one-shot pixel payloads ({opts.dataset}, {opts.clients} clients, alpha {opts.alpha})",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `python benchmarks/fedgen.py {' '.join(sys.argv[1:])}`",
        "",
        "Each point is one `fedistill simulate` subprocess (Flower simulation engine on Ray). Uplink counts",
        "every reply byte (arrays plus JSON metadata/metrics). Phase 1: fedgen's generator rounds (each",
        "client uploads the whole CVAE every round). Phase 2 as pixels: the same decoded images sent as",
        "float32 pixels + int64 labels; payload ratio: pixel arrays / latent arrays.",
        "",
        *HEADER,
    ]
    path.write_text("\n".join(lines) + "\n")
    common = [f"dataset={opts.dataset}", f"clients={opts.clients}", f"alpha={opts.alpha}"]
    common += opts.extra.split() if opts.extra else []
    points = [("oneshot", m, [f"method={m}"]) for m in opts.oneshot_methods.split(",") if m]
    points.append(("fedgen", "gen", opts.fedgen_extra.split()))
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, method, args in points:
            out = Path(tmp) / f"{strategy}-{method}"
            s, wall, peak, rc = run_point([f"strategy={strategy}", *args, *common], out)
            line = row(strategy, method, s, wall, peak, rc)
            append_row(path, line)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
