"""Shared fixtures: the embedded digits dataset, loaded once per session."""

from __future__ import annotations

import pytest
from inprocess import InProcessGrid

from fedistill.data import DataBundle, load_dataset


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
