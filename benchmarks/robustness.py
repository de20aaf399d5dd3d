"""Robustness benchmark: hostile clients against server defences, as real `fedistill simulate` runs.

For every strategy it runs a clean point per defence (``attack.fraction=0``: the defence's
cost on honest clients, and the backdoor trigger's natural success rate), then every
attack at every fraction of hostile clients with and without each defence. Each point is
one subprocess (Flower simulation engine on Ray) with the same seed, partition and recipe;
a row records the final test accuracy, the clean accuracy of the same strategy and
defence, the backdoor's success rate on triggered test images, which clients the defence
dropped (hostile / honest) and the checkpoint overhead (seconds per round, bytes). The run
directories stay under ``--workdir``; the results, rewritten after every point, are
``fedistill report`` over them (``benchmarks/results/<out>-<date>.md``, ``.csv``, ``.html``:
accuracy, the random-subset control, uplink, seconds, peak GB, failed runs with their
error) followed by this attacks table.

    python benchmarks/robustness.py --dataset digits --clients 10 --alpha 0.5 \\
        --strategies oneshot,feddm,fedaf,fedavg --attacks label_flip,backdoor --fractions 0.2,0.4 \\
        --out robustness_digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import point_status, report_results, results_header, run_point, workdir
from federated import MODEL_STRATEGIES

from fedistill.report_render import Table

DEFENSES = {"sets": "none,screen,robust_proto", "models": "none,median,krum"}
"""Defences tried per strategy kind (clients sending synthetic sets / models) unless given."""

STRATEGY_ATTACKS = {"stats_poison": {"fedaf"}, "syn_label_flip": None, "noise": None, "duplicate": None}
"""Attacks that only some strategies can suffer (``None``: every synthetic-set strategy)."""


def _applies(attack: str, strategy: str) -> bool:
    if attack not in STRATEGY_ATTACKS:
        return True
    only = STRATEGY_ATTACKS[attack]
    return strategy not in MODEL_STRATEGIES if only is None else strategy in only


def _events(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def _dropped(run: Path, hostile: set[str]) -> str:
    """``hostile/honest`` counts of the distinct clients a defence or policy dropped in any round."""
    gone = {e["client"] for kind in ("defense_dropped", "policy_dropped") for e in _events(run, kind)}
    return f"{len(gone & hostile)}/{len(gone - hostile)}"


def _checkpoint(run: Path) -> str:
    ck = _events(run, "checkpoint")
    if not ck:
        return "-"
    return f"{sum(e['seconds'] for e in ck) / len(ck):.3f} s, {ck[-1]['bytes'] / 1e6:.2f} MB"


HEADERS = (
    *("strategy", "attack", "hostile", "defense", "accuracy %", "clean %", "drop"),
    *("ASR %", "clean ASR %", "dropped h/h", "checkpoint"),
)
"""The attacks table (the random-subset control, uplink, seconds, peak GB, errors: the report's)."""


def _pct(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _row(point: tuple[str, str, str, str], summary: dict, clean: dict, out: Path) -> tuple[str, ...]:
    """The attacks-table row of ``point`` (strategy, attack, fraction, defence) run into ``out``;
    ``clean``: the accuracy and ASR of the same strategy and defence with no hostile client."""
    strategy, attack, frac, defense = point
    acc, att = summary.get("final_accuracy"), summary.get("attack") or {}
    drop = None if acc is None or clean.get("accuracy") is None else clean["accuracy"] - acc
    asr = att.get("attack_success_rate") if attack == "backdoor" else None
    cells = [strategy, attack if frac != "0" else "(clean)", f"{float(frac):.0%}", defense, _pct(acc)]
    cells += [_pct(clean.get("accuracy")), _pct(drop, "+.2f"), _pct(asr, ".1f"), _pct(clean.get("asr"), ".1f")]
    return (*cells, _dropped(out, set(att.get("clients") or [])), _checkpoint(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--clients", default="10")
    ap.add_argument("--alpha", default="0.5")
    ap.add_argument("--strategies", default="oneshot,feddm,fedaf,fedavg")
    ap.add_argument("--attacks", default="label_flip,backdoor")
    ap.add_argument("--fractions", default="0.2,0.4")
    ap.add_argument("--set-defenses", default=DEFENSES["sets"], help="defences of synthetic-set strategies")
    ap.add_argument("--model-defenses", default=DEFENSES["models"], help="defences of fedavg / dynafed")
    ap.add_argument("--extra", default="", help="extra Hydra overrides for every point, space-separated")
    ap.add_argument("--strategy-extra", action="append", default=[], help="STRATEGY:OVERRIDE (repeatable)")
    ap.add_argument("--out", default="robustness")
    ap.add_argument("--workdir", default=None, help="where the run directories stay (default: a new temp dir)")
    opts = ap.parse_args()
    work = workdir(opts.workdir, "robust")
    header = results_header(
        f"Robustness benchmark ({opts.dataset}, {opts.clients} clients, alpha {opts.alpha})",
        "Each run is one `fedistill simulate` subprocess (Flower simulation engine on Ray) with seed 0; the\n"
        "report's tables come first (a group per strategy, defence, attack and hostile fraction), then the\n"
        "attacks table. Accuracy: global model on the real test set after the last round; clean: the same\n"
        "strategy and defence with no hostile client; drop: clean minus accuracy; ASR: share of triggered\n"
        "test images (other classes) classified as the backdoor target. Dropped: distinct clients a defence\n"
        "dropped in any round, hostile/honest. Checkpoint: mean seconds to write the round checkpoint, and\n"
        "its size.",
    )
    extra = opts.extra.split() if opts.extra else []
    per_strategy: dict[str, list[str]] = {}
    for item in opts.strategy_extra:
        name, override = item.split(":", 1)
        per_strategy.setdefault(name, []).append(override)
    base = [f"dataset={opts.dataset}", f"clients={opts.clients}", f"alpha={opts.alpha}"]
    rows: list[tuple[str, ...]] = []
    for strategy in opts.strategies.split(","):
        kind = "models" if strategy in MODEL_STRATEGIES else "sets"
        defenses = (opts.model_defenses if kind == "models" else opts.set_defenses).split(",")
        clean: dict[str, dict] = {}
        points = [("backdoor", "0", d) for d in defenses]  # clean: nobody attacks (natural ASR)
        points += [
            (attack, frac, d)
            for attack in opts.attacks.split(",")
            if _applies(attack, strategy)
            for frac in opts.fractions.split(",")
            for d in defenses
        ]
        for attack, frac, defense in points:
            args = [*base, f"strategy={strategy}", f"defense={defense}", f"attack.kind={attack}"]
            args += [f"attack.fraction={frac}", *extra, *per_strategy.get(strategy, [])]
            out = work / f"{strategy}-{attack}-{frac}-{defense}"
            s, wall, _, rc = run_point(args, out)
            if frac == "0":
                att = s.get("attack") or {}
                clean[defense] = {"accuracy": s.get("final_accuracy"), "asr": att.get("attack_success_rate")}
            rows.append(_row((strategy, attack, frac, defense), s, clean.get(defense, {}), out))
            table = Table("Attacks and defences", HEADERS, rows)
            status = point_status(s, rc, wall)
            print(f"{out.name}: {status}; {report_results([work], opts.out, header, [table])}")


if __name__ == "__main__":
    main()
