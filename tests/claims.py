""" "Beats the random subset" claims on three seeds, with the margin checked against their spread.

A claim is one distillation and one training run per seed (the seed drives the distillation,
the random subset's draw and the evaluation's initialization); the margin of each seed is the
set's accuracy minus its baseline's under the same recipe. The claim holds when the one-sided
95% lower confidence bound of the mean margin (Student's t, n - 1 degrees of freedom) is above
zero and the mean margin is above ``floor`` (about half the margin measured when the test was
written, so a large regression fails even when it stays above the baseline).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from fedistill.data import DataBundle, SyntheticSet
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic

SEEDS = (0, 1, 2)
#: one-sided 95% quantiles of Student's t by degrees of freedom
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132}


def margins(
    distill: Callable[[int], SyntheticSet],
    bundle: DataBundle,
    *,
    spec: ModelSpec,
    recipe: EvalRecipe,
    baseline: str = "random_subset",
    seeds: Sequence[int] = SEEDS,
) -> list[float]:
    """Accuracy minus ``baseline`` (percentage points) of ``distill(seed)``'s set, one per seed."""
    out = []
    for seed in seeds:
        res = evaluate_synthetic(distill(seed), bundle, models=[spec], recipe=recipe, runs=1, seed=seed)
        out.append(res["accuracy"]["mean"] - res["baselines"][baseline]["mean"])
    return out


def lower_bound(values: Sequence[float]) -> float:
    """One-sided 95% lower confidence bound of the mean of ``values``."""
    n = len(values)
    return statistics.mean(values) - T95[n - 1] * statistics.stdev(values) / math.sqrt(n)


def assert_beats(values: Sequence[float], *, floor: float, what: str, significant: bool = True) -> None:
    """The mean margin is above ``floor`` and significantly above zero over the seeds.

    ``significant=False`` is the weaker claim of a test that says why it cannot afford the seeds
    for significance: a positive margin on every seed.
    """
    mean, low = statistics.mean(values), lower_bound(values)
    print(f"{what}: margins {[round(v, 2) for v in values]}, mean {mean:.2f}, 95% lower bound {low:.2f}")
    assert (low > 0 if significant else min(values) > 0) and mean > floor, (what, values, mean, low, floor)
