"""Crash-safe resume: a run killed with SIGKILL continues from its last checkpoint to the same result."""

from __future__ import annotations

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


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fedistill.cli", *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    start = time.monotonic()
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() - start < timeout, "timed out waiting for the kill point"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _checkpoint_iteration(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["fedistill-checkpoint"])["state"]["iteration"]
    except Exception:
        return 0


def test_central_resumes_after_sigkill_to_the_same_set(tmp_path):
    full = tmp_path / "full"
    fedistill("central", *CENTRAL, f"hydra.run.dir={full}", cwd=tmp_path)
    killed = tmp_path / "killed"
    proc = _spawn(["central", *CENTRAL, f"hydra.run.dir={killed}"], tmp_path)
    ckpt = killed / "distill_checkpoint.safetensors"
    _kill_when(proc, lambda: _checkpoint_iteration(ckpt) >= 20)
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
