"""Crash-safe resume: a run killed with SIGKILL continues from its last checkpoint to the same result."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import fedistill

from fedistill.checkpoint import Checkpoint, CheckpointError
from fedistill.data import SyntheticSet

pytestmark = pytest.mark.slow

CENTRAL = [
    "method.iterations=60",
    "method.batch_real=32",
    "model.width=16",
    "eval.epochs=3",
    "eval.runs=1",
    "device=cpu",
    "ipc=2",
    "checkpoint_every=5",
]


def _spawn(args: list[str], cwd: Path, *, log: Path | None = None) -> subprocess.Popen:
    """``fedistill ARGS`` in its own session (output to ``log``, else discarded)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fedistill.cli", *args]
    out = subprocess.DEVNULL if log is None else log.open("wb")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not None:
            out.close()


def _finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait for a run started by :func:`_spawn` with a ``log``; fail with its last lines if it failed."""
    assert proc.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-3000:]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the run and everything it started (Ray's daemons too) once ``ready()``."""
    start = time.monotonic()
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() - start < timeout, "timed out waiting for the kill point"
            time.sleep(0.05)
    finally:
        tree = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _checkpoint_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["fedistill-checkpoint"])["state"]
    except Exception:  # being replaced right now
        return {}


def _checkpoint_iteration(path: Path) -> int:
    return int(_checkpoint_state(path).get("iteration", 0))


def _checkpoint_rounds(path: Path) -> int:
    return len(_checkpoint_state(path).get("history", []))


