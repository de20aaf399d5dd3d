"""Experiment tracking: a run directory's config, metrics and artefacts in TensorBoard or MLflow.

Off by default (``tracking=none``). ``tracking=tensorboard`` writes event files under the run
directory (``RUN_DIR/tensorboard``); ``tracking=mlflow`` logs to an MLflow store (a local file
store under ``./mlruns`` unless ``tracking.uri`` names another store or a server). Both come
with the ``tracking`` extra (``pip install -e '.[tracking]'``) and are imported only when chosen.

A :class:`~fedistill.reporting.RunDir` forwards to a :class:`Tracking`: the flattened resolved
config as params when the run starts, every ``metrics.jsonl`` event that carries a step
(``round`` in simulate, ``iteration`` of central distillation) as metrics at that step, and at
the end the numbers of ``summary.json`` and the run directory's files. A tracker that fails
is reported once and switched off: tracking never ends a run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedistill.dotted import flatten_mapping
from fedistill.registry import Registry

__all__ = [
    "STEP_KEYS",
    "TRACKERS",
    "MlflowTracker",
    "NoTracker",
    "TensorBoardTracker",
    "Tracker",
    "Tracking",
    "TrackingError",
    "check_installed",
    "flatten_config",
    "missing_extra",
    "numbers",
    "open_tracking",
]

STEP_KEYS = ("round", "iteration")
"""Fields of a ``metrics.jsonl`` event that give its step (the first present wins)."""

ARTIFACT_SUFFIXES = (".json", ".jsonl", ".yaml", ".png", ".safetensors", ".md", ".csv", ".html")
"""Top-level files of a run directory that are its artefacts (checkpoints excepted)."""


class TrackingError(RuntimeError):
    """The chosen tracker's library is not installed (the one-line message names the extra)."""


class Tracker:
    """A tracking backend: what a :class:`Tracking` calls. Subclasses register in :data:`TRACKERS`.

    Parameters
    ----------
    run_dir
        The run directory being tracked.
    resume
        The run continues an interrupted one (append to its tracking, do not start another).
    **options
        The keys of the ``tracking`` group other than ``name``.
    """

    #: Modules the backend imports; missing ones make :func:`missing_extra` name the extra.
    modules: tuple[str, ...] = ()

    def __init__(self, run_dir: Path, *, resume: bool, **options: Any) -> None:
        self.run_dir = run_dir

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record the flattened config (dotted keys, string values)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalars at ``step``."""

    def log_artifacts(self, run_dir: Path) -> None:
        """Record the run directory's files."""

    def close(self, *, failed: bool = False) -> None:
        """Finish the run (``failed``: it ended with an exception)."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker")


@TRACKERS.register("none")
class NoTracker(Tracker):
    """``tracking=none``: tracks nothing (``metrics.jsonl`` and ``summary.json`` still hold everything)."""


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """``tracking=tensorboard``: event files under ``run_dir / log_dir`` (a resumed run appends there).

    Params go to the HParams dashboard and, as a table, to the ``config`` text; metrics are
    scalars; the run's PNGs (``synthetic.png``, ``accuracy.png``, ...) are images.
    """

    modules = ("tensorboard",)

    def __init__(self, run_dir: Path, *, resume: bool, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run_dir, resume=resume)
        self.writer = SummaryWriter(log_dir=str(run_dir / log_dir))

    def log_params(self, params: Mapping[str, str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(dict(params), {}):
            self.writer.file_writer.add_summary(summary)
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_artifacts(self, run_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        for png in sorted(run_dir.glob("*.png")):
            with Image.open(png) as img:
                self.writer.add_image(png.stem, np.asarray(img.convert("RGB")), dataformats="HWC")

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """``tracking=mlflow``: one MLflow run per run directory, in experiment ``experiment``.

    ``uri`` is the tracking URI (``None``: the file store ``<cwd>/mlruns``, or for a resumed run
    the store it started in). The store and run id are kept in ``run_dir/tracking.json``, so a
    resumed run appends to the same MLflow run.
    """

    modules = ("mlflow",)

    def __init__(self, run_dir: Path, *, resume: bool, uri: str | None, experiment: str) -> None:
        super().__init__(run_dir, resume=resume)
        state_path = run_dir / "tracking.json"
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        uri = uri or state.get("uri") or (Path.cwd() / "mlruns").as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless told it is wanted; a plain directory is what
            # tracking.uri=null promises (a server or sqlite:///... URI needs no such flag)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        from fedistill.io import atomic_write_text  # torch: imported by the run already

        self.client = MlflowClient(tracking_uri=uri)
        if state.get("uri") == uri:  # a resumed run appends to its MLflow run
            self.run_id = str(state["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"fedistill.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        state = {"tracker": "mlflow", "uri": uri, "experiment_id": exp_id, "run_id": self.run_id}
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(_key(k), v) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, run_dir: Path) -> None:
        for path in _artifacts(run_dir):
            self.client.log_artifact(self.run_id, str(path))

    def close(self, *, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _key(key: str) -> str:
    """``key`` with the characters MLflow refuses in names replaced by ``_``."""
    return re.sub(r"[^\w\-./ :]", "_", key)


def _artifacts(run_dir: Path) -> list[Path]:
    """The top-level files of ``run_dir`` that are results, not checkpoints or temporaries."""
    return [
        p
        for p in sorted(run_dir.iterdir())
        if p.is_file() and p.suffix in ARTIFACT_SUFFIXES and "checkpoint" not in p.name and p.name != "tracking.json"
    ]


def missing_extra(name: str) -> str | None:
    """The one-line fix when tracker ``name`` cannot be imported, else ``None``."""
    missing = [m for m in TRACKERS.get(name).modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"tracking={name} needs the tracking extra ({', '.join(missing)} missing): pip install -e '.[tracking]'"


def check_installed(cfg: Mapping[str, Any]) -> None:
    """Check that the tracker ``cfg["tracking"]`` chooses can be imported (call it before any work starts).

    Raises
    ------
    TrackingError
        One line naming the missing extra.
    """
    if "tracking" in cfg:
        fix = missing_extra(str(cfg["tracking"]["name"]))
        if fix:
            raise TrackingError(fix)


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved config as dotted keys and string values (``null``, ``true``, JSON lists, ``{}``: an empty group)."""
    flat = flatten_mapping(cfg, prefix)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}


