"""``report.md``, ``report.csv`` and a self-contained ``report.html`` of a :class:`~fedistill.report.Report`.

The HTML needs no network: its plots are inline PNG (``data:image/png;base64,...``), drawn
with matplotlib on the Agg backend: accuracy against rounds and against cumulative uplink
(one line per group, shaded mean ± std over seeds, the Pareto front of final accuracy
against uplink marked) and accuracy against the epsilon spent (DP runs only); then, per
finished run, thumbnails of its synthetic set (``synthetic.png``) and partition
(``partition.png``, simulate runs).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

from fedistill.io import atomic_write_text
from fedistill.report import RESOURCES_FILE, RUN_KINDS, Group, Report, pareto_front
from fedistill.reporting import pyplot

__all__ = [
    "CSV_COLUMNS",
    "Line",
    "Table",
    "csv_text",
    "line_plot",
    "markdown",
    "markdown_table",
    "page",
    "plots",
    "tables",
    "thumbnails",
    "write_report",
]

CSV_COLUMNS = (
    "group",
    "seed",
    "status",
    "accuracy",
    "random_subset",
    "bytes_up",
    "epsilon",
    "seconds",
    "peak_gb",
    "path",
    "warnings",
)
GROUP_COLUMNS = (
    "group",
    "seeds",
    "accuracy %",
    "random subset %",
    "vs random",
    "above random",
    "uplink MB",
    "epsilon",
    "seconds",
    "peak GB",
    "Pareto",
    "failed/incomplete",
)
# last key components of privacy settings: a line of the accuracy-vs-epsilon plot spans their values
_PRIVACY_SETTINGS = ("epsilon", "max_epsilon", "sigma", "noise_multiplier", "delta", "clip")
_ACCURACY = attrgetter("result.accuracy")
_RANDOM_SUBSET = attrgetter("result.random_subset")
_BYTES_UP = attrgetter("result.bytes_up")
_EPSILON = attrgetter("epsilon")
_SECONDS = attrgetter("result.seconds")
_PEAK_GB = attrgetter("peak_gb")
#: the per-run pictures of ``report.html`` (file in the run directory, column title), scaled to this width
THUMBNAILS = (("synthetic.png", "synthetic set"), ("partition.png", "partition"))
THUMB_WIDTH = 240
#: at most this many runs get thumbnails (the page stays a few MB for a large grid); the rest are counted
MAX_THUMB_RUNS = 60


class Table(NamedTuple):
    """A titled table of text cells, rendered to Markdown and HTML alike."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Line:
    """One line of a plot: the mean over seeds at each ``x`` and its spread (std over seeds)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    spread: Sequence[float]


def line_plot(
    lines: Sequence[Line],
    *,
    xlabel: str,
    ylabel: str = "test accuracy (%)",
    title: str = "",
    front: Sequence[tuple[float, float]] = (),
    logx: bool = False,
) -> str:
    """Plot ``lines`` with their spread shaded; the figure as a base64 PNG.

    Parameters
    ----------
    lines
        The lines; each gets its own colour and legend entry.
    xlabel, ylabel, title
        Axis labels and the title.
    front
        ``(x, y)`` points of a Pareto front, drawn as a black staircase with star markers.
    logx
        Logarithmic x axis.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for line in lines:
        lo = [m - s for m, s in zip(line.y, line.spread, strict=True)]
        hi = [m + s for m, s in zip(line.y, line.spread, strict=True)]
        (drawn,) = ax.plot(line.x, line.y, marker="o", markersize=4, label=line.label)
        ax.fill_between(line.x, lo, hi, color=drawn.get_color(), alpha=0.2, linewidth=0)
        if len(line.x) == 1:  # a band needs two points: a single point's spread is an error bar
            ax.errorbar(line.x, line.y, yerr=line.spread, color=drawn.get_color(), capsize=3)
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1)
        ax.scatter(xs, ys, marker="*", s=140, color="black", zorder=5, label="Pareto front")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pm(stat: tuple[float, float] | None) -> str:
    return "-" if stat is None else f"{stat[0]:.2f} ± {stat[1]:.2f}"


def _above(group: Group) -> str:
    """``k/n``: of the ``n`` finished runs with both accuracies, ``k`` beat their own random-subset control."""
    both = [(_ACCURACY(run), _RANDOM_SUBSET(run)) for run in group.done]
    pairs = [(a, r) for a, r in both if a is not None and r is not None]
    return f"{sum(a > r for a, r in pairs)}/{len(pairs)}" if pairs else "-"


