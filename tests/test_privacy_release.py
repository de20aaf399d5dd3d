"""The DP engines keep their promise on the release path they actually use.

``test_privacy.py`` checks the mechanisms in isolation (``noisy_group_sums`` with its own
arguments); these tests run ``dp_dm``, ``dp_dc`` and ``dp_dsa`` themselves and watch every
call they make to :meth:`PrivateRelease.sums`, so a bug between the engine and the noise
(the noise multiplier the release passes on, the clip, the number of releases, the
ledger) turns them red. For every release the test recomputes, independently, the exact
clipped per-class sum of the rows the engine handed over; the difference to what was
released is the noise, whose empirical std must be the calibrated ``sigma * clip`` (the
sigma recomputed here from Opacus for the engine's plan). The mutations these tests were
checked against are listed in ``benchmarks/results/privacy-mutations-2026-11-30.md``.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedistill.engines import build_engine
from fedistill.engines.dp import PoissonClassSampler
from fedistill.models import build_model
from fedistill.privacy import BudgetExceededError, PrivacyLedger, PrivateRelease

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

NET = {"width": 16, "depth": 2}
EPSILON, DELTA, CLIP, BATCH = 3.0, 1e-5, 2.5, 16
#: engine options: few releases, a clip that is neither 1 nor the embedding norm (so sigma alone,
#: or an unclipped sum, shows), calibration from epsilon (the path users take)
ENGINES = {
    "dp_dm": {"iterations": 6, "releases": 3, "model_kwargs": {"width": 32, "depth": 2}},  # 1280 coordinates a release
    "dp_dc": {"iterations": 2, "outer_loop": 1},
    "dp_dsa": {"iterations": 2, "outer_loop": 1},
}
COMMON = {"model_kwargs": NET, "batch_real": BATCH, "epsilon": EPSILON, "delta": DELTA, "clip": CLIP, "log_every": 100}


class Releases:
    """Spy on the release path: :meth:`PrivateRelease.sums` (one call a release), or
    :meth:`PrivateRelease.clipped_sums` chunk by chunk then :meth:`PrivateRelease.noised`
    (dp_dc/dp_dsa): the rows each release was given and what it released."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.original = PrivateRelease.sums
        self.original_clipped = PrivateRelease.clipped_sums
        self.original_noised = PrivateRelease.noised

    def record(self, release: PrivateRelease, rows: torch.Tensor, groups: torch.Tensor, k: int, out: torch.Tensor):
        self.calls.append({"release": release, "rows": rows, "groups": groups, "k": k, "out": out})

    def __call__(self, release: PrivateRelease, rows: torch.Tensor, groups: torch.Tensor, num_groups: int):
        out = self.original(release, rows, groups, num_groups)
        self.record(release, rows.detach().clone(), groups.clone(), num_groups, out)
        return out

    def clipped(self, release: PrivateRelease, rows, groups, num_groups, **kwargs):
        self.pending.append((rows.detach().reshape(len(rows), -1).clone(), groups.clone(), num_groups))
        return self.original_clipped(release, rows, groups, num_groups, **kwargs)

    def noised(self, release: PrivateRelease, sums: torch.Tensor) -> torch.Tensor:
        out = self.original_noised(release, sums)
        rows = torch.cat([r for r, _, _ in self.pending])
        groups = torch.cat([g for _, g, _ in self.pending])
        self.record(release, rows, groups, self.pending[0][2], out)
        self.pending = []
        return out


@pytest.fixture
def releases(monkeypatch) -> Releases:
    spy = Releases()
    monkeypatch.setattr(PrivateRelease, "sums", lambda self, *a: spy(self, *a))
    monkeypatch.setattr(PrivateRelease, "clipped_sums", lambda self, *a, **kw: spy.clipped(self, *a, **kw))
    monkeypatch.setattr(PrivateRelease, "noised", lambda self, sums: spy.noised(self, sums))
    return spy


def exact_clipped_sums(rows: torch.Tensor, groups: torch.Tensor, k: int, clip: float) -> torch.Tensor:
    """Per-group sums of rows clipped to L2 ``clip`` (float64, written out here, not imported)."""
    flat = rows.reshape(len(rows), -1).double()
    factor = torch.clamp(clip / flat.norm(dim=1, keepdim=True).clamp_min(1e-300), max=1.0)
    out = torch.zeros(k, flat.shape[1], dtype=torch.float64)
    return out.index_add_(0, groups.cpu(), flat * factor)


def planned(name: str, data, ipc: int = 1) -> tuple[float, float, int]:
    """(sigma, q, releases) of the engine's plan, recomputed from its options and Opacus."""
    q = min(1.0, BATCH / int(data.class_counts().max()))
    opts = ENGINES[name]
    steps = opts["releases"] if name == "dp_dm" else opts["iterations"] * opts["outer_loop"]
    sigma = get_noise_multiplier(target_epsilon=EPSILON, target_delta=DELTA, sample_rate=q, steps=steps)
    return sigma, q, steps


