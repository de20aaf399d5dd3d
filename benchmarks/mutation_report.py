"""Mutation-testing report of the privacy path, validation and the server's payload checks (issue 17.1).

Reads what ``mutmut run`` (configured in ``pyproject.toml``: ``[tool.mutmut]``) left under
``mutants/`` and writes ``benchmarks/results/mutation-<date>.md``: per module the mutants
killed, survived, timed out and not reached by the selected fast tests, the kill rate, and every
survivor with its diff (``mutmut show``). Survivor reasons are written by hand under the table.

    mutmut run --max-children 2
    python benchmarks/mutation_report.py

A mutant counts as killed when a selected test fails (or times out) with it in place; "no tests"
means no selected test calls the mutated function, so it counts as not killed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from _common import machine_info, results_path

ROOT = Path(__file__).resolve().parent.parent
#: mutmut's exit codes (mutmut.stats.status_by_exit_code) folded into the report's columns.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout"}
STATUS |= {-24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def load(mutants: Path) -> dict[str, dict[str, str]]:
    """``module -> {mutant name: status}`` from mutmut's ``.meta`` files."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mutants", default=str(ROOT / "mutants"))
    ap.add_argument("--out", default="mutation")
    args = ap.parse_args()
    results = load(Path(args.mutants))
    if not results:
        sys.exit(f"no mutmut results under {args.mutants}: run `mutmut run` first")
    cols = ["killed", "timeout", "survived", "no tests", "not checked", "suspicious"]
    lines = [
        f"# Mutation testing (mutmut), {results_path(args.out).stem.split('-', 1)[1]}",
        "",
        f"Machine: {machine_info()}",
        "",
        "Command: `mutmut run --max-children 2`, then `python benchmarks/mutation_report.py` "
        "(mutated modules and selected tests: `[tool.mutmut]` in pyproject.toml; fast tests only, `-m 'not slow'`).",
        "",
        "| module | mutants | " + " | ".join(cols) + " | killed % |",
        "|---|---" + "|---" * len(cols) + "|---|",
    ]
    total: Counter[str] = Counter()
    survivors: list[str] = []
    for module, by_name in results.items():
        counts = Counter(by_name.values())
        total.update(counts)
        dead = counts["killed"] + counts["timeout"]
        rate = 100 * dead / max(1, len(by_name))
        cells = " | ".join(str(counts[c]) for c in cols)
        lines.append(f"| `{module}` | {len(by_name)} | {cells} | {rate:.1f} |")
        survivors += [n for n, s in by_name.items() if s == "survived"]
    n = sum(total.values())
    dead = total["killed"] + total["timeout"]
    reached = n - total["no tests"]
    cells = " | ".join(str(total[c]) for c in cols)
    lines.append(f"| **all** | {n} | {cells} | {100 * dead / max(1, n):.1f} |")
    lines += [
        "",
        f"Killed (or timed out) {dead} of {n} mutants ({100 * dead / max(1, n):.1f}%); "
        f"of the {reached} that a selected test reaches, {100 * dead / max(1, reached):.1f}%.",
        "",
        "## Survivors",
        "",
    ]
    for name in survivors:
        diff = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        body = "\n".join(
            line for line in diff.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))
        )
        lines += [f"- `{name}`", "", "```diff", body or "(no diff)", "```", ""]
    path = results_path(args.out)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
