"""Aggregate-then-distill DP (``strategy=dp_stats``): the release path, the server's sum, a whole round.

The library half runs without Flower; the round runs through the in-process grid (the
real Ray simulation is exercised once in ``test_simulate.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from inprocess import make_strategy
from opacus.accountants import RDPAccountant

from fedistill.engines import build_engine
from fedistill.engines.dp import release_means
from fedistill.federated.client import release_task
from fedistill.federated.dp_stats import ReleaseError, release_shape, validate_release

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

CPU = torch.device("cpu")
MODEL = {"name": "convnet", "width": 16, "depth": 2}
CLIP, SHARE = 2.0, 0.5
OPTIONS = {  # with the dp_dm group's privacy keys, which the server always sends
    "iterations": 8,
    "releases": 4,
    "clip": CLIP,
    "sample_rate": 1.0,
    "batch_real": 64,
    "epsilon": 4.0,
    "delta": 1e-5,
    "accountant": "rdp",
}


def _task(seed: int, model: dict = MODEL, **options) -> dict:
    return {
        "method": "dp_dm",
        "method_options": OPTIONS | options,
        "model": model,
        "rounds": 1,
        "release_seed": 7,
        "seed": seed,
        "count_share": SHARE,
        "noise_share": 1.0,
        "threads": 1,
        "device": "cpu",
    }


def _noiseless(seed: int) -> dict:
    return _task(seed, epsilon=None, sigma=1e-9)


def _clients(digits, n: int = 3):
    return [digits.train.subset(torch.arange(i, 600, n)) for i in range(n)]


def test_summed_client_releases_are_the_pooled_release_and_give_true_counts(digits):
    """Without noise the server's sum over clients is exactly the release of the pooled data
    (same shared networks and augmentations), and the count column counts the records."""
    clients = _clients(digits)
    total = sum(release_task(c, _noiseless(i))[0]["sums"].double() for i, c in enumerate(clients))
    pooled = digits.train.subset(torch.arange(600))
    whole = release_task(pooled, _noiseless(99))[0]["sums"].double()
    assert torch.allclose(total, whole, atol=1e-4)
    means, counts = release_means(total, clip=CLIP, count_share=SHARE)
    assert torch.allclose(counts, pooled.class_counts().double(), atol=1e-3)
    assert means.shape == (4, 10, release_shape(OPTIONS, MODEL, digits.info)[2] - 1)
    # centered, clipped embeddings: every class mean lies inside the clip ball, and classes differ
    assert float(means.norm(dim=-1).max()) <= CLIP * (1 + 1e-5)
    assert float((means[:, 0] - means[:, 1]).norm(dim=-1).min()) > 0.05 * CLIP


def test_one_record_moves_a_release_by_at_most_the_clip_and_its_count_by_one(digits):
    """A record scaled by 1e6 joins class 0: the release moves by at most the clip in L2 (noise
    cancels: same seeds) and its count column by exactly one record (w x clip). No normalisation
    layer, so the record's embedding really is huge and only the clip bounds it."""
    raw = MODEL | {"norm": "none"}
    data = digits.train.subset(torch.arange(200))
    grown = type(data)(
        torch.cat([data.images, data.images[:1] * 1e6]), torch.cat([data.labels, data.labels[:1]]), data.info
    )
    a = release_task(data, _task(3, raw))[0]["sums"].double()
    b = release_task(grown, _task(3, raw))[0]["sums"].double()
    moved = (b - a).flatten(1).norm(dim=1)
    assert float(moved.max()) <= CLIP * (1 + 1e-4) and float(moved.min()) > 0.99 * CLIP
    cls = int(data.labels[0])
    assert torch.allclose(b[:, cls, -1] - a[:, cls, -1], torch.full((4,), SHARE * CLIP, dtype=torch.float64))
    others = [c for c in range(10) if c != cls]
    assert torch.equal(a[:, others], b[:, others])


