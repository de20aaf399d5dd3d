"""The resume matrix: every strategy, crashed after round k and resumed from its round
checkpoint, ends where the uninterrupted run ends, bit for bit on CPU.

The crash is an exception raised as round k + 1 starts (after round k's checkpoint is on
disk), in process, so every strategy's restore is checked quickly; ``test_resume.py`` kills
real processes (SIGKILL) through the real Ray simulation and the central CLI. The last test
does the same for every resumable engine's own distillation checkpoint (``central``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedistill.config import compose_config
from fedistill.data import load_dataset
from fedistill.io import load_tensors
from fedistill.reporting import RunDir

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

FAST = (
    "device=cpu",
    "model.width=16",
    "clients=3",
)
DISTILL = (
    "strategy.random_baseline=false",
    "method.iterations=10",
    "strategy.server.epochs=3",
    "strategy.server.max_steps=20",
)
CASES = {
    "oneshot": ("oneshot", *DISTILL, "strategy.rounds=2"),
    "oneshot_dp": ("oneshot", "method=dp_dm", "method.epsilon=4", "method.releases=3", "strategy.rounds=2", *DISTILL),
    "feddm": ("feddm", *DISTILL, "strategy.rounds=2", "strategy.min_class_samples=1"),
    "fedaf": ("fedaf", *DISTILL, "strategy.rounds=2"),
    "dynafed": (
        "dynafed",
        "strategy.rounds=3",
        "strategy.random_baseline=false",
        "strategy.trajectory_rounds=2",
        "strategy.local_epochs=1",
        "strategy.distill.iterations=3",
        "strategy.finetune_steps=2",
        "strategy.server.epochs=3",
    ),
    "fedgen": ("fedgen", "strategy.rounds=3", "strategy.gen_rounds=2", "strategy.local_epochs=1", *DISTILL),
    "fedavg_dp": ("fedavg", "strategy.rounds=3", "strategy.local_epochs=1", "strategy.dp.noise_multiplier=1.0"),
}
CRASH_AFTER = 1


class Crash(RuntimeError):
    """The stand-in for a killed server process."""


def _strategy(name: str, path: Path, overrides: tuple[str, ...], *, resume: bool):
    from strategies.app import STRATEGIES

    cfg = compose_config("simulate", [f"strategy={name}", *FAST, *overrides])
    return STRATEGIES.get(name)(cfg, RunDir(path, resume=resume), load_dataset("digits"))


def _assert_same(a: object, b: object, where: str = "summary") -> None:
    """``a == b`` up to what a resume legitimately changes: wall times and timings
    (``*seconds``, ``time``, ``timing``), this process's checkpoint cost, the run directory's own
    paths (``*_path``), the clients' self-reported footprint, and byte counts, which include the
    clients' JSON metric records whose timings differ in digits between runs (within 64 bytes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        skip = ("time", "timing", "checkpoint", "client_metrics")
        keep = [k for k in a.keys() | b.keys() if not (k in skip or str(k).endswith(("seconds", "_path")))]
        for k in keep:
            assert k in a and k in b, f"{where}.{k} is missing on one side"
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif "bytes" in where.rsplit(".", 1)[-1] and isinstance(a, int | float):
        assert abs(a - b) < 64, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a} != {b}"


def _rounds(path: Path) -> dict[int, dict]:
    """The last round record per round, without timings (a resumed run repeats no round)."""
    out = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "round":
            out[rec["round"]] = rec
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_crashed_run_resumes_to_the_uninterrupted_result(case, tmp_path, grid):
    name, *overrides = CASES[case]
    overrides = tuple(overrides)
    full_dir, crashed_dir = tmp_path / "full", tmp_path / "crashed"
    full = _strategy(name, full_dir, overrides, resume=False).run_rounds(grid(3))

    crashing = _strategy(name, crashed_dir, overrides, resume=False)
    run_round = crashing.run_round

    def crash_after_k(grid, r):
        if r > CRASH_AFTER:
            raise Crash(f"killed before round {r}")
        return run_round(grid, r)

    crashing.run_round = crash_after_k
    with pytest.raises(Crash):
        crashing.run_rounds(grid(3))
    assert not (crashed_dir / "global_model.safetensors").exists()
    resumed = _strategy(name, crashed_dir, overrides, resume=True)
    summary = resumed.run_rounds(grid(3), resume=True)

    events = [json.loads(line)["event"] for line in (crashed_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 1 and "round" in events[events.index("resumed") :]
    _assert_same(summary, full)
    _assert_same(_rounds(crashed_dir), _rounds(full_dir), "rounds")
    a = load_tensors(full_dir / "global_model.safetensors")
    b = load_tensors(crashed_dir / "global_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_strategy_does_not_equal_the_resumed_one(tmp_path, grid):
    """The matrix's check is not vacuous: a DP FedAvg run that skips round 1 without restoring
    its checkpoint under-reports epsilon (the accountant forgot a release), which the matrix's
    equality with the uninterrupted run rules out."""
    name, *overrides = CASES["fedavg_dp"]
    overrides = tuple(overrides)
    full = _strategy(name, tmp_path / "full", overrides, resume=False).run_rounds(grid(3))
    other = _strategy(name, tmp_path / "other", overrides, resume=False)
    other.restore_checkpoint = lambda: CRASH_AFTER  # claims round 1 is done but restores nothing
    summary = other.run_rounds(grid(3), resume=True)
    assert summary["privacy"]["releases"] == 2 and full["privacy"]["releases"] == 3
    assert summary["privacy"]["epsilon"] < full["privacy"]["epsilon"]  # what a lost accountant would report


class _Killed(RuntimeError):
    """Raised from the progress callback: the distillation dies mid-run."""


@pytest.mark.parametrize("method", ["dm", "dm_hom", "fedaf", "feddm"])
def test_every_resumable_engine_resumes_a_killed_distillation_to_the_same_set(method, tmp_path, digits):
    """`central` for every resumable engine: a distillation that dies after its iteration-8
    checkpoint, resumed from it, continues from iteration 9 and ends with the uninterrupted
    run's images and labels."""
    from fedistill.checkpoint import Checkpoint
    from fedistill.engines import ENGINES, build_engine

    assert ENGINES.get(method).takes("checkpoint")
    opts = {"iterations": 16, "batch_real": 32, "model_kwargs": {"width": 16}, "log_every": 2}
    whole = build_engine(method, **opts).distill(digits.train, 2, seed=3)
    ckpt = Checkpoint(tmp_path / f"{method}.safetensors", key=method, every=8)

    def die_after_the_checkpoint(step: int, total: int, metrics: dict) -> None:
        if step > 10:
            raise _Killed(step)

    with pytest.raises(_Killed):
        build_engine(method, **opts).distill(
            digits.train, 2, seed=3, checkpoint=ckpt, progress=die_after_the_checkpoint
        )
    assert ckpt.load() is not None
    steps: list[int] = []
    resumed = build_engine(method, **opts).distill(
        digits.train, 2, seed=3, checkpoint=ckpt, progress=lambda step, total, metrics: steps.append(step)
    )
    assert steps and min(steps) > 8  # continued after the checkpoint, not restarted (that would match too)
    assert torch.equal(whole.images, resumed.images) and torch.equal(whole.labels, resumed.labels)
