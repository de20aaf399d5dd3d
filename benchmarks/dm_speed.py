"""DM iteration speed: fedistill's DMEngine vs a per-class-loop fp32 reference.

Both do the same math per iteration (Zhao & Bilen DM): a fresh random ConvNet, for
every class 256 real images and the class's synthetic images under one shared DSA
draw, loss = sum_c ||mean embed(real_c) - mean embed(syn_c)||^2, one backward and
one SGD step (lr 1, momentum 0.5) on the synthetic images.

* ``reference``: the straightforward loop of the original code, fp32, eager, one
  class at a time, ``nn.AvgPool2d`` ConvNet.
* ``fedistill``: ``build_engine("dm", ...)`` with its defaults (batched classes,
  chunked bf16 real branch where the CPU has bf16, ``torch.compile`` for long runs;
  forced on here with ``compile=True`` so the benchmark measures the long-run path).

Timing: the two variants alternate in one process; every round runs ``--iters``
timed iterations of each after one warm-up iteration (for fedistill the compile and
the first iteration are excluded and reported separately as ``first``). Reported:
the median over all timed iterations. Memory: in a fresh child process per variant,
``VmHWM`` (reset through ``/proc/self/clear_refs`` after loading the data) minus the
RSS at the reset, i.e. the peak resident memory the iterations add. GFLOP/s:
conv/linear FLOPs of one iteration (real forward + synthetic
forward and input-gradient backward, counted by ``FlopCounterMode``) / median time.

Run: ``.venv/bin/python benchmarks/dm_speed.py [--widths 32,128] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import machine_info, results_path
from torch import nn

from fedistill.augment import DSA, DSAConfig
from fedistill.data import load_dataset
from fedistill.engines import build_engine
from fedistill.models import ConvNet, reinitialize
from fedistill.seeding import torch_generator

IPC, BATCH_REAL = 10, 256


def reference_net(info, width: int) -> nn.Module:
    """The fedistill ConvNet with ``nn.AvgPool2d`` as in the reference code."""
    net = ConvNet(channels=info.channels, num_classes=info.num_classes, image_size=info.image_size, width=width)
    for i, m in enumerate(net.features):
        if type(m).__name__ == "AvgPool2x2":
            net.features[i] = nn.AvgPool2d(2, 2)
    return net.requires_grad_(False)


class Reference:
    """Per-class loop, fp32, eager (the original DM code's structure)."""

    def __init__(self, data, width: int, seed: int = 0):
        self.data, self.info = data, data.info
        self.net = reference_net(data.info, width)
        self.index = [torch.nonzero(data.labels == c).flatten() for c in range(data.info.num_classes)]
        g = torch_generator(seed, "ref-init")
        init = [data.images[ix[torch.randperm(len(ix), generator=g)[:IPC]]] for ix in self.index]
        self.syn = torch.cat(init).requires_grad_(True)
        self.opt = torch.optim.SGD([self.syn], lr=1.0, momentum=0.5)
        self.dsa = DSA(DSAConfig(flip=data.info.flip))
        self.gen = torch_generator(seed, "ref-dsa")
        self.it = 0

    def step(self) -> float:
        reinitialize(self.net, 1000 + self.it)
        self.it += 1
        loss = torch.zeros(())
        for c, ix in enumerate(self.index):
            real = self.data.images[ix[torch.randperm(len(ix), generator=self.gen)[:BATCH_REAL]]]
            syn = self.syn[c * IPC : (c + 1) * IPC]
            params = self.dsa.sample(1, self.gen, image_size=self.info.image_size)
            g_real = torch.zeros(len(real), dtype=torch.long)
            g_syn = torch.zeros(len(syn), dtype=torch.long)
            with torch.no_grad():
                r = self.net.embed(self.dsa.apply(real, params, g_real)).mean(0)
            s = self.net.embed(self.dsa.apply(syn, params, g_syn)).mean(0)
            loss = loss + ((r - s) ** 2).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss)


def fedistill_times(data, width: int, iters: int, seed: int) -> tuple[float, list[float]]:
    """Run DMEngine for ``iters + 1`` iterations; (first incl. compile, later per-iteration times)."""
    torch._dynamo.reset()  # a fresh compile each round, as in a real run (warm inductor cache)
    stamps: list[float] = []
    eng = build_engine(
        "dm", iterations=iters + 1, model_kwargs={"width": width}, compile=True, log_every=1, batch_real=BATCH_REAL
    )
    eng.distill(data, IPC, seed=seed, progress=lambda s, t, rec: stamps.append(rec["seconds"]))
    return stamps[0], [b - a for a, b in itertools.pairwise(stamps)]