def numbers(fields: Mapping[str, Any], *, depth: int, prefix: str = "") -> dict[str, float]:
    """The int/float values of ``fields`` (not bools), and of groups nested up to ``depth`` levels, as dotted keys."""
    out: dict[str, float] = {}
    for key, value in fields.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, Mapping) and depth > 0:
            out |= numbers(value, depth=depth - 1, prefix=f"{prefix}{key}.")
    return out


class Tracking:
    """What a run directory forwards to: picks steps and numbers, and outlives a failing tracker.

    Parameters
    ----------
    tracker
        The backend.
    name
        Its registered name (for warnings).
    warn
        Called with a one-line message the first (and only) time the tracker fails.
    """

    def __init__(self, tracker: Tracker, *, name: str, warn: Callable[[str], None]) -> None:
        self.tracker: Tracker | None = tracker  # None once it failed
        self._backend = tracker
        self.name, self.warn = name, warn
        self.step = 0

    def _call(self, what: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # a tracker's failure must never end the run
            self.tracker = None
            self.warn(f"tracking={self.name} failed to {what} ({type(exc).__name__}: {exc}); the run goes on untracked")

    def params(self, cfg: Mapping[str, Any]) -> None:
        """Log the resolved config (see :func:`flatten_config`)."""
        if self.tracker is not None:
            self._call("log the config", self.tracker.log_params, flatten_config(cfg))

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        """Log the numbers of a ``metrics.jsonl`` event that has a step (:data:`STEP_KEYS`) as ``event/key``.

        Numbers in groups one level down (``timing.update``) count; deeper ones (per-client
        metrics) and the record's own ``time`` stay in ``metrics.jsonl``.
        """
        steps = (fields[k] for k in STEP_KEYS if isinstance(fields.get(k), int) and not isinstance(fields[k], bool))
        step = next(steps, None)
        if self.tracker is None or step is None:
            return
        self.step = step
        skip = {*STEP_KEYS, "time"}
        metrics = {f"{event}/{k}": v for k, v in numbers(fields, depth=1).items() if k not in skip}
        if metrics:
            self._call("log metrics", self.tracker.log_metrics, metrics, self.step)

    def finish(self, run_dir: Path, summary: Mapping[str, Any], *, failed: bool) -> None:
        """Log ``summary``'s finite numbers as ``summary/...`` at the last step, the artefacts, and close.

        A tracker that failed earlier is only closed (quietly, to release its files).
        """
        final = {f"summary/{k}": v for k, v in numbers(summary, depth=8).items() if math.isfinite(v)}
        if self.tracker is not None and final:
            self._call("log the summary", self.tracker.log_metrics, final, self.step)
        if self.tracker is not None:
            self._call("log the artefacts", self.tracker.log_artifacts, run_dir)
        if self.tracker is not None:
            self._call("close", self.tracker.close, failed=failed)
            return
        with contextlib.suppress(Exception):  # already reported once
            self._backend.close(failed=failed)


def open_tracking(
    cfg: Mapping[str, Any], run_dir: Path, *, resume: bool, warn: Callable[[str], None]
) -> Tracking | None:
    """The tracking of ``cfg["tracking"]`` for ``run_dir``; the config logged unless ``resume``.

    ``None`` for a config without a ``tracking`` group (a run directory from before tracking).

    Raises
    ------
    TrackingError
        When the tracker's library is not installed (before any work starts); a tracker
        that fails to start is reported through ``warn`` and the run goes on untracked.
    """
    if "tracking" not in cfg:
        return None
    check_installed(cfg)
    options = dict(cfg["tracking"])
    name = str(options.pop("name"))
    try:
        tracker = TRACKERS.get(name)(run_dir, resume=resume, **options)
    except Exception as exc:
        warn(f"tracking={name} could not start ({type(exc).__name__}: {exc}); the run goes on untracked")
        return None
    tracking = Tracking(tracker, name=name, warn=warn)
    if not resume:  # a resumed run's params were logged when it started (MLflow refuses to change them)
        tracking.params(cfg)
    return tracking
