"""Pytest plugin: under ``CI=true`` a skipped test is a failure (loaded by ``tests/conftest.py``).

A CI run that skips a test has not tested it: a missing binary, dataset or optional
dependency would otherwise turn a red test into a quiet "s" and the run green. With
``CI`` set to ``true``/``1``/``yes``/``on``, every skip (``pytest.skip``, ``skipif``,
``importorskip``, in setup or in the test) is reported as a failure whose message gives
the skip's reason, and the end of the run lists every such test with its reason.

Exempt, and only these: tests marked ``@pytest.mark.gpu`` (they need a CUDA device, which
the CI machine does not have). ``xfail`` is not a skip and is left alone. Outside CI
(``CI`` unset or any other value) skips are ordinary skips.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["EXEMPT_MARKERS", "ci_enabled"]

#: Markers whose tests may skip under CI=true (register new ones in pytest_configure below).
EXEMPT_MARKERS = ("gpu",)

_SKIPS = pytest.StashKey[list[tuple[str, str]]]()


def ci_enabled() -> bool:
    """True when the ``CI`` environment variable says this is a CI run."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; the only tests that may skip under CI=true (tests/ci_guard.py)"
    )
    config.stash[_SKIPS] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if not report.skipped or hasattr(report, "wasxfail") or not ci_enabled():
        return report
    if any(item.get_closest_marker(name) for name in EXEMPT_MARKERS):
        return report
    reason = _reason(report)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, which fails the run: {reason}\n"
        f"(a CI run must run every test; only tests marked {', '.join(f'@pytest.mark.{m}' for m in EXEMPT_MARKERS)} "
        "may skip, see tests/ci_guard.py)"
    )
    item.config.stash[_SKIPS].append((item.nodeid, reason))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = config.stash.get(_SKIPS, [])
    if skipped:
        terminalreporter.section("CI=true: skipped tests counted as failures", sep="=", red=True, bold=True)
        for nodeid, reason in skipped:
            terminalreporter.write_line(f"{nodeid}: {reason}")