def count_flops(data, width: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ref = Reference(data, width)
    with FlopCounterMode(display=False) as fc:
        ref.step()
    return fc.get_total_flops()


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child_memory(variant: str, width: int, iters: int) -> None:
    """Child process: peak-RSS increase of ``iters`` iterations of one variant, printed as JSON."""
    data = load_dataset("fashion_mnist").train
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    if variant == "reference":
        ref = Reference(data, width)
        for _ in range(iters):
            ref.step()
    else:
        build_engine("dm", iterations=iters, model_kwargs={"width": width}, compile=True).distill(data, IPC, seed=0)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def measure_memory(variant: str, width: int, iters: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--widths", str(width), "--iters", str(iters)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="32,128", help="comma-separated ConvNet widths")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per width")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per variant per round")
    ap.add_argument("--mem-iters", type=int, default=2, help="iterations of each memory child (0: skip)")
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results/dm_speed-DATE.md)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    if args.child:
        child_memory(args.child, widths[0], args.iters)
        return

    data = load_dataset("fashion_mnist").train
    peak32, peak16 = gemm_peak(torch.float32), gemm_peak(torch.bfloat16)
    print(f"GEMM peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s", flush=True)
    rows = []
    for width in widths:
        flops = count_flops(data, width)
        ref = Reference(data, width)
        ref.step()  # warm-up
        t_ref: list[float] = []
        t_fed: list[float] = []
        firsts: list[float] = []
        for r in range(args.repeats):
            for _ in range(args.iters):
                t_ref.append(_timed(ref.step))
            first, times = fedistill_times(data, width, args.iters, seed=r)
            firsts.append(first)
            t_fed += times
            print(
                f"width {width} round {r}: reference {statistics.median(t_ref):.3f} s/it, "
                f"fedistill {statistics.median(t_fed):.3f} s/it (first {first:.1f} s)",
                flush=True,
            )
        med_ref, med_fed = statistics.median(t_ref), statistics.median(t_fed)
        mem = {
            v: measure_memory(v, width, args.mem_iters) if args.mem_iters else float("nan")
            for v in ("reference", "fedistill")
        }
        for name, med in (("reference (per-class fp32 loop)", med_ref), ("fedistill DMEngine", med_fed)):
            gf = flops / med / 1e9
            rows.append(
                {
                    "width": width,
                    "variant": name,
                    "s_it": med,
                    "speedup": med_ref / med,
                    "gflops": gf,
                    "pct32": 100 * gf / peak32,
                    "pct16": 100 * gf / peak16,
                    "mem": mem["reference" if name.startswith("reference") else "fedistill"],
                    "first": statistics.median(firsts) if name.startswith("fedistill") else float("nan"),
                    "n": len(t_ref) if name.startswith("reference") else len(t_fed),
                }
            )
        print(f"width {width}: {flops / 1e9:.1f} GFLOP/iteration; speedup {med_ref / med_fed:.2f}x", flush=True)

    today = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else results_path("dm_speed")
    cmd = " ".join([".venv/bin/python", "benchmarks/dm_speed.py", *sys.argv[1:]])
    lines = [
        f"# DM iteration speed, {today}",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Setting: Fashion-MNIST, IPC {IPC}, {BATCH_REAL} real per class, DSA, ConvNet-3 (instance norm, avg pool). "
        f"GEMM peaks (2048^3 torch.mm, best of 5): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s.",
        "",
        "s/it: median over n timed iterations, variants alternating in one process. first: fedistill's first "
        "iteration including torch.compile (warm inductor cache), excluded from s/it. Peak mem: VmHWM (reset via "
        "/proc/self/clear_refs after data loading) minus VmRSS at that point, in a fresh child process per variant. "
        "GFLOP/s: conv/linear FLOPs of one "
        "iteration (FlopCounterMode: real forward + synthetic forward/backward) / s/it.",
        "",
        "| width | variant | s/it | speedup | GFLOP/s | % fp32 peak | % bf16 peak | peak mem (MiB) | first (s) | n |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['variant']} | {r['s_it']:.3f} | {r['speedup']:.2f}x | {r['gflops']:.0f} | "
            f"{r['pct32']:.0f}% | {r['pct16']:.0f}% | {r['mem']:.0f} | {r['first']:.1f} | {r['n']} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