def opacus_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("name", list(ENGINES))
def test_release_noise_count_and_ledger_match_the_plan(digits, releases, name):
    """(a) noise std = calibrated sigma x clip, mean 0, independent between releases;
    (b) releases made = releases reserved = ledger's releases; (d) the ledger's epsilon is an
    Opacus accountant stepped once per release with the same (sigma, q)."""
    data = digits.train
    sigma, q, steps = planned(name, data)
    ledger = PrivacyLedger(budget=EPSILON, delta=DELTA)
    syn = build_engine(name, **COMMON | ENGINES[name]).distill(data, 1, seed=0, ledger=ledger)

    # (b) every release the engine made was reserved and recorded, and no more
    assert len(releases.calls) == steps == ledger.releases == syn.metadata["privacy"]["releases"]
    assert {id(c["release"]) for c in releases.calls} == {id(releases.calls[0]["release"])}

    # (a) the released statistic minus the exact clipped sum is N(0, (sigma C)^2) per coordinate
    assert releases.calls[0]["release"].sigma == pytest.approx(sigma, rel=1e-6)
    noises = [c["out"].double() - exact_clipped_sums(c["rows"], c["groups"], c["k"], CLIP) for c in releases.calls]
    assert all(len(c["rows"]) > 0 for c in releases.calls)  # real records were released, not just noise
    noise = torch.cat([n.flatten() for n in noises])
    n = noise.numel()
    assert n > 2000, n
    # std of a std estimate is std/sqrt(2n) (< 1.6% here): 10% is > 6 standard errors, while a
    # zeroed, halved, or clip-less noise is off by >= 50%
    assert float(noise.std()) == pytest.approx(sigma * CLIP, rel=0.10)
    assert abs(float(noise.mean())) < 6 * sigma * CLIP / math.sqrt(n)
    # fresh noise for every release (composition assumes independent draws)
    for a, b in itertools.pairwise(noises):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 6 / math.sqrt(a.numel()), float(corr)

    # (d) what the ledger (and the metadata) says was spent is what was released
    expected = opacus_epsilon(sigma, q, len(releases.calls))
    assert ledger.epsilon == pytest.approx(expected, rel=1e-6)
    assert syn.metadata["privacy"]["epsilon_spent"] == pytest.approx(expected, rel=1e-6)
    assert ledger.history == [(pytest.approx(sigma, rel=1e-6), pytest.approx(q), steps)]


def _grow(data, scale: float):
    """``data`` plus one more record: a copy of its first image scaled by ``scale``."""
    from fedistill.data.base import Split

    images = torch.cat([data.images, data.images[:1] * scale])
    return Split(images, torch.cat([data.labels, data.labels[:1]]), data.info)


@pytest.mark.parametrize("name", list(ENGINES))
def test_one_record_moves_the_release_by_at_most_the_clip(digits, releases, name):
    """(c) Adding one record scaled by 1e6 moves the released sums by at most C (same noise draw,
    so the noise cancels). No normalisation layer, so the record's row really is ~1e6 times
    larger; the move is also close to C (the record is clipped, not dropped)."""
    data = digits.train.subset(torch.arange(120))
    classes = data.labels.unique().tolist()
    big = _grow(data, 1e6)
    no_norm = {"model_kwargs": {**NET, "norm": "none"}, "sample_rate": 1.0}
    engine = build_engine(name, **COMMON | ENGINES[name] | no_norm)
    net = build_model("convnet", data.info, seed=0, **NET, norm="none")
    outs, norms = [], []
    for split in (data, big):
        release = PrivateRelease(
            engine.config, ledger=None, releases=1, sample_rate=1.0, generator=torch.Generator().manual_seed(5)
        )
        sampler = PoissonClassSampler(split, classes, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0))
        if name == "dp_dm":  # the engine's own release path (its network: NET without normalisation)
            engine.release(split, classes, release_seed=0, seed=5, device=torch.device("cpu"))
        else:
            engine.real_targets(net, sampler, classes, dsa=None, params=None, ctx={"release": release})
        call = releases.calls[-1]
        outs.append(call["out"].double())
        norms.append(call["rows"].flatten(1).norm(dim=1).max())
    assert float(norms[1]) > 1e4 * CLIP  # the outlier's row is huge before clipping
    moved = float((outs[1] - outs[0]).norm())
    assert moved <= CLIP * (1 + 1e-4), moved
    assert moved > 0.99 * CLIP, moved


@pytest.mark.parametrize("name", list(ENGINES))
def test_holder_at_budget_refuses_before_any_release(digits, releases, monkeypatch, name):
    """(e) A ledger already at its budget: the engine raises BudgetExceededError at once, before
    sampling a record or releasing anything, and the ledger is unchanged."""
    sampled = []
    original = PoissonClassSampler.sample
    monkeypatch.setattr(PoissonClassSampler, "sample", lambda self: sampled.append(1) or original(self))
    spent = PrivacyLedger(delta=DELTA)
    spent.spend(sigma=1.0, sample_rate=0.5, steps=40)
    # a holder whose whole budget is spent (restored from its node state; the ledger allows 1% slack
    # for calibration): any further release, however noisy, is over budget
    ledger = PrivacyLedger.from_state(spent.state_dict() | {"budget": spent.epsilon / 1.01})
    before = ledger.state_dict()
    # an explicit sigma: no calibration search, so the time below is the engine's own
    engine = build_engine(name, **COMMON | ENGINES[name] | {"sigma": 2.0})
    start = time.perf_counter()
    with pytest.raises(BudgetExceededError, match="release refused"):
        engine.distill(digits.train, 1, seed=0, ledger=ledger)
    assert time.perf_counter() - start < 3.0  # a distillation takes several seconds
    assert releases.calls == [] and sampled == []
    assert ledger.state_dict() == before
