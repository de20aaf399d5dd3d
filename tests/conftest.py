"""Shared fixtures: the embedded digits dataset, loaded once per session."""

from __future__ import annotations

import pytest

from fedistill.data import DataBundle, load_dataset


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_dataset("digits")
