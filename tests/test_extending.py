"""docs/extending.md as written: its engine and strategy examples run, and their own tests pass."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_builds_an_engine_and_a_strategy_that_pass_their_tests(tmp_path, grid, monkeypatch):
    blocks = _python_blocks()
    # engine module, engine test, a strategy in a Flower user's ServerApp, strategy module, strategy test
    assert len(blocks) == 5
    from fedistill.engines import ENGINES
    from strategies.app import STRATEGIES  # every strategy module imported (registered) before the copy

    for registry in (ENGINES, STRATEGIES):  # the page's registrations end with this test
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    module = types.ModuleType("extending_doc")  # dataclasses look their module up in sys.modules
    module.run_dir, module.grid = tmp_path, grid
    sys.modules[module.__name__] = module
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    assert module.summary["final_accuracy"] > 10
    from fedistill.config_store import engine_defaults

    # the page's YAML option restates nothing: its keys come from the config dataclass
    assert engine_defaults("herding_doc") == {"name": "herding_doc", "min_class_samples": 1}
    from flwr.serverapp import ServerApp

    assert isinstance(module.app, ServerApp)  # the page's own ServerApp (tests/test_flower_strategy.py runs one)
