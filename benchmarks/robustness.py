"""Robustness benchmark: hostile clients against server defences, as real `fedistill simulate` runs.

For every strategy it runs a clean point per defence (``attack.fraction=0``: the defence's
cost on honest clients, and the backdoor trigger's natural success rate), then every
attack at every fraction of hostile clients with and without each defence. Each point is
one subprocess (Flower simulation engine on Ray) with the same seed, partition and recipe;
a row records the final test accuracy, the clean accuracy of the same strategy and
defence, the backdoor's success rate on triggered test images, which clients the defence
dropped (hostile / honest) and the checkpoint overhead (seconds per round, bytes). Rows are
appended to ``benchmarks/results/<out>-<date>.md`` as they finish.

    python benchmarks/robustness.py --dataset digits --clients 10 --alpha 0.5 \\
        --strategies oneshot,feddm,fedaf,fedavg --attacks label_flip,backdoor --fractions 0.2,0.4 \\
        --out robustness_digits
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import append_row, machine_info, results_path, run_point
from federated import MODEL_STRATEGIES

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
    opts = ap.parse_args()
    path = results_path(opts.out)
    lines = [
        f"# Robustness benchmark ({opts.dataset}, {opts.clients} clients, alpha {opts.alpha})",
        "",
        f"Machine: {machine_info()}",
        "",
        f"Command: `python benchmarks/robustness.py {' '.join(sys.argv[1:])}`",
        "",
        "Each row is one `fedistill simulate` subprocess (Flower simulation engine on Ray) with seed 0.",
        "Accuracy: global model on the real test set after the last round; clean: the same strategy and",
        "defence with no hostile client; ASR: share of triggered test images (other classes) classified",
        "as the backdoor target. Dropped: distinct clients a defence dropped in any round, hostile/honest.",
        "Checkpoint: mean seconds to write the round checkpoint, and its size.",
        "",
        "| strategy | attack | hostile | defense | accuracy % | clean % | drop | ASR % | clean ASR % "
        "| dropped h/h | checkpoint | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    path.write_text("\n".join(lines) + "\n")
    extra = opts.extra.split() if opts.extra else []
    per_strategy: dict[str, list[str]] = {}
    for item in opts.strategy_extra:
        name, override = item.split(":", 1)
        per_strategy.setdefault(name, []).append(override)
    base = [f"dataset={opts.dataset}", f"clients={opts.clients}", f"alpha={opts.alpha}"]
    with tempfile.TemporaryDirectory() as tmp:
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
                out = Path(tmp) / f"{strategy}-{attack}-{frac}-{defense}"
                s, wall, _, rc = run_point(args, out)
                acc = s.get("final_accuracy", float("nan"))
                att = s.get("attack") or {}
                if frac == "0":
                    clean[defense] = {"accuracy": acc, "asr": att.get("attack_success_rate")}
                ref = clean.get(defense, {})
                asr = att.get("attack_success_rate") if attack == "backdoor" else None
                ref_asr = ref.get("asr")
                row = (
                    f"| {strategy} | {attack if frac != '0' else '(clean)'} | {float(frac):.0%} | {defense} "
                    f"| {acc:.2f} | {ref.get('accuracy', float('nan')):.2f} "
                    f"| {ref.get('accuracy', float('nan')) - acc:+.2f} "
                    f"| {'-' if asr is None else f'{asr:.1f}'} "
                    f"| {'-' if ref_asr is None else f'{ref_asr:.1f}'} "
                    f"| {_dropped(out, set(att.get('clients') or []))} | {_checkpoint(out)} | {wall:.0f} "
                    f"| {'ok' if rc == 0 else s.get('error', 'failed')} |"
                )
                append_row(path, row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
