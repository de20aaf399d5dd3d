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
