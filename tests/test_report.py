"""``fedistill report`` on real run directories: grouping, the means over seeds, failed runs listed.

The runs are made by the CLI itself with tiny budgets, in two processes started together (about
35 s on two busy cores): a Hydra multirun of ``fedistill central`` (methods dm and dp_dm, seeds 0 and 1:
two groups of two seeds, dp_dm with a privacy summary) and one ``fedistill simulate`` run with
2 clients (its random-subset control included). Copies of them stand for an interrupted run
(status ``distilling``, a stale accuracy left in its summary), a crashed one (no summary.json)
and a failed federation (status ``failed``, its error, no final accuracy).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedistill.cli import main
from fedistill.report import RESOURCES_FILE, Result, Run, collect, group_runs, pareto_front

ROOT = Path(__file__).resolve().parents[1]
CENTRAL = [
    "central",
    "-m",
    "method=dm,dp_dm",
    "seed=0,1",
    "ipc=1",
    "method.iterations=2",
    "method.batch_real=16",
    "method.dsa=false",
    "eval.dsa=false",
    "model.width=8",
    "model.depth=1",
    "eval.epochs=1",
    "eval.runs=1",
    "device=cpu",
]
SIMULATE = ["simulate", "clients=2", "method.iterations=3", "strategy.server.epochs=2", "device=cpu"]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedistill.cli", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _edit_summary(run: Path, **fields: object) -> None:
    summary = _summary(run) | fields
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if v is not None}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    procs = [
        _start([*CENTRAL, f"hydra.sweep.dir={root / 'sweep'}"], root),
        _start([*SIMULATE, f"hydra.run.dir={root / 'sim' / 'run'}"], root),
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    dm = {_summary(p.parent)["seed"]: p.parent for p in (root / "sweep").glob("*method=dm,*/summary.json")}
    shutil.copytree(dm[0], root / "sweep" / "interrupted")  # a resumed run killed mid-distillation
    _edit_summary(root / "sweep" / "interrupted", status="distilling", accuracy={"mean": 100.0, "std": 0.0})
    shutil.copytree(dm[1], root / "sweep" / "crashed")
    (root / "sweep" / "crashed" / "summary.json").unlink()
    # the crashed command's last words, as run_point records them beside a run that exited non-zero
    crash = {"peak_rss_bytes": 1e9, "exit_code": 1, "error": "RuntimeError: out of memory"}
    (root / "sweep" / "crashed" / RESOURCES_FILE).write_text(json.dumps(crash))
    shutil.copytree(root / "sim" / "run", root / "sim" / "failed")
    _edit_summary(root / "sim" / "failed", status="failed", error="round 1: only 0 of 2 sampled clients succeeded")
    _edit_summary(root / "sim" / "failed", final_accuracy=None)
    # the process tree's peak memory, as benchmarks/_common.run_point records it beside the run
    (root / "sim" / "run" / RESOURCES_FILE).write_text(json.dumps({"peak_rss_bytes": 2.5e9, "exit_code": 0}))
    return root


def _finished(root: Path, method: str) -> list[dict]:
    summaries = [_summary(p.parent) for p in sorted((root / "sweep").glob(f"*method={method},*/summary.json"))]
    assert len(summaries) == 2 and all(s["status"] == "done" for s in summaries)
    return summaries


def _pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"


@pytest.fixture(scope="module")
def report(runs) -> tuple[subprocess.CompletedProcess, Path]:
    """``fedistill report`` over the runs: the finished process and the report directory."""
    out = runs / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedistill.cli", "report", str(runs / "sweep"), str(runs / "sim"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=runs, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_report_groups_seeds_means_and_lists_failed_runs(runs, report):
    proc, out = report
    assert proc.stdout.splitlines()[-1] == f"report: {out / 'report.html'} (8 runs in 3 groups, 3 failed or incomplete)"

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 8
    assert list(rows[0]) == [
        *("group", "seed", "status", "accuracy", "random_subset", "bytes_up", "epsilon", "seconds", "peak_gb"),
        *("path", "warnings"),
    ]
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["interrupted"]["status"] == "distilling" and by_path["crashed"]["status"] == "no summary.json"
    assert by_path["failed"]["status"] == "failed" and by_path["failed"]["accuracy"] == ""
    labels = {}
    for row in rows:
        run = Path(row["path"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        command = "simulate" if "strategy" in cfg else "central"
        labels.setdefault((command, cfg["method"]["name"]), set()).add(row["group"])
        assert row["seed"] == str(cfg["seed"])
        if row["status"] != "done":
            continue
        summary = _summary(run)
        assert row["warnings"] == "; ".join(summary.get("warnings", []))
        if command == "central":
            assert float(row["accuracy"]) == summary["accuracy"]["mean"]
            assert float(row["random_subset"]) == summary["baselines"]["random_subset"]["mean"]
            assert row["bytes_up"] == ""
            privacy = summary.get("privacy")
            assert row["epsilon"] == ("" if privacy is None else str(privacy["epsilon_spent"]))
            assert float(row["seconds"]) == summary["distill_seconds"] + summary["eval_seconds"]
            assert row["peak_gb"] == ""
        else:
            assert float(row["accuracy"]) == summary["final_accuracy"]
            assert float(row["random_subset"]) == summary["baselines"]["random_subset"]["accuracy"]
            assert int(row["bytes_up"]) == summary["bytes_up"]
            assert float(row["seconds"]) == summary["wall_seconds"] and float(row["peak_gb"]) == 2.5
    # three groups, one label each; a label shows what differs (command, method), never the seed
    assert set(labels) == {("central", "dm"), ("central", "dp_dm"), ("simulate", "dm")}
    assert all(len(v) == 1 for v in labels.values())
    dm, dp, sim = (labels[k].pop() for k in [("central", "dm"), ("central", "dp_dm"), ("simulate", "dm")])
    assert dm == "command=central, method.name=dm" and dp == "command=central, method.name=dp_dm"
    assert sim == "command=simulate" and not any("seed" in label for label in (dm, dp, sim))

    md = (out / "report.md").read_text()
    table = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| command=")}
    dm_runs, dp_runs = _finished(runs, "dm"), _finished(runs, "dp_dm")
    for label, done, incomplete in ((dm, dm_runs, 2), (dp, dp_runs, 0)):
        accs, controls = [s["accuracy"]["mean"] for s in done], [s["baselines"]["random_subset"]["mean"] for s in done]
        delta = f"{statistics.fmean(accs) - statistics.fmean(controls):+.2f}"
        above = sum(a > c for a, c in zip(accs, controls, strict=True))  # seeds that beat their own control
        # the interrupted copy's stale 100.0 would move the mean: only finished runs count
        start = f"| {label} | 2 | {_pm(accs)} | {_pm(controls)} | {delta} | {above}/2 | "
        assert table[label].startswith(start), table[label]
        assert table[label].endswith(f" | {incomplete} |")
    epsilon = statistics.fmean(s["privacy"]["epsilon_spent"] for s in dp_runs)
    assert f" | {epsilon:.2f} | " in table[dp] and " | - | - | " in table[dm] and table[dm].endswith(" | - |  | 2 |")
    simulate = _summary(runs / "sim" / "run")
    assert table[sim].startswith(f"| {sim} | 1 | {simulate['final_accuracy']:.2f} ± 0.00 | ")
    above = int(simulate["final_accuracy"] > simulate["baselines"]["random_subset"]["accuracy"])
    tail = f" | {above}/1 | {simulate['bytes_up'] / 1e6:.3f} | - | {simulate['wall_seconds']:.0f} | 2.50 | yes | 1 |"
    assert table[sim].endswith(tail), table[sim]  # alone on the front
    failed = md.split("## Failed or incomplete runs", 1)[1]
    for name, status in (("interrupted", "distilling"), ("crashed", "no summary.json"), ("failed", "failed")):
        assert re.search(rf"\| \S*{name} \| [^|]+ \| \d \| {status} \|", failed), (name, failed)
    assert "round 1: only 0 of 2 sampled clients succeeded" in failed
    assert re.search(r"\| \S*crashed \| [^|]+ \| \d \| no summary.json \| RuntimeError: out of memory \|", failed)

    page = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    plots = re.findall(r"</h2><img alt='accuracy vs ([^']+)'", page)
    assert len(plots) == 3  # accuracy vs rounds, vs uplink (simulate), vs epsilon (dp_dm)
    # thumbnails of the 5 finished runs: every synthetic set, the simulate run's partition
    runs_table = page.split("<h2>Runs</h2>", 1)[1].split("</table>", 1)[0]
    assert runs_table.count("<tr>") == 6 and runs_table.count("alt='synthetic set'") == 5
    assert runs_table.count("alt='partition'") == 1 and len(images) == 3 + 6
    assert "http://" not in page and "https://" not in page
    assert "command=central, method.name=dp_dm" in page and "distilling" in page


def test_simulate_run_is_read_from_its_summary_and_metrics(runs):
    report = collect([runs / "sim"])
    summary = _summary(runs / "sim" / "run")
    events = [json.loads(line) for line in (runs / "sim" / "run" / "metrics.jsonl").read_text().splitlines()]
    [group] = report.groups
    done = {r.path.name: r for r in group.runs}
    run = done["run"]
    assert run.command == "simulate" and run.status == "done" and run.epsilon is None
    control = summary["baselines"]["random_subset"]["accuracy"]
    assert run.result == Result(summary["final_accuracy"], control, summary["bytes_up"], summary["wall_seconds"])
    assert run.peak_gb == 2.5
    rounds = [e for e in events if e["event"] == "round"]
    assert [r["accuracy"] for r in run.curve] == [r["accuracy"] for r in rounds] == summary["accuracy_history"]
    assert run.curve[-1]["bytes_up_total"] == summary["bytes_up"]
    assert done["failed"].status == "failed" and "0 of 2" in done["failed"].detail
    assert group.stat(lambda r: r.result.accuracy) == (summary["final_accuracy"], 0.0)


def test_labels_show_only_what_differs_within_a_method():
    def run(seed: int, **method: object) -> Run:
        cfg = {"method": method, "ipc": 1, "seed": seed, "resume": None, "eval": {"epochs": 1}}
        flat = {f"method.{k}": v for k, v in method.items()} | {k: cfg[k] for k in ("ipc", "seed", "resume")}
        return Run(Path(f"/r/{method}/{seed}"), "central", flat | {"eval.epochs": 1}, "done", Result(50.0 + seed))

    runs = [run(s, name="dm", iterations=it, dsa=True) for s in (0, 1) for it in (2, 4)]
    runs += [run(s, name="dp_dm", iterations=2, dsa=False, epsilon=10.0) for s in (0, 1)]
    groups = group_runs(runs)
    assert [g.label for g in groups] == [
        "method.name=dm, method.iterations=2",
        "method.name=dm, method.iterations=4",
        "method.name=dp_dm",  # dsa and epsilon differ from dm's, yet follow from the method choice
    ]
    assert [len(g.done) for g in groups] == [2, 2, 2]
    assert groups[0].stat(lambda r: r.result.accuracy) == (50.5, 0.5)


def test_pareto_front_is_the_best_accuracy_for_at_most_its_uplink():
    points = [(1.0, 50.0), (2.0, 40.0), (2.0, 60.0), (3.0, 60.0), (0.5, 10.0)]
    assert sorted(pareto_front(points)) == [0, 2, 4]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'missing'}: no such directory" in err
    audit = tmp_path / "audit"  # another command's run directory is no run to report
    audit.mkdir()
    (audit / "config.yaml").write_text("run_dir: somewhere\nmembers: 200\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no fedistill central or simulate run under" in err and str(tmp_path) in err
    assert "Traceback" not in err


# What a real browser makes of report.html (Debian's chromium, headless): the page gets a probe
# script that records, once loaded, how many of its images decoded to real pictures.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const shown = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.setAttribute("data-probe", `${shown.length}/${imgs.length}`);
});</script>"""


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("the browser check needs Debian's chromium: apt-get install chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    cmd += [f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _browse(html: str, tmp_path: Path, *args: str) -> tuple[str, list[str], subprocess.CompletedProcess]:
    """Load ``html`` (with the probe) in headless chromium: the probe's ``shown/total`` images and
    every console message the page produced."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", f"{PROBE}</body>"))
    proc = _chromium(page, tmp_path / "profile", "--dump-dom", *args)
    probe = re.search(r'data-probe="(\d+/\d+)"', proc.stdout)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return (probe.group(1) if probe else "not loaded"), console, proc


def test_report_html_loads_in_a_real_browser_with_its_plots(report, tmp_path):
    """The report loads in chromium with no console message (it has no script of its own), all
    its pictures (three plots, the runs' thumbnails) decode, and a screenshot of the page is mostly not blank; the same
    check on a page with a broken image and a script error fails, so it can."""
    _, out = report
    html = (out / "report.html").read_text()
    shot_path = tmp_path / "shot.png"
    shown, console, proc = _browse(html, tmp_path / "report", f"--screenshot={shot_path}", "--window-size=1280,2400")
    n = html.count("<img ")
    assert n >= 3 and shown == f"{n}/{n}" and console == [], (shown, console, proc.stderr[-2000:])
    from PIL import Image

    shot = Image.open(shot_path).convert("L")
    dark = sum(shot.histogram()[:200]) / (shot.width * shot.height)
    assert dark > 0.02, f"the screenshot is blank ({dark:.3%} non-white pixels)"
    broken = html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    broken = broken.replace("</body>", "<script>undefinedFunction()</script></body>")
    shown, console, _ = _browse(broken, tmp_path / "broken")
    assert shown == f"{n - 1}/{n}" and any("undefinedFunction" in line for line in console)
