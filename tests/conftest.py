"""Shared fixtures (the embedded digits dataset, loaded once per session) and the CI rules.

Under ``CI=true`` (``.ci/run`` sets it): a skipped test fails the run (``ci_guard``, whose
docstring lists the one exemption, ``@pytest.mark.gpu``), and Hypothesis runs the ``ci``
profile: derandomized (the same examples on every run, so a red CI is reproducible and
a green one is not luck), no example database, no deadline and no ``too_slow`` health check
(timings on a shared 2-core machine are noise). Locally Hypothesis keeps its randomized
``default`` profile, which keeps finding new examples; ``HYPOTHESIS_PROFILE=ci`` replays CI.
Every test also has pytest-timeout's per-test limit (``[tool.pytest.ini_options]``).
"""

from __future__ import annotations

import os
import sys

import pytest
from ci_guard import ci_enabled, pytest_configure, pytest_runtest_makereport, pytest_terminal_summary
from hypothesis import HealthCheck, settings
from inprocess import InProcessGrid

from fedistill.data import DataBundle, load_dataset

__all__ = ["pytest_configure", "pytest_runtest_makereport", "pytest_terminal_summary"]

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if ci_enabled() else "default"))

if "mutmut" in sys.modules:  # under `mutmut run`, which forks this process for every mutant
    import torch

    # a child forked after torch's intra-op thread pool ran deadlocks in its first parallel op
    # (the in-process audit's training hung at 0% CPU until each mutant's timeout)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts with the process's own torch thread count: a client task run in process
    (the in-process grid, ``distill_task``) sets the count for its node, as it should in a Ray actor
    or a SuperNode, and left alone that one thread would slow every later test of the session
    (2-core CPU: ``test_dm_beats_random_subset_at_ipc10`` took 53 s after such tests, 28 s alone)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_dataset("digits")


@pytest.fixture
def grid(monkeypatch):
    """An in-process grid factory; the server side builds Messages as inside a Flower run (run id set)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    return InProcessGrid
