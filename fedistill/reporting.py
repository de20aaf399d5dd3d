"""Run directory, metrics, plots, progress bars and result tables.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per
event, appended and flushed as it happens), ``summary.json`` (rewritten
atomically as results arrive, so an interrupted run keeps what it finished),
``synthetic.safetensors`` (+ ``.json``) and ``synthetic.png``. :meth:`RunDir.track` also
sends them to an experiment tracker (:mod:`fedistill.tracking`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedistill.checkpoint import CheckpointError
from fedistill.data.synthetic import SyntheticSet
from fedistill.io import atomic_write_text, read_json_object
from fedistill.tracking import Tracking, open_tracking

__all__ = [
    "CHANCE_MARGIN",
    "RunDir",
    "baseline_warning",
    "chance_warning",
    "progress_bars",
    "pyplot",
    "results_table",
    "run_line",
    "save_accuracy_plot",
    "save_grid",
    "save_partition_plot",
]


CHANCE_MARGIN = 2.0
"""Percentage points above ``100 / classes`` below which a result counts as chance level."""


def chance_warning(accuracy: float, num_classes: int, *, what: str, why: str) -> str | None:
    """A one-line warning when ``accuracy`` (%) is within :data:`CHANCE_MARGIN` of chance, else ``None``.

    ``what`` names the model (``"the global model"``), ``why`` says where to look.
    """
    if accuracy >= 100.0 / num_classes + CHANCE_MARGIN:
        return None
    return f"{what} is at chance level ({accuracy:.2f}% with {num_classes} classes): {why}"


def baseline_warning(accuracy: float, baseline: float, *, what: str, baseline_name: str, fix: str) -> str | None:
    """A one-line warning when ``accuracy`` is below ``baseline`` (both %), else ``None``."""
    if accuracy >= baseline:
        return None
    return f"{what} ({accuracy:.2f}%) is below {baseline_name} ({baseline:.2f}%): {fix}"


def run_line(path: str | Path, result: str) -> str:
    """The last line of every command: the run directory (absolute) and the run's one-line ``result``."""
    return f"run directory: {Path(path).resolve()}  ({result})"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class RunDir:
    """A run's output directory.

    Parameters
    ----------
    path
        Directory (created if missing). Existing results are never deleted.
    resume
        Start from the directory's ``summary.json`` (a resumed run) instead of an empty summary.
    """

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.summary: dict[str, Any] = {}
        if resume and (self.path / "summary.json").is_file():  # continue the interrupted run's summary
            fix = "repair it, or move it away to resume with a fresh summary"
            self.summary = read_json_object(self.path / "summary.json", CheckpointError, fix)
        self._t0 = time.time()
        self.tracking: Tracking | None = None

    def track(self, cfg: dict[str, Any]) -> RunDir:
        """Forward this run to the tracker of ``cfg["tracking"]`` (:mod:`fedistill.tracking`) until :meth:`close`.

        Logs the resolved ``cfg`` as params (unless resumed), then every event with a step;
        use the run directory as a context manager (``with run.track(cfg):``) so the tracker
        gets the summary and the artefacts and is closed however the run ends.

        Raises
        ------
        TrackingError
            The tracker's library is not installed (its extra is named).
        """
        self.tracking = open_tracking(cfg, self.path, resume=self.resume, warn=self._warn)
        return self

    def _warn(self, message: str) -> None:
        print(f"fedistill: warning: {message}")
        self._append("warning", message=message)

    def close(self, *, failed: bool = False) -> None:
        """Hand the summary and artefacts to the tracker and close it (no-op when untracked)."""
        tracking, self.tracking = self.tracking, None
        if tracking is not None:
            tracking.finish(self.path, self.summary, failed=failed)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(failed=exc_type is not None)

    def write_config(self, yaml_text: str) -> None:
        """Write the resolved config as ``config.yaml``."""
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def log(self, event: str, **fields: Any) -> None:
        """Append one event to ``metrics.jsonl`` (flushed immediately) and forward it to the tracker."""
        rec = self._append(event, **fields)
        if self.tracking is not None:
            self.tracking.event(event, rec)

    def _append(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": event, "time": round(time.time() - self._t0, 3), **fields}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``summary.json`` and rewrite it atomically."""
        self.summary.update(fields)
        atomic_write_text(self.path / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        return self.summary


def save_grid(syn: SyntheticSet, path: str | Path, *, max_per_class: int = 10) -> Path:
    """Save ``syn`` as a PNG grid, one row per class, de-normalized to ``[0, 1]``."""
    plt = pyplot()

    path = Path(path)
    info = syn.info
    labels = syn.hard_labels
    classes = sorted(set(labels.tolist()))
    cols = max(1, min(max_per_class, max(int((labels == c).sum()) for c in classes)))
    imgs = info.denormalize(syn.images.detach().float()).clamp(0, 1)
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 0.8, len(classes) * 0.8), squeeze=False)
    for r, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()[:cols].tolist()
        for k in range(cols):
            ax = axes[r][k]
            ax.axis("off")
            if k < len(idx):
                img = imgs[idx[k]].permute(1, 2, 0).numpy()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        name = info.class_names[c] if c < len(info.class_names) else str(c)
        axes[r][0].set_title(name, fontsize=6, loc="left")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_partition_plot(hist: Any, path: str | Path, *, class_names: tuple[str, ...] = ()) -> Path:
    """Stacked bars of per-partition class counts (``hist``: ``[partitions, classes]``)."""
    plt = pyplot()
    import numpy as np

    hist = np.asarray(hist)
    n, k = hist.shape
    fig, ax = plt.subplots(figsize=(max(4.0, min(0.12 * n + 2, 20.0)), 3.2))
    bottom = np.zeros(n)
    cmap = plt.get_cmap("tab20" if k > 10 else "tab10")
    for c in range(k):
        label = class_names[c] if c < len(class_names) else str(c)
        ax.bar(np.arange(n), hist[:, c], bottom=bottom, color=cmap(c % cmap.N), width=0.9, label=label)
        bottom += hist[:, c]
    ax.set_xlabel("partition (client)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=6, ncol=2, loc="upper right", frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@contextlib.contextmanager
def progress_bars() -> Iterator[Any]:
    """A :class:`rich.progress.Progress` (transient-free) for distillation and evaluation."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ) as bars:
        yield bars


def results_table(summary: dict[str, Any]) -> Any:
    """A :class:`rich.table.Table` of the accuracies in ``summary``."""
    from rich.table import Table

    def fmt(r: dict[str, Any] | None) -> str:
        return "-" if not r else f"{r['mean']:.2f} ± {r['std']:.2f}"

    t = Table(title=f"{summary.get('method')} on {summary.get('dataset')}, ipc {summary.get('ipc')} (test acc %)")
    for col in ("model", "synthetic", "hard labels", "random subset"):
        t.add_column(col)
    for label, res in summary.get("per_model", {}).items():
        t.add_row(label, fmt(res.get("synthetic")), fmt(res.get("hard_label")), fmt(res.get("random_subset")))
    whole = summary.get("baselines", {}).get("whole_dataset")
    if whole:
        t.caption = f"whole training set: {fmt(whole)}"
    return t


def save_accuracy_plot(rounds: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Global-model accuracy against rounds and against cumulative uplink bytes.

    ``rounds`` are ``metrics.jsonl`` round records (``round``, ``accuracy`` in %,
    ``bytes_up_total``).
    """
    plt = pyplot()
    xs = [r["round"] for r in rounds]
    acc = [r["accuracy"] for r in rounds]
    up = [r["bytes_up_total"] / 1e6 for r in rounds]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(xs, acc, marker="o")
    a.set_xlabel("round")
    a.set_ylabel("test accuracy (%)")
    b.plot(up, acc, marker="o")
    b.set_xlabel("cumulative uplink (MB)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
