"""Mutation-testing report of the privacy path, validation and the server's payload checks (issue 17.1).

Reads what ``mutmut run`` (configured in ``pyproject.toml``: ``[tool.mutmut]``) left under
``mutants/`` and writes ``benchmarks/results/mutation-<date>.md``: per module the mutants
killed, survived, timed out and not reached by the selected fast tests, the kill rate, and every
survivor with its diff (``mutmut show``). Survivor reasons are written by hand under the table.

    mutmut run --max-children 2
    python benchmarks/mutation_report.py

A follow-up run may re-check only an earlier report's survivors (the code under mutation unchanged):

    mutmut run --max-children 2 $(names of the survivors in benchmarks/results/mutation-<date>.md)
    python benchmarks/mutation_report.py --rerun-of benchmarks/results/mutation-<date>.md

The table then counts the re-checked mutants only, and one line adds the earlier report's totals.

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


def previous_totals(report: Path) -> dict[str, int]:
    """The ``**all**`` row of an earlier report: mutants, killed, timeout, survived, no tests."""
    for line in report.read_text().splitlines():
        if line.startswith("| **all** |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            keys = ["mutants", "killed", "timeout", "survived", "no tests"]
            return {k: int(v) for k, v in zip(keys, cells[1:6], strict=True)}
    raise SystemExit(f"{report}: no '| **all** |' row; pass the report of a full run")


def rerun_summary(report: Path, rechecked: int, dead: int, *, also_killed: int = 0) -> list[str]:
    """Lines that fold a re-run of ``report``'s survivors into its totals.

    ``also_killed``: survivors of ``report`` that other re-runs since killed and this one did not re-check.
    """
    prev = previous_totals(report)
    total_dead = prev["killed"] + prev["timeout"] + also_killed + dead
    reached = prev["mutants"] - prev["no tests"]
    return [
        f"Re-run of the {rechecked} survivors of `{report.name}` ({prev['survived']} listed there); the modules "
        f"under mutation are unchanged since, so its other mutants keep their status there: "
        f"{prev['killed'] + prev['timeout']} killed or timed out, {prev['no tests']} reached by no selected test"
        + (
            f"; other re-runs since killed {also_killed} of its survivors that this run did not re-check."
            if also_killed
            else "."
        ),
        "",
        f"**Combined: {total_dead} of {prev['mutants']} mutants killed ({100 * total_dead / prev['mutants']:.1f}%); "
        f"of the {reached} that a selected test reaches, {100 * total_dead / reached:.1f}%.**",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mutants", default=str(ROOT / "mutants"))
    ap.add_argument("--out", default="mutation")
    ap.add_argument("--rerun-of", help="an earlier report whose survivors this run re-checked")
    ap.add_argument(
        "--also-killed",
        type=int,
        default=0,
        help="survivors of the --rerun-of report that other re-runs killed since and this run did not re-check",
    )
    args = ap.parse_args()
    results = load(Path(args.mutants))
    if args.rerun_of:  # only the re-checked mutants count here; the rest keep the earlier report's status
        results = {m: {n: st for n, st in by.items() if st != "not checked"} for m, by in results.items()}
        results = {m: by for m, by in results.items() if by}
    if not results:
        sys.exit(f"no mutmut results under {args.mutants}: run `mutmut run` first")
    cols = ["killed", "timeout", "survived", "no tests", "not checked", "suspicious"]
    lines = [
        f"# Mutation testing (mutmut), {results_path(args.out).stem.split('-', 1)[1]}",
        "",
        f"Machine: {machine_info()}",
        "",
        (
            f"Command: `mutmut run --max-children 2 NAMES` (NAMES: survivors listed in `{Path(args.rerun_of).name}`), "
            f"then `python benchmarks/mutation_report.py --rerun-of {args.rerun_of}`"
            if args.rerun_of
            else "Command: `mutmut run --max-children 2`, then `python benchmarks/mutation_report.py`"
        )
        + " (mutated modules and selected tests: `[tool.mutmut]` in pyproject.toml; fast tests only, `-m 'not slow'`).",
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
    ]
    if args.rerun_of:
        lines += [*rerun_summary(Path(args.rerun_of), n, dead, also_killed=args.also_killed), ""]
    lines += ["## Survivors", ""]
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
