"""Shared helpers of the benchmark scripts: machine description, result paths, one measured CLI run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedistill.report import RESOURCES_FILE, collect
from fedistill.report_render import Table, csv_text, markdown, page, plots, tables

REPO = Path(__file__).resolve().parents[1]
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


def results_header(title: str, *paragraphs: str) -> str:
    """The Markdown head of a benchmark's results: ``# title``, the machine, the command as typed, ``paragraphs``."""
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return "\n\n".join([f"# {title}", f"Machine: {machine_info()}", f"Command: `{command}`", *paragraphs])


def workdir(given: str | None, name: str) -> Path:
    """Where a benchmark's run directories stay: ``given``, or a new ``fd-<name>-*`` temp directory (kept,
    so ``fedistill report`` can be run on it again)."""
    return Path(given or tempfile.mkdtemp(prefix=f"fd-{name}-"))


def results_path(name: str, suffix: str = ".md") -> Path:
    """``benchmarks/results/<name>-<date><suffix>`` (directory created)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}-{datetime.date.today()}{suffix}"


def append_row(path: Path, row: str) -> None:
    """Print a results-table row and append it to ``path`` at once (a stopped run keeps its rows)."""
    print(row, flush=True)
    with open(path, "a") as f:
        f.write(row + "\n")


def report_results(dirs: list[Path], name: str, header: str, extra: Sequence[Table] = ()) -> Path:
    """The ``fedistill report`` of the runs under ``dirs`` as this benchmark's results.

    ``results/<name>-<date>.md`` is ``header`` then the report's tables (groups of runs that
    differ only in the seed: mean ± std, the random-subset control beside, uplink, epsilon,
    seconds, peak GB, the Pareto front; failed or incomplete runs listed), then the
    benchmark's ``extra`` tables (what only it measures); ``.csv`` has one row per run and
    ``.html`` the same tables, the plots and thumbnails. Called after every run, so a
    stopped benchmark keeps what it measured.
    """
    md = results_path(name)
    report = collect(dirs)
    tabs = [*tables(report, relative_to=dirs[0]), *extra]
    shown = [str(d) for d in dirs]
    body = markdown(report, tabs, dirs=shown).split("\n", 1)[1]  # the benchmark's header replaces the title
    md.write_text(header.rstrip() + "\n" + body)
    md.with_suffix(".csv").write_text(csv_text(report))
    md.with_suffix(".html").write_text(page(report, tabs, plots(report), dirs=shown))
    return md


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def point_status(summary: dict, code: int, wall: float) -> str:
    """``done in N s``, or a failed point's error (the last stderr line :func:`run_point` recorded) and its time."""
    return f"{summary['error'] if code else 'done'} in {wall:.0f} s"


def run_point(args: list[str], out: Path, *, command: str = "simulate") -> tuple[dict, float, int, int]:
    """Run one ``fedistill <command>`` into ``out``; its summary, wall seconds, peak tree RSS and exit code.

    The peak resident memory of the command's whole process tree (Ray's GCS, raylet and workers
    are descendants of the driver) is sampled every 0.5 s and written with the wall time (and,
    if the command failed, the last line of its stderr) to ``out/resources.json``, where
    :mod:`fedistill.report` reads it.
    """
    cmd = [sys.executable, "-m", "fedistill.cli", command, *args, f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    record = {"peak_rss_bytes": peak[0], "wall_seconds": round(wall, 3), "exit_code": proc.returncode}
    if proc.returncode != 0:
        summary.setdefault("error", err.strip().splitlines()[-1] if err.strip() else "failed")
        record["error"] = summary["error"]
    if out.is_dir():  # beside the run, for `fedistill report` (its peak GB column, a crashed run's error)
        (out / RESOURCES_FILE).write_text(json.dumps(record) + "\n")
    return summary, wall, peak[0], proc.returncode