def test_central_resumes_after_sigkill_to_the_same_set(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run beside the one to kill (each deterministic; they share only the cores)
    whole = _spawn(["central", *CENTRAL, f"hydra.run.dir={full}"], tmp_path, log=tmp_path / "full.log")
    proc = _spawn(["central", *CENTRAL, f"hydra.run.dir={killed}"], tmp_path)
    ckpt = killed / "distill_checkpoint.safetensors"
    _kill_when(proc, lambda: _checkpoint_iteration(ckpt) >= 20)
    _finished(whole, tmp_path / "full.log")
    assert not (killed / "synthetic.safetensors").exists()  # it really died mid-distillation
    assert 20 <= _checkpoint_iteration(ckpt) < 60
    fedistill("central", f"resume={killed}", cwd=tmp_path)
    a, b = SyntheticSet.load(full / "synthetic.safetensors"), SyntheticSet.load(killed / "synthetic.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sa["accuracy"] == sb["accuracy"] and sb["status"] == "done"
    again = fedistill("central", f"resume={killed}", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "nothing to resume" in again.stderr


def test_checkpoint_refuses_another_configuration_and_corruption(tmp_path):
    path = tmp_path / "c.safetensors"
    Checkpoint(path, key="a").save({"x": torch.ones(2)}, {"iteration": 3})
    tensors, state = Checkpoint(path, key="a").load()
    assert torch.equal(tensors["x"], torch.ones(2)) and state == {"iteration": 3}
    with pytest.raises(CheckpointError, match="different configuration"):
        Checkpoint(path, key="b").load()
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"unreadable checkpoint.*delete it"):
        Checkpoint(path, key="a").load()
    assert Checkpoint(tmp_path / "none.safetensors", key="a").load() is None


SIMULATE = [
    "strategy=fedavg",
    "clients=3",
    "rounds=4",
    "strategy.local_epochs=1",
    "strategy.dp.noise_multiplier=0.5",
    "model.width=16",
    "device=cpu",
    "client.num_cpus=1",
]


def test_simulate_resumes_after_sigkill_to_the_same_model(tmp_path):
    """A DP FedAvg run (Flower's server-side Gaussian mechanism) killed after round 2 of 4 and
    resumed ends with the uninterrupted run's metrics, epsilon and global model, bit for bit on CPU."""
    from fedistill.io import load_tensors

    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run beside the one to kill, each in its own Ray (the kill takes only its own)
    whole = _spawn(["simulate", *SIMULATE, f"hydra.run.dir={full}"], tmp_path, log=tmp_path / "full.log")
    proc = _spawn(["simulate", *SIMULATE, f"hydra.run.dir={killed}"], tmp_path)
    _kill_when(proc, lambda: _checkpoint_rounds(killed / "checkpoint.safetensors") >= 2)
    _finished(whole, tmp_path / "full.log")
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    done = _checkpoint_rounds(killed / "checkpoint.safetensors")
    assert 2 <= done < 4
    fedistill("simulate", f"resume={killed}", cwd=tmp_path)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sb["status"] == "done" and sb["accuracy_history"] == sa["accuracy_history"]
    assert sb["final_accuracy"] == sa["final_accuracy"]
    # Flower's accountant restored, not restarted: the same releases and epsilon as without the kill
    assert sb["privacy"] == sa["privacy"] and sb["privacy"]["releases"] == 4 and sb["privacy"]["epsilon"] > 0
    # bytes include JSON metric records whose timings differ in digits between runs: equal up to a few bytes
    assert abs(sb["bytes_up"] - sa["bytes_up"]) < 64
    a, b = load_tensors(full / "global_model.safetensors"), load_tensors(killed / "global_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(line)["event"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert "resumed" in events


DP_ONESHOT = [
    "method=dp_dm",
    "clients=3",
    "rounds=2",
    "ipc=1",
    "device=cpu",
    "model.depth=2",
    "method.iterations=40",
    "method.releases=10",
    "method.epsilon=4",
    "strategy.server.epochs=50",
    "ray.num_cpus=1",  # one actor for 3 tiny clients: the twin and the killed run share the 2 cores
]


def test_dp_oneshot_killed_after_round_1_resumes_with_every_clients_ledger(tmp_path):
    """`method=dp_dm` in two rounds through Ray, beside an uninterrupted twin. In the twin, each node's
    ledger survives from round 1 to round 2 in its own node state. The other run is SIGKILLed after
    round 1 and resumed in a fresh Ray (fresh nodes: their own ledgers are gone): the server's
    checkpointed mirror carries every client's ledger, so the resumed run ends with the twin's
    per-client epsilon (growing from round 1 to 2, at the budget, never above), accuracy and model."""
    from test_simulate import _check_contract, _rounds

    from fedistill.io import load_tensors

    full, run = tmp_path / "full", tmp_path / "dp"
    whole = _spawn(["simulate", *DP_ONESHOT, f"hydra.run.dir={full}"], tmp_path, log=tmp_path / "full.log")
    proc = _spawn(["simulate", *DP_ONESHOT, f"hydra.run.dir={run}"], tmp_path)
    _kill_when(proc, lambda: _checkpoint_rounds(run / "checkpoint.safetensors") >= 1)
    before = _rounds(run)
    assert len(before) == 1 and json.loads((run / "summary.json").read_text())["status"] == "running"
    _finished(whole, tmp_path / "full.log")
    fedistill("simulate", f"resume={run}", cwd=tmp_path)
    summary = _check_contract(run, synthetic=True)
    rounds, twin = _rounds(run), _rounds(full)
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0] == before[0]
    first, second = (r["epsilon"] for r in rounds)
    assert set(first) == set(second) == {"p0", "p1", "p2"}
    assert all(0 < first[c] < second[c] <= 4.0 * 1.01 for c in first)
    assert [r["epsilon"] for r in twin] == [first, second]  # the same ledgers as without the kill

    def node_releases(rnd: dict) -> dict[str, float]:
        return {c: m["node_ledger_releases"] for c, m in rnd["client_metrics"].items()}

    # round 2 of the twin read each node's own ledger (round 1's releases); the resumed run's fresh
    # nodes had none, and only the server's mirror kept their budget
    assert node_releases(twin[0]) == node_releases(rounds[0]) == dict.fromkeys(first, 0)
    assert node_releases(twin[1]) == dict.fromkeys(first, 10) and node_releases(rounds[1]) == dict.fromkeys(first, 0)
    privacy = summary["privacy"]
    assert privacy["epsilon_max"] == pytest.approx(4.0, rel=0.02) and privacy["delta"] == 1e-5
    assert any("class_counts" in p for p in privacy["public"])
    sa = json.loads((full / "summary.json").read_text())
    assert summary["privacy"] == sa["privacy"] and summary["final_accuracy"] == sa["final_accuracy"]
    a, b = load_tensors(full / "global_model.safetensors"), load_tensors(run / "global_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 1