def _front(groups: Sequence[Group]) -> list[Group]:
    """The groups on the Pareto front of mean final accuracy against mean uplink."""
    placed = [(g, up[0], acc[0]) for g in groups if (acc := g.stat(_ACCURACY)) and (up := g.stat(_BYTES_UP))]
    return [placed[i][0] for i in pareto_front([(up, acc) for _, up, acc in placed])]


def tables(report: Report, *, relative_to: Path) -> list[Table]:
    """One table of groups per command, then the failed and incomplete runs (paths ``relative_to``)."""
    front = {id(g) for g in _front(report.groups)}
    out = []
    for command in RUN_KINDS:
        rows = []
        for g in (g for g in report.groups if g.config["command"] == command):
            acc, rnd, up, eps, sec, peak = (
                g.stat(f) for f in (_ACCURACY, _RANDOM_SUBSET, _BYTES_UP, _EPSILON, _SECONDS, _PEAK_GB)
            )
            delta = f"{acc[0] - rnd[0]:+.2f}" if acc and rnd else "-"
            up_mb = "-" if up is None else f"{up[0] / 1e6:.3f}"
            cells = (str(len(g.done)), _pm(acc), _pm(rnd), delta, _above(g), up_mb)
            cells += ("-" if eps is None else f"{eps[0]:.2f}", "-" if sec is None else f"{sec[0]:.0f}")
            cells += ("-" if peak is None else f"{peak[0]:.2f}", "yes" if id(g) in front else "")
            rows.append((g.label, *cells, str(len(g.runs) - len(g.done))))
        if rows:
            out.append(Table(f"{command} runs", GROUP_COLUMNS, rows))
    labels = report.labels()
    failed = [
        (os.path.relpath(r.path, relative_to), labels.get(r.path, "-"), str(r.seed), r.status, r.detail)
        for r in report.incomplete
    ]
    out.append(Table("Failed or incomplete runs", ("run", "group", "seed", "status", "detail"), failed))
    return out


def plots(report: Report) -> list[tuple[str, str]]:
    """(title, base64 PNG) of accuracy vs rounds, vs cumulative uplink and vs epsilon, where there is data."""
    rounds, uplink, by_series = [], [], defaultdict(list)
    for g in report.groups:
        per_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for run in g.done:
            for rec in run.curve:
                per_round[int(rec["round"])].append(rec)
        if per_round:
            xs = sorted(per_round)
            accs = [[rec["accuracy"] for rec in per_round[x]] for x in xs]
            y, s = [statistics.fmean(a) for a in accs], [statistics.pstdev(a) for a in accs]
            rounds.append(Line(g.label, xs, y, s))
            mb = [statistics.fmean(rec["bytes_up_total"] for rec in per_round[x]) / 1e6 for x in xs]
            uplink.append(Line(g.label, mb, y, s))
        if (acc := g.stat(_ACCURACY)) and (eps := g.stat(_EPSILON)):
            series = g.describe(leave_out=lambda key: key.rsplit(".", 1)[-1] in _PRIVACY_SETTINGS)
            by_series[series].append((eps[0], *acc))
    front = [(g.stat(_BYTES_UP)[0] / 1e6, g.stat(_ACCURACY)[0]) for g in _front(report.groups)]  # type: ignore[index]
    epsilon = [Line(label, *zip(*sorted(points), strict=True)) for label, points in by_series.items()]
    up_title = "accuracy vs cumulative uplink (Pareto front of final accuracy)"
    specs: list[tuple[str, list[Line], dict[str, Any]]] = [
        ("accuracy vs rounds (mean ± std over seeds)", rounds, {"xlabel": "round"}),
        (up_title, uplink, {"xlabel": "cumulative uplink (MB)", "front": front}),
        ("accuracy vs epsilon spent (DP runs)", epsilon, {"xlabel": "epsilon", "logx": True}),
    ]
    return [(title, line_plot(lines, title=title, **opts)) for title, lines, opts in specs if lines]


