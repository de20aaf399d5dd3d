"""The CLI end to end on digits with a tiny budget: the run-directory contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedistill.cli import config_dir
from fedistill.config import compose_config
from fedistill.data import DATASETS, SyntheticSet
from fedistill.engines import ENGINES, build_engine
from fedistill.models import MODELS

TINY = ["method.iterations=6", "method.batch_real=32", "model.width=16", "eval.epochs=3", "eval.runs=2", "device=cpu"]


def fedistill(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "fedistill.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fedistill {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def central_cli(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("central") / "run"
    return out, fedistill("central", *TINY, "ipc=2", f"hydra.run.dir={out}", cwd=out.parent)


@pytest.fixture(scope="module")
def central_run(central_cli) -> Path:
    return central_cli[0]


def test_central_ends_with_its_run_directory_and_accuracy(central_cli):
    out, proc = central_cli
    accuracy = json.loads((out / "summary.json").read_text())["accuracy"]["mean"]
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {out.resolve()}  (test accuracy {accuracy:.2f}%)"


def test_central_run_directory_contract(central_run):
    files = {p.name for p in central_run.iterdir()}
    assert {
        "config.yaml",
        "synthetic.safetensors",
        "synthetic.json",
        "synthetic.png",
        "metrics.jsonl",
        "summary.json",
    } <= files
    summary = json.loads((central_run / "summary.json").read_text())
    assert summary["method"] == "dm" and summary["dataset"] == "digits" and summary["ipc"] == 2 and summary["seed"] == 0
    assert set(summary["accuracy"]) >= {"mean", "std", "runs"} and len(summary["accuracy"]["runs"]) == 2
    assert set(summary["baselines"]["random_subset"]) >= {"mean", "std"}
    assert summary["distill_seconds"] > 0 and summary["status"] == "done"
    syn = SyntheticSet.load(summary["synthetic_path"])
    assert len(syn) == 20 and syn.metadata["method"] == "dm" and syn.metadata["ipc"] == 2
    events = [json.loads(line) for line in (central_run / "metrics.jsonl").read_text().splitlines()]
    losses = [e for e in events if e["event"] == "distill"]
    assert losses and all("loss" in e and "seconds" in e for e in losses)
    assert (central_run / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = yaml.safe_load((central_run / "config.yaml").read_text())
    assert cfg["method"]["iterations"] == 6 and cfg["model"]["width"] == 16


def test_evaluate_command_reevaluates_saved_set(central_run, tmp_path):
    out = tmp_path / "ev"
    proc = fedistill(
        "evaluate",
        str(central_run / "synthetic.safetensors"),
        "eval.epochs=2",
        "eval.runs=1",
        "device=cpu",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits" and len(summary["accuracy"]["runs"]) == 1
    assert "random_subset" in summary["baselines"]
    # no model=...: the set's own model (the run distilled and evaluated with width 16), not the group default
    assert list(summary["per_model"]) == ["convnet-w16"]
    last = f"run directory: {out.resolve()}  (test accuracy {summary['accuracy']['mean']:.2f}%)"
    assert proc.stdout.strip().splitlines()[-1] == last
    other = tmp_path / "ev-mlp"
    args = ["eval.epochs=2", "eval.runs=1", "device=cpu", "model=mlp", f"hydra.run.dir={other}"]
    fedistill("evaluate", str(central_run / "synthetic.safetensors"), *args, cwd=tmp_path)
    assert list(json.loads((other / "summary.json").read_text())["per_model"]) == ["mlp-w128"]


def test_evaluate_of_a_set_without_its_model_is_an_input_error_naming_the_fix(digits, tmp_path):
    """A set that records no model: a SyntheticSetError (the CLI prints it as one line, no traceback)."""
    from fedistill.central import run_evaluate
    from fedistill.config import compose_config
    from fedistill.data import SyntheticSetError

    train = digits.train
    path = SyntheticSet(train.images[:10], train.labels[:10], digits.info).save(tmp_path / "s.safetensors")
    with pytest.raises(SyntheticSetError, match=r"records no model\. Fix: choose one: model=convnet"):
        run_evaluate(compose_config("evaluate", [f"synthetic_path={path}"]), tmp_path / "ev")


def test_a_failed_run_ends_with_its_directory_and_the_resume_that_continues_it(tmp_path):
    """``resume=`` is offered for a resumable command whose unfinished run left a checkpoint, and only then."""
    from fedistill.cli import _failed_line

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "distilling"}')
    failed = f"run directory: {run.resolve()}  (failed)"
    assert _failed_line("central", run, resumable=True) == failed  # nothing saved yet: nothing to continue
    (run / "distill_checkpoint.safetensors").write_bytes(b"")
    hint = f"continue from its checkpoint: fedistill central resume={run.resolve()}"
    assert _failed_line("central", run, resumable=True) == f"run directory: {run.resolve()}  (failed; {hint})"
    assert _failed_line("evaluate", run, resumable=False) == failed
    (run / "summary.json").write_text('{"status": "done"}')  # e.g. the random-subset control failed afterwards
    assert _failed_line("central", run, resumable=True) == failed


def test_unknown_choice_lists_valid_names(tmp_path):
    proc = fedistill("central", "method=nope", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Available options in 'method'" in proc.stderr and "dm" in proc.stderr
    proc = fedistill("central", "dataset=imagenet", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "fashion_mnist" in proc.stderr


def test_bad_input_is_one_clear_line(tmp_path):
    proc = fedistill("evaluate", str(tmp_path / "missing.safetensors"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing.safetensors does not exist" in proc.stderr and "Fix:" in proc.stderr
    proc = fedistill("central", "dataset=mnist", f"data.root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "dataset 'mnist' not found" in proc.stderr and "data.root=DIR" in proc.stderr


@pytest.mark.parametrize("command", ["central", "simulate"])
def test_help_shows_the_common_overrides_first_and_they_exist(command, tmp_path):
    """``--help`` opens with the common overrides; every option it names for a config group
    (``group=a|b|c``) is one of that group's real options, so the list cannot go stale."""
    out = fedistill(command, "--help", cwd=tmp_path).stdout
    common, rest = out.split("== Configuration groups ==", 1)
    assert out.startswith(f"fedistill {command}: ") and "== Common overrides" in common
    groups = dict(line.split(": ", 1) for line in rest.split("== Config", 1)[0].strip().splitlines())
    named = re.findall(r"(?<![.\w])(\w+)=((?:\w+\|)+\w+)", common)
    assert {"dataset", "method", "tracking"} <= {g for g, _ in named}
    for group, options in named:
        if group in groups:
            assert set(options.split("|")) <= set(groups[group].split(", ")), (group, options)
    assert "dataset: cifar10, digits, fashion_mnist, mnist" in rest and "name: digits" in rest


