"""``fedistill report DIR...``: collect every run under some directories and group them by config.

A run directory is a directory holding ``config.yaml`` (``.hydra`` and ``mlruns`` folders are skipped)
written by ``fedistill central`` or ``fedistill simulate``: single runs and the jobs of
Hydra multiruns alike; which command wrote it is told by its config (:data:`RUN_KINDS`).
Runs are grouped by their resolved config minus the seed and the keys that never change a
result (:data:`IGNORED_KEYS`); a group's label shows only the settings that tell it apart.
Accuracies are test accuracy in percent, mean and population std over the seeds of a group
(as ``summary.json`` reports evaluation runs). A run that failed or did not finish stays in
the CSV and is listed with its status, never dropped; it does not enter the means.
The report only reads run directories (no Flower, no training); :mod:`fedistill.report_render`
writes its tables and plots.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedistill.dotted import flatten_mapping
from fedistill.io import read_json_object, read_yaml_mapping
from fedistill.registry import Registry

__all__ = [
    "IGNORED_KEYS",
    "RESOURCES_FILE",
    "RUN_KINDS",
    "Group",
    "Report",
    "ReportError",
    "Result",
    "Run",
    "RunKind",
    "collect",
    "group_runs",
    "pareto_front",
    "read_run",
]

# config keys (and key prefixes) left out of the group key: the seed, and what never changes a result
IGNORED_KEYS = ("seed", "resume", "hydra", "verbose", "data.root", "eval.cache_dir", "tracking")
#: optional file of a run directory, written by whoever ran the command and watched its process tree
#: (``benchmarks/_common.py``): ``{"peak_rss_bytes": ..., "wall_seconds": ..., "exit_code": ..., "error": ...}``
#: (``error``: the last line the command wrote to stderr when it failed, shown for a run without one of its own)
RESOURCES_FILE = "resources.json"
# summary["privacy"]: per-client max (federated distillation), spent (central DP engine), FedAvg's
_EPSILON_KEYS = ("epsilon_max", "epsilon_spent", "epsilon")


class ReportError(ValueError):
    """Bad input to the report (a missing directory, no runs); the message names the path and the fix."""


@dataclass(frozen=True)
class Result:
    """What a run's ``summary.json`` says about its outcome (``None``: not there)."""

    accuracy: float | None
    random_subset: float | None = None
    bytes_up: float | None = None
    seconds: float | None = None  # simulate: start to the main result; central: distill + evaluate


@dataclass(frozen=True)
class RunKind:
    """How to recognise and read one command's run directories.

    Parameters
    ----------
    markers
        Top-level config keys that, together, only this command's ``config.yaml`` has.
    read
        ``summary.json`` -> :class:`Result`.
    """

    markers: tuple[str, ...]
    read: Callable[[Mapping[str, Any]], Result]


def _dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or ``None`` where a level is missing."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _read_central(summary: Mapping[str, Any]) -> Result:
    parts = [summary.get("distill_seconds"), summary.get("eval_seconds")]
    seconds = None if None in parts else sum(parts)  # type: ignore[arg-type]
    control = _dig(summary, "baselines", "random_subset", "mean")
    return Result(_dig(summary, "accuracy", "mean"), control, seconds=seconds)


def _read_simulate(summary: Mapping[str, Any]) -> Result:
    control = _dig(summary, "baselines", "random_subset", "accuracy")
    return Result(summary.get("final_accuracy"), control, summary.get("bytes_up"), seconds=summary.get("wall_seconds"))


RUN_KINDS: Registry[RunKind] = Registry("run kind")
RUN_KINDS.register("central")(RunKind(("method", "eval"), _read_central))
RUN_KINDS.register("simulate")(RunKind(("method", "strategy"), _read_simulate))


