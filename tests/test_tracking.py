"""Experiment tracking against the real libraries: TensorBoard event files and an MLflow store read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import fedistill

from fedistill.central import run_central
from fedistill.config import ConfigError, compose_config, validate_config
from fedistill.report import collect
from fedistill.reporting import RunDir
from fedistill.tracking import TensorBoardTracker, TrackingError, open_tracking

TINY = ["method.iterations=6", "method.batch_real=32", "model.width=16", "eval.epochs=2", "eval.runs=1", "ipc=1"]
TINY += ["device=cpu"]
SIM = ["strategy=fedavg", "rounds=2", "clients=2", "device=cpu", "model.width=16", "strategy.local_epochs=1"]


def _events(run: Path, event: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == event]


def _dotted(cfg: dict, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _scalars(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


@pytest.fixture
def mlflow_client(monkeypatch):
    """An MlflowClient factory; the file-store opt-in the tracker sets is undone after the test."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    def make(uri: str):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri)

    return make


def test_central_cli_tensorboard_holds_the_steps_and_values_of_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    fedistill("central", *TINY, "tracking=tensorboard", f"hydra.run.dir={run}", cwd=tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["tracking"] == {
        "name": "tensorboard",
        "log_dir": "tensorboard",
    }
    acc = _scalars(run / "tensorboard")
    distill = _events(run, "distill")
    assert [e["iteration"] for e in distill] == [0, 5]
    for key in ("loss", "seconds"):
        got = acc.Scalars(f"distill/{key}")
        assert [s.step for s in got] == [e["iteration"] for e in distill]
        assert [s.value for s in got] == pytest.approx([e[key] for e in distill], rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    (final,) = acc.Scalars("summary/accuracy.mean")
    assert final.step == 5 and final.value == pytest.approx(summary["accuracy"]["mean"], rel=1e-6)
    tags = acc.Tags()
    assert "synthetic" in tags["images"] and "config/text_summary" in tags["tensors"]
    assert not any(t.startswith("eval/") for t in tags["scalars"])  # events without a step stay in metrics.jsonl


def test_central_mlflow_params_metrics_and_artefacts_read_back(tmp_path, mlflow_client):
    uri = (tmp_path / "store").as_uri()
    cfg = compose_config("central", [*TINY, "tracking=mlflow", f"tracking.uri={uri}", "tracking.experiment=tiny"])
    run = tmp_path / "run"
    summary = run_central(cfg, run)
    state = json.loads((run / "tracking.json").read_text())
    client = mlflow_client(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_id == state["run_id"] and found.info.status == "FINISHED"
    params = found.data.params
    assert params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in _dotted(cfg)}
    assert params["method.iterations"] == "6" and params["tracking.uri"] == uri and params["resume"] == "null"
    distill = _events(run, "distill")
    for key in ("loss", "seconds"):
        history = client.get_metric_history(state["run_id"], f"distill/{key}")
        assert [(m.step, m.value) for m in history] == [(e["iteration"], e[key]) for e in distill]
    (final,) = client.get_metric_history(state["run_id"], "summary/baselines.random_subset.mean")
    assert (final.step, final.value) == (5, summary["baselines"]["random_subset"]["mean"])
    listed = {a.path for a in client.list_artifacts(state["run_id"])}
    assert listed == {"metrics.jsonl", "summary.json", "synthetic.json", "synthetic.png", "synthetic.safetensors"}


def test_mlflow_resume_appends_to_the_same_run_in_cwd_mlruns(tmp_path, monkeypatch, mlflow_client):
    monkeypatch.chdir(tmp_path)  # tracking.uri=null: <cwd>/mlruns
    cfg = compose_config("central", ["tracking=mlflow"])
    first = RunDir(tmp_path / "run").track(cfg)
    first.write_config(yaml.safe_dump(cfg))
    first.log("distill", iteration=0, loss=1.0)
    first.close(failed=True)  # interrupted
    with RunDir(tmp_path / "run", resume=True).track({**cfg, "resume": str(tmp_path / "run")}) as resumed:
        resumed.log("distill", iteration=1, loss=0.5)
        resumed.update_summary(status="done")
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("fedistill").experiment_id])
    history = client.get_metric_history(found.info.run_id, "distill/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)] and found.info.status == "FINISHED"
    assert found.data.params["resume"] == "null"  # the params of the run as started
    # fedistill report skips MLflow's artefact copy of config.yaml under mlruns/
    assert [r.path for r in collect([tmp_path]).runs] == [(tmp_path / "run").resolve()]


def test_simulate_rounds_are_steps(tmp_path, grid):
    from strategies.app import serve

    cfg = compose_config("simulate", [*SIM, "tracking=tensorboard"])
    serve(grid(2), cfg, tmp_path)
    acc = _scalars(tmp_path / "tensorboard")
    rounds = _events(tmp_path, "round")
    for key in ("accuracy", "bytes_up_total", "timing.update"):
        group, _, sub = key.partition(".")
        got = acc.Scalars(f"round/{key}")
        assert [s.step for s in got] == [1, 2] == [r["round"] for r in rounds]
        assert [s.value for s in got] == pytest.approx([r[group][sub] if sub else r[group] for r in rounds])
    assert not any(t.startswith("round/client_metrics") for t in acc.Tags()["scalars"])  # per-client: jsonl only


def test_a_failing_tracker_warns_once_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    calls = []

    def broken(self, metrics, step):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_metrics", broken)
    summary = run_central(compose_config("central", [*TINY, "tracking=tensorboard"]), tmp_path)
    assert summary["status"] == "done" and calls == [0]
    (warning,) = _events(tmp_path, "warning")
    assert warning["message"].startswith("tracking=tensorboard failed to log metrics (OSError: disk full)")
    assert capsys.readouterr().out.count("tracking=tensorboard failed") == 1


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    cfg = compose_config("central", [f"tracking={name}"])
    fix = f"tracking={name} needs the tracking extra ({name} missing): pip install -e '.[tracking]'"
    with pytest.raises(ConfigError) as info:
        validate_config("central", cfg)
    assert str(info.value) == fix
    with pytest.raises(TrackingError, match=r"needs the tracking extra"):
        open_tracking(cfg, tmp_path, resume=False, warn=print)


def test_missing_extra_fails_the_cli_before_any_work(tmp_path):
    run = tmp_path / "run"
    code = "import sys; sys.modules['mlflow'] = None; from fedistill.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["simulate", "tracking=mlflow", f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fedistill simulate: error: tracking=mlflow needs the tracking extra (mlflow missing): "
        "pip install -e '.[tracking]'"
    )
    assert not run.exists()
