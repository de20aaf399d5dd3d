"""Shared helpers of the benchmark scripts: machine description and result paths."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> str:
    """CPU model, cores, torch version and threads, bf16 ISA support, Python version."""
    model = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{model}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"bf16 ISA: {'yes' if bf16 else 'no'}, Python {platform.python_version()}"
    )


def results_path(name: str, suffix: str = ".md") -> Path:
    """``benchmarks/results/<name>-<date><suffix>`` (directory created)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}-{datetime.date.today()}{suffix}"


def append_row(path: Path, row: str) -> None:
    """Print a results-table row and append it to ``path`` at once (a stopped run keeps its rows)."""
    print(row, flush=True)
    with open(path, "a") as f:
        f.write(row + "\n")


def report_results(dirs: list[Path], name: str, header: str) -> Path:
    """The ``fedistill report`` of the runs under ``dirs`` as this benchmark's results.

    ``results/<name>-<date>.md`` is ``header`` then the report's tables (groups of runs that
    differ only in the seed: mean ± std, the random-subset control beside, uplink, epsilon,
    the Pareto front; failed or incomplete runs listed); ``.csv`` has one row per run and
    ``.html`` the plots and thumbnails. Called after every run, so a stopped benchmark keeps
    what it measured.
    """
    from fedistill.report import collect
    from fedistill.report_render import csv_text, markdown, page, plots, tables

    md = results_path(name)
    report = collect(dirs)
    tabs = tables(report, relative_to=dirs[0])
    shown = [str(d) for d in dirs]
    body = markdown(report, tabs, dirs=shown).split("\n", 1)[1]  # the benchmark's header replaces the title
    md.write_text(header.rstrip() + "\n" + body)
    md.with_suffix(".csv").write_text(csv_text(report))
    md.with_suffix(".html").write_text(page(report, tabs, plots(report), dirs=shown))
    return md