@dataclass
class Run:
    """One run directory as read: ``status`` is ``done`` only for a finished run with a final accuracy."""

    path: Path
    command: str | None  # a RUN_KINDS name; None: config.yaml unreadable
    config: dict[str, Any]  # the resolved config, flattened to dotted keys
    status: str
    result: Result = field(default_factory=lambda: Result(None))
    epsilon: float | None = None
    peak_gb: float | None = None  # RESOURCES_FILE's peak resident memory of the process tree
    curve: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl round records
    detail: str = ""  # the summary's error (else RESOURCES_FILE's), or why a file could not be read
    warnings: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def complete(self) -> bool:
        return self.status == "done"


@dataclass
class Group:
    """Runs whose configs differ only in the seed (and :data:`IGNORED_KEYS`)."""

    config: dict[str, Any]  # flattened config minus the ignored keys, plus "command"
    runs: list[Run] = field(default_factory=list)
    shown: dict[str, Any] = field(default_factory=dict)  # the settings that tell it apart

    @property
    def label(self) -> str:
        """``key=value, ...`` of the settings that tell this group apart (the command if none do)."""
        return self.describe()

    def describe(self, *, leave_out: Callable[[str], bool] = lambda key: False) -> str:
        """:attr:`label` without the settings for which ``leave_out(key)`` holds."""
        shown = [f"{k}={_value(v)}" for k, v in self.shown.items() if not leave_out(k)]
        return ", ".join(shown) or str(self.config["command"])

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.complete]

    def stat(self, value: Callable[[Run], float | None]) -> tuple[float, float] | None:
        """Mean and population std over the finished runs' ``value`` (``None``: no run has one)."""
        vals = [float(v) for r in self.done if (v := value(r)) is not None]
        return (statistics.fmean(vals), statistics.pstdev(vals)) if vals else None


@dataclass
class Report:
    """Every run found, its groups, and the config directories that are no central/simulate run."""

    runs: list[Run]
    groups: list[Group]
    skipped: list[Path]

    @property
    def incomplete(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]

    def labels(self) -> dict[Path, str]:
        """Each grouped run's group label, by run path."""
        return {r.path: g.label for g in self.groups for r in g.runs}


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED_KEYS)


def _curve(path: Path) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (the last one per round: a resumed run repeats rounds)."""
    rounds: dict[int, dict[str, Any]] = {}
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(rec, dict) and rec.get("event") == "round" and {"round", "accuracy"} <= rec.keys():
                rounds[int(rec["round"])] = rec
    return [rounds[r] for r in sorted(rounds)]


def _epsilon(summary: Mapping[str, Any]) -> float | None:
    privacy = summary.get("privacy")
    found = [privacy[k] for k in _EPSILON_KEYS if isinstance(privacy, Mapping) and privacy.get(k) is not None]
    return float(found[0]) if found else None


def _resources(path: Path) -> dict[str, Any]:
    """The run's :data:`RESOURCES_FILE` record (empty: not measured, or unreadable)."""
    if not (path / RESOURCES_FILE).is_file():
        return {}
    try:
        return read_json_object(path / RESOURCES_FILE, ReportError, "its memory is not shown")
    except ReportError:
        return {}


def read_run(path: Path) -> Run | None:
    """Read the run directory ``path`` (``None``: its config is no central or simulate run, e.g. an audit)."""
    try:
        cfg = read_yaml_mapping(path / "config.yaml", ReportError, "the run is listed, not grouped")
    except ReportError as exc:
        return Run(path, None, {}, "unreadable config.yaml", detail=str(exc))
    kinds = [name for name in RUN_KINDS if set(RUN_KINDS.get(name).markers) <= cfg.keys()]
    if len(kinds) != 1:
        return None
    run = Run(path, kinds[0], flatten_mapping(cfg), "no summary.json", curve=_curve(path))
    resources = _resources(path)
    if (peak := resources.get("peak_rss_bytes")) is not None:
        run.peak_gb = float(peak) / 1e9
    run.detail = str(resources.get("error") or "")  # a crash before summary.json: the command's own last words
    if not (path / "summary.json").is_file():
        return run
    try:
        summary = read_json_object(path / "summary.json", ReportError, "the run is listed as incomplete")
    except ReportError as exc:
        run.status, run.detail = "unreadable summary.json", str(exc)
        return run
    run.result = RUN_KINDS.get(kinds[0]).read(summary)
    run.status = str(summary.get("status", "no status"))
    if run.complete and run.result.accuracy is None:
        run.status = "no final accuracy"
    run.epsilon = _epsilon(summary)
    run.detail = str(summary.get("error") or run.detail)
    run.warnings = [str(w) for w in summary.get("warnings", [])]
    return run