def test_multirun_sweep(tmp_path):
    fedistill("central", "-m", *TINY, "eval.runs=1", "ipc=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [json.loads(p.read_text())["ipc"] for p in summaries] == [1, 2]


def test_config_tree_matches_registries():
    root = config_dir()
    methods = {p.stem for p in (root / "method").glob("*.yaml")}
    assert methods == set(ENGINES.names())
    for name in methods:
        opts = compose_config("central", [f"method={name}"])["method"]
        assert opts.pop("name") == name
        build_engine(name, **opts)  # every option is a real config field
    assert {yaml.safe_load(p.read_text())["name"] for p in (root / "model").glob("*.yaml")} <= set(MODELS.names())
    assert {p.stem for p in (root / "dataset").glob("*.yaml")} == set(DATASETS.names())


def test_simulate_config_tree_matches_registries():
    from fedistill.data.partition import PARTITIONERS
    from strategies.app import STRATEGIES

    root = config_dir()
    assert {p.stem for p in (root / "strategy").glob("*.yaml")} == set(STRATEGIES.names())
    for path in (root / "strategy").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["name"] == path.stem
    schemes = {yaml.safe_load(p.read_text())["scheme"] for p in (root / "partition").glob("*.yaml")}
    assert schemes == set(PARTITIONERS.names())


def test_simulate_card_command_resolves():
    """`fedistill simulate strategy=feddm clients=100 alpha=0.1` resolves to what it says."""
    from fedistill.config import compose_config

    cfg = compose_config("simulate", ["strategy=feddm", "clients=100", "alpha=0.1"])
    assert cfg["strategy"]["name"] == "feddm" and cfg["clients"] == 100
    assert cfg["partition"] == {"scheme": "dirichlet", "alpha": 0.1}
    assert cfg["rounds"] == cfg["strategy"]["rounds"]
    assert compose_config("simulate", ["rounds=7"])["rounds"] == 7


def test_simulate_unknown_strategy_lists_the_valid_ones(tmp_path):
    proc = fedistill("simulate", "strategy=nope", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "feddm" in proc.stderr and "oneshot" in proc.stderr


@pytest.mark.slow
def test_wheel_ships_configs_and_packages(tmp_path):
    """Built as a wheel and installed elsewhere, the CLI still finds its config tree."""
    pytest.importorskip("hatchling")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(repo),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("fedistill-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for pkg in ("fedistill", "protocol", "strategies", "clients"):
        assert (target / pkg / "__init__.py").is_file()
    code = "from fedistill.cli import config_dir; print(config_dir())"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert Path(out.stdout.strip()) == target / "fedistill" / "_configs"
    assert (target / "fedistill" / "_configs" / "method" / "dm.yaml").is_file()