def _thumb(path: Path) -> str | None:
    """``path`` (a PNG) scaled down to :data:`THUMB_WIDTH` pixels wide, as base64; None if absent or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.thumbnail((THUMB_WIDTH, THUMB_WIDTH * 4))
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(report: Report) -> tuple[list[tuple[str, Any, list[str | None]]], int]:
    """Per finished run (group order, at most :data:`MAX_THUMB_RUNS`): its group label, seed and
    the base64 thumbnails of :data:`THUMBNAILS` (None where the run has no such picture); and
    how many finished runs were left out."""
    done = [(g.label, run) for g in report.groups for run in g.done]
    rows = [(label, run.seed, [_thumb(run.path / name) for name, _ in THUMBNAILS]) for label, run in done]
    return rows[:MAX_THUMB_RUNS], max(0, len(rows) - MAX_THUMB_RUNS)


def _thumb_table(report: Report) -> list[str]:
    rows, left_out = thumbnails(report)
    if not rows:
        return []
    esc = html.escape
    heads = ["group", "seed", *(title for _, title in THUMBNAILS)]
    parts = ["<h2>Runs</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"]
    for label, seed, pngs in rows:
        pairs = zip(pngs, THUMBNAILS, strict=True)
        cells = [f"<img alt='{t}' src='data:image/png;base64,{p}'>" if p else "-" for p, (_, t) in pairs]
        parts.append(f"<tr><td>{esc(label)}</td><td>{esc(str(seed))}</td><td>" + "</td><td>".join(cells) + "</td></tr>")
    parts.append("</table>")
    if left_out:
        parts.append(f"<p>{left_out} more finished runs (thumbnails of the first {MAX_THUMB_RUNS} only)</p>")
    return parts


def _intro(report: Report, dirs: Sequence[str]) -> str:
    return (
        f"{len(report.runs)} runs in {len(report.groups)} groups ({len(report.incomplete)} failed or incomplete) "
        f"from {', '.join(dirs)}. Accuracy: test accuracy in %, mean ± std over the seeds of a group (finished "
        "runs only); random subset: the same recipe trained on a random real subset of the same size. "
        "Seconds: start to the main result (simulate) or distillation plus evaluation (central); peak GB: the "
        f"process tree's peak resident memory where the run's {RESOURCES_FILE} recorded it."
    )


def _notes(report: Report) -> list[str]:
    notes = [f"{r.path.name}: warning: {w}" for r in report.runs for w in r.warnings]
    return notes + [f"not a central or simulate run (skipped): {p}" for p in report.skipped]


def markdown_table(tab: Table) -> list[str]:
    """``tab`` as Markdown lines: its title as a heading, then the table (``none`` when it has no row)."""
    lines = [f"## {tab.title}", ""]
    if not tab.rows:
        return [*lines, "none"]
    lines += ["| " + " | ".join(tab.headers) + " |", "|" + "---|" * len(tab.headers)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in tab.rows]


def markdown(report: Report, tabs: Sequence[Table], *, dirs: Sequence[str]) -> str:
    """``report.md``: the intro, the tables, the runs' warnings."""
    lines = ["# fedistill report", "", _intro(report, dirs)]
    for tab in tabs:
        lines += ["", *markdown_table(tab)]
    if notes := _notes(report):
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def page(report: Report, tabs: Sequence[Table], images: Sequence[tuple[str, str]], *, dirs: Sequence[str]) -> str:
    """``report.html``: :func:`markdown`'s content plus the plots, inline; no external resource."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedistill report</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}img{max-width:100%}",
        f"</style></head><body><h1>fedistill report</h1><p>{esc(_intro(report, dirs))}</p>",
    ]
    for tab in tabs:
        parts.append(f"<h2>{esc(tab.title)}</h2>")
        if not tab.rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in tab.headers) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in tab.rows]
        parts.append("</table>")
    for title, png in images:
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    parts += _thumb_table(report)
    if notes := _notes(report):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    return "\n".join([*parts, "</body></html>\n"])


def csv_text(report: Report) -> str:
    """``report.csv``: one row per run (:data:`CSV_COLUMNS`), failed and incomplete ones included."""
    labels = report.labels()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    ungrouped = [r for r in report.runs if r.path not in labels]
    for r in [*(r for g in report.groups for r in g.runs), *ungrouped]:
        row = (labels.get(r.path, "-"), r.seed, r.status, _ACCURACY(r), _RANDOM_SUBSET(r), _BYTES_UP(r), r.epsilon)
        row += (_SECONDS(r), r.peak_gb, r.path, "; ".join(r.warnings))
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write_report(report: Report, out: str | Path, *, dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.html`` into ``out``.

    Parameters
    ----------
    report
        From :func:`fedistill.report.collect`.
    out
        Output directory (created if missing).
    dirs
        The directories searched, named in the reports' first line.

    Returns
    -------
    dict
        ``{"md": path, "csv": path, "html": path}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tabs = tables(report, relative_to=out)
    named = [str(d) for d in dirs]
    paths = {"md": out / "report.md", "csv": out / "report.csv", "html": out / "report.html"}
    atomic_write_text(paths["md"], markdown(report, tabs, dirs=named))
    atomic_write_text(paths["csv"], csv_text(report))
    atomic_write_text(paths["html"], page(report, tabs, plots(report), dirs=named))
    return paths