def _distinguishing(configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per config, the settings that tell it apart: those differing from another config of its command.

    A key under ``method`` is compared only between configs with the same ``method.name``
    (likewise every ``X.name``), so choosing another method does not list every setting
    the two methods' defaults disagree on, and a simulate-only key never labels a central run.
    """
    keys = sorted(set().union(*configs), key=lambda k: (k != "command", not k.endswith(".name"), k))
    shown: list[dict[str, Any]] = [{} for _ in configs]
    for key in keys:
        parts = key.split(".")
        selectors = [s for s in ("command", *(".".join(parts[:i]) + ".name" for i in range(1, len(parts)))) if s != key]
        buckets = [json.dumps([cfg.get(s) for s in selectors], default=str) for cfg in configs]
        values: dict[str, set[str]] = defaultdict(set)
        for bucket, cfg in zip(buckets, configs, strict=True):
            values[bucket].add(json.dumps(cfg.get(key), default=str))
        for i, (bucket, cfg) in enumerate(zip(buckets, configs, strict=True)):
            if len(values[bucket]) > 1:
                shown[i][key] = cfg.get(key)
    return shown


def _natural(value: Any) -> tuple[int, float, str]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, float(value), "") if number else (1, 0.0, str(value))


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group ``runs`` (readable configs only) by config minus the seed; labelled, in a natural order."""
    groups: dict[str, Group] = {}
    for run in runs:
        cfg = {"command": run.command} | {k: v for k, v in run.config.items() if not _ignored(k)}
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), Group(cfg)).runs.append(run)
    for g, shown in zip(groups.values(), _distinguishing([g.config for g in groups.values()]), strict=True):
        g.shown = shown
    return sorted(groups.values(), key=lambda g: [(k, _natural(v)) for k, v in g.shown.items()])


def collect(dirs: Sequence[str | Path]) -> Report:
    """Every run under ``dirs`` (searched recursively), read and grouped.

    Raises
    ------
    ReportError
        A directory does not exist, or there is no central or simulate run under any of them.
    """
    found: set[Path] = set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ReportError(
                f"{d}: {'not a' if d.exists() else 'no such'} directory; pass directories that hold run "
                "directories (outputs/, multirun/, or a run's own directory)"
            )
        # .hydra: Hydra's copy of the config; mlruns: MLflow's artefact copies of tracked runs (tracking=mlflow)
        skip = {".hydra", "mlruns"}
        found |= {p.parent.resolve() for p in d.rglob("config.yaml") if not skip & set(p.relative_to(d).parts)}
    read = {p: read_run(p) for p in sorted(found)}
    runs = [r for r in read.values() if r is not None]
    if not runs:
        raise ReportError(
            f"no fedistill central or simulate run under {', '.join(map(str, dirs))} (a run directory holds "
            "config.yaml and summary.json); pass the directory a run or a sweep wrote, e.g. outputs/ or multirun/"
        )
    groups = group_runs(r for r in runs if r.command is not None)
    return Report(runs, groups, [p for p, r in read.items() if r is None])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(uplink, accuracy)`` points with the highest accuracy for at most their uplink."""
    front: list[int] = []
    best = float("-inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
