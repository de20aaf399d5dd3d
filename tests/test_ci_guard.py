"""The CI rules of tests/conftest.py: a skip fails a CI run; Hypothesis is derandomized in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from ci_guard import ci_enabled
from hypothesis import settings

pytest_plugins = ["pytester"]

INNER = """
import pytest

def test_passes():
    pass

def test_skips_in_the_test():
    pytest.skip("no widget on this machine")

@pytest.mark.skipif(True, reason="static skip in setup")
def test_skipif():
    pass

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA device")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""


@pytest.fixture
def inner(pytester: pytest.Pytester):
    pytester.syspathinsert(Path(__file__).parent)  # ci_guard, as tests/conftest.py imports it
    pytester.makepyfile(test_inner=INNER)
    return lambda: pytester.runpytest("-p", "ci_guard", "-p", "no:cacheprovider")


def test_a_skip_fails_the_run_under_ci(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = inner()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # the skip in the test fails it, the setup skip errors it; the gpu test may skip; xfail stays xfail
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*CI=true: skipped tests counted as failures*",
            "test_inner.py::test_skips_in_the_test: no widget on this machine",
            "test_inner.py::test_skipif: static skip in setup",
        ]
    )
    result.stdout.fnmatch_lines(["*skipped under CI=true, which fails the run: no widget on this machine*"])
    assert "test_needs_cuda:" not in result.stdout.str()


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_skip_is_a_skip_outside_ci(inner, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = inner()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_hypothesis_profile_follows_ci():
    """conftest loaded the ``ci`` profile exactly when CI=true (unless HYPOTHESIS_PROFILE chose)."""
    import os

    if os.environ.get("HYPOTHESIS_PROFILE"):
        pytest.skip("HYPOTHESIS_PROFILE chose the profile")  # under CI this skip fails, as it should
    assert settings.default.derandomize is ci_enabled()
    if ci_enabled():
        assert settings.default.deadline is None and settings.default.database is None


def test_every_test_has_a_timeout(pytestconfig):
    """pytest-timeout is installed (the dev extra) and the ini gives every test a limit."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) > 0