def test_release_noise_has_the_calibrated_scale_and_the_ledger_what_was_released(digits):
    """The noise on the client's release path (noisy minus noiseless release, same sample) is
    N(0, sigma^2 clip^2) for the sigma calibrated from the budget, and the ledger holds exactly
    the releases made, as Opacus accounts them."""
    data = digits.train.subset(torch.arange(300))
    tensors, privacy, metrics = release_task(data, _task(5))
    exact = release_task(data, _noiseless(5))[0]["sums"].double()
    noise = tensors["sums"].double() - exact
    sigma = privacy["sigma"]
    assert sigma > 1.0 and privacy["releases"] == metrics["releases"] == 4
    assert float(noise.std()) == pytest.approx(sigma * CLIP, rel=0.06)
    assert abs(float(noise.mean())) < 6 * sigma * CLIP / math.sqrt(noise.numel())
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, 4)]
    assert privacy["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert privacy["epsilon_spent"] <= OPTIONS["epsilon"] * 1.01


def test_under_secure_aggregation_a_client_adds_its_share_of_the_noise_and_accounts_the_sum(digits):
    """noise_share 0.5 (the sum of four clients carries the full noise): this client's noise std
    is half of sigma x clip, while its ledger accounts the full sigma, as without the share."""
    data = digits.train.subset(torch.arange(300))
    tensors, privacy, _ = release_task(data, _task(5) | {"noise_share": 0.5})
    noise = tensors["sums"].double() - release_task(data, _noiseless(5))[0]["sums"].double()
    full = release_task(data, _task(5))[1]
    assert privacy["sigma"] == full["sigma"] and privacy["epsilon_spent"] == full["epsilon_spent"]
    assert float(noise.std()) == pytest.approx(0.5 * privacy["sigma"] * CLIP, rel=0.06)
    with pytest.raises(ValueError, match="noise_share"):
        release_task(data, _task(5) | {"noise_share": 0.0})


def test_a_holder_at_budget_refuses_before_reading_a_record(digits, monkeypatch):
    from fedistill.engines.dp import PoissonClassSampler

    data = digits.train.subset(torch.arange(100))
    _, first, _ = release_task(data, _task(1))
    sampled = []
    monkeypatch.setattr(PoissonClassSampler, "sample", lambda self: sampled.append(1))
    with pytest.raises(Exception, match="budget"):
        release_task(data, _task(1), ledger_state=first["ledger"])
    assert sampled == []


def test_validate_release_names_what_is_wrong():
    good = torch.zeros(4, 10, 33)
    assert validate_release({"sums": good}, shape=(4, 10, 33)).dtype == torch.float64
    with pytest.raises(ReleaseError, match="shape"):
        validate_release({"sums": good[:, :9]}, shape=(4, 10, 33))
    with pytest.raises(ReleaseError, match="finite"):
        validate_release({"sums": good.clone().fill_(float("nan"))}, shape=(4, 10, 33))
    with pytest.raises(ReleaseError, match="exactly"):
        validate_release({"sums": good, "images": good}, shape=(4, 10, 33))
    with pytest.raises(ValueError, match="count_share"):
        build_engine("dp_dm", **OPTIONS).release(None, [0], release_seed=0, seed=0, device=CPU, count_share=1.0)


def test_dp_stats_round_sends_only_noisy_sums_and_distills_one_set_on_the_server(tmp_path, grid):
    """10 clients with ~130 records each, epsilon 2 per client: the clients send noisy sums only
    (never pixels), the server holds their exact sum and distills ipc x classes images from it,
    and every client's epsilon stays within its budget."""
    s = make_strategy(
        "dp_stats",
        tmp_path,
        "clients=10",
        "method.epsilon=2",
        "method.iterations=200",
        "strategy.secure_aggregation=false",
    )
    g = grid(10)
    summary = s.run_rounds(g)
    assert {k for _, k, _ in g.sent} == {"query.info", "query.release"}
    assert {frozenset(a) for _, k, a in g.replies if k == "query.release"} == {frozenset({"release"})}
    (rec,) = s.history
    assert rec["clients_released"] == 10 and rec["synthetic_images"] == 10 * int(s.cfg["ipc"])
    assert "class_counts" not in rec["client_metrics"]["p0"] and "examples" not in rec["client_metrics"]["p0"]
    eps = summary["privacy"]["clients"]
    assert len(eps) == 10 and max(eps.values()) <= 2.0 * 1.01
    assert not any("class_counts" in p for p in summary["privacy"]["public"])
    # the noisy counts the server used are the federation's class sizes (~130 records a class)
    assert all(abs(n - 129) < 40 for n in rec["noisy_counts"].values()), rec["noisy_counts"]
    # well above chance (10%) and than the per-client noise alone would allow (see the benchmark)
    assert summary["final_accuracy"] > 40 and summary["baselines"]["random_subset"]["images"] == 100


def test_server_distillation_keeps_the_classes_with_enough_noisy_records_and_is_seeded(digits):
    """``distill_from_sums``: a class whose noisy count equals ``min_records`` gets images and one
    below it none; the same seed gives the same set; the metadata says what was done."""
    from fedistill.federated.dp_stats import distill_from_sums

    r, dim = 4, release_shape(OPTIONS, MODEL, digits.info)[2] - 1
    counts = torch.tensor([5.0, 2.0, 1.99] + [3.0] * 7)  # classes 1 and 2 straddle min_records=2
    total = torch.randn(r, 10, dim + 1, generator=torch.Generator().manual_seed(0))
    total[..., -1] = counts * SHARE * CLIP
    kwargs = {"info": digits.info, "method": OPTIONS, "model": MODEL, "ipc": 2, "count_share": SHARE}
    kwargs |= {"min_records": 2.0, "release_seed": 7, "device": CPU}
    syn = distill_from_sums(total, seed=3, **kwargs)
    assert sorted(set(syn.labels.tolist())) == [0, 1, *range(3, 10)] and len(syn) == 2 * 9
    assert torch.equal(syn.images, distill_from_sums(total, seed=3, **kwargs).images)
    assert not torch.equal(syn.images, distill_from_sums(total, seed=4, **kwargs).images)
    meta = syn.metadata
    assert (meta["init"], meta["seed"], meta["releases"], meta["count_share"]) == ("noise", 3, r, SHARE)
    assert meta["noisy_counts"] == {str(c): round(float(n), 2) for c, n in enumerate(counts)}
    total[..., -1] = 0.0
    assert distill_from_sums(total, seed=3, **kwargs) is None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_release_bound_is_the_sample_bound_plus_six_calibrated_noise_stds(accountant):
    """The public bound that secure aggregation clips at: the Poisson sample's mean plus 6 stds, plus 6
    noise stds, times the clip; the noise calibrated for the method's own sample rate, accountant and
    planned releases (one round, ``releases`` per round, when ``planned_rounds`` is unset)."""
    from fedistill.federated.dp_stats import release_bound
    from fedistill.privacy import calibrate_noise

    method = {"name": "dp_dm", "epsilon": 2.0, "delta": 1e-5, "clip": 3.0, "batch_real": 16}
    method |= {"iterations": 40, "releases": 8, "sample_rate": 0.25, "accountant": accountant}
    sigma = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.25, steps=8, accountant=accountant)
    records = 16 + 6 * math.sqrt(16) + 6
    assert release_bound(method, rounds=1, noise_share=0.5) == pytest.approx(3.0 * (records + 6 * sigma * 0.5))
    # three planned rounds spread the budget over three times the releases: more noise per release
    sigma3 = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.25, steps=24, accountant=accountant)
    assert sigma3 > sigma
    assert release_bound(method, rounds=3, noise_share=1.0) == pytest.approx(3.0 * (records + 6 * sigma3))
    # a fixed sigma is used as given
    assert release_bound(method | {"sigma": 1.5}, rounds=1, noise_share=1.0) == pytest.approx(3.0 * (records + 9.0))
