"""The privacy layer's refusals and bookkeeping, exactly: every bound of a DP parameter from both
sides with its one-line error, the ledger's segment merging and state, the noise's dtype and sign."""

from __future__ import annotations

import math

import pytest
import torch

from fedistill.privacy import PrivacyConfig, PrivacyLedger, PrivateRelease, check_private_setup, clip_rows
from fedistill.privacy.accounting import calibrate_noise
from fedistill.privacy.mechanisms import add_group_noise, clipped_group_sums, poisson_indices

GEN = torch.Generator()
OK = {"epsilon": 4.0, "delta": 1e-5, "sample_rate": 0.1, "steps": 10}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": 0.0}, "epsilon must be a positive finite number (method.epsilon), got 0.0"),
        ({"epsilon": math.inf}, "epsilon must be a positive finite number (method.epsilon), got inf"),
        ({"delta": 0.0}, "delta must be in (0, 1) (method.delta), got 0.0"),
        ({"delta": 1.0}, "delta must be in (0, 1) (method.delta), got 1.0"),
        ({"sample_rate": 0.0}, "sample rate must be in (0, 1], got 0.0"),
        ({"sample_rate": 1.5}, "sample rate must be in (0, 1], got 1.5"),
        ({"steps": 0}, "the number of planned releases must be >= 1, got 0"),
    ],
)
def test_calibration_refuses_each_bound_with_the_key_and_value(change, message):
    with pytest.raises(ValueError) as err:
        calibrate_noise(**{**OK, **change})
    assert str(err.value) == message


def test_calibration_accepts_the_closed_ends():
    assert calibrate_noise(**{**OK, "sample_rate": 1.0}) > 0
    with pytest.raises(ValueError) as err:
        calibrate_noise(**OK, accountant="moments")
    assert str(err.value) == "unknown accountant 'moments'; valid: rdp, prv"


@pytest.mark.parametrize(
    ("sigma", "rate", "steps"), [(0.0, 0.1, 1), (-1.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0)]
)
def test_the_ledger_refuses_an_invalid_release_by_its_values(sigma, rate, steps):
    ledger = PrivacyLedger(budget=None)
    with pytest.raises(ValueError) as err:
        ledger.spend(sigma=sigma, sample_rate=rate, steps=steps)
    assert str(err.value) == f"invalid release: sigma={sigma}, sample_rate={rate}, steps={steps}"
    assert ledger.history == [] and ledger.epsilon == 0.0


def test_the_ledger_merges_only_identical_segments_and_keeps_its_state():
    ledger = PrivacyLedger(accountant="rdp", budget=None, delta=1e-6)
    assert ledger.epsilon == 0.0
    after_one = ledger.epsilon_after(sigma=1.0, sample_rate=0.1)
    assert after_one == ledger.spend(sigma=1.0, sample_rate=0.1)  # one release by default
    ledger.spend(sigma=1.0, sample_rate=0.1, steps=2)
    assert ledger.history == [(1.0, 0.1, 3)]
    ledger.spend(sigma=2.0, sample_rate=0.1)
    ledger.spend(sigma=2.0, sample_rate=0.2)
    ledger.spend(sigma=1.0, sample_rate=0.2)
    assert ledger.history == [(1.0, 0.1, 3), (2.0, 0.1, 1), (2.0, 0.2, 1), (1.0, 0.2, 1)]
    state = ledger.state_dict()
    assert state == {"accountant": "rdp", "budget": None, "delta": 1e-6, "history": [list(h) for h in ledger.history]}
    capped = PrivacyLedger.from_state({**state, "budget": 50.0})
    assert (capped.budget, capped.delta, capped.history) == (50.0, 1e-6, ledger.history)
    with pytest.raises(ValueError) as err:
        PrivacyLedger.from_state({"accountant": "rdp", "history": []})
    assert str(err.value) == (
        "malformed privacy ledger state (KeyError: 'delta'); expected keys accountant, delta, "
        "history=[[sigma, q, steps], ...]"
    )


def test_a_release_builds_its_ledger_from_the_config_and_reports_its_rate_and_share():
    cfg = PrivacyConfig(epsilon=3.0, delta=1e-6, accountant="prv", sigma=2.0)
    rel = PrivateRelease(cfg, ledger=None, releases=4, sample_rate=0.05, generator=torch.Generator(), noise_share=0.5)
    ledger = rel.ledger
    assert (ledger.accountant_name, ledger.budget, ledger.delta, ledger.history) == ("prv", 3.0, 1e-6, [(2.0, 0.05, 4)])
    report = rel.report()
    assert (report["noise_share"], report["sample_rate"], report["sigma"], report["releases"]) == (0.5, 0.05, 2.0, 4)
    assert rel.local_sigma == 1.0
    assert set(cfg.privacy_options()) == {
        "epsilon", "delta", "sigma", "clip", "sample_rate", "accountant", "releases", "planned_rounds"
    }  # fmt: skip
    for share, message in ((1.5, "noise_share=1.5: must be in (0, 1]"), (0.0, "noise_share=0.0: must be in (0, 1]")):
        with pytest.raises(ValueError) as err:
            PrivateRelease(
                cfg, ledger=None, releases=1, sample_rate=0.1, generator=torch.Generator(), noise_share=share
            )
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        PrivateRelease(
            PrivacyConfig(epsilon=None, sigma=None),
            ledger=None,
            releases=1,
            sample_rate=0.1,
            generator=torch.Generator(),
        )
    assert str(err.value) == (
        "a DP engine needs method.epsilon (a budget) or method.sigma (a noise multiplier); both are null"
    )
    sums = rel.clipped_sums(torch.ones(3, 2), torch.tensor([0, 2, 2]), 3)
    assert sums.shape == (3, 2)


def test_private_setup_refusals_say_why_and_what_works():
    with pytest.raises(ValueError) as err:
        check_private_setup(init="real", net=torch.nn.Linear(2, 2), engine="dp_dm")
    assert str(err.value) == (
        "method=dp_dm is differentially private and needs init=noise: init=real would start the synthetic set "
        "from real images and release them verbatim"
    )
    net = torch.nn.Sequential(*[torch.nn.BatchNorm1d(2) for _ in range(4)])
    with pytest.raises(ValueError) as err:
        check_private_setup(init="noise", net=net, engine="dp_dc")
    assert str(err.value) == (
        "method=dp_dc cannot use BatchNorm (layers ['0', '1', '2']): batch statistics mix records, so one "
        "record's influence is not bounded by the clip; use model.norm=instance (the default) or none"
    )


def test_mechanisms_refuse_bad_bounds_keep_dtypes_and_add_their_noise():
    for clip, message in ((0.0, "privacy.clip must be > 0, got 0.0"), (-1.0, "privacy.clip must be > 0, got -1.0")):
        with pytest.raises(ValueError) as err:
            clip_rows(torch.ones(2, 2), clip)
        assert str(err.value) == message
    for rate in (0.0, 1.5):
        with pytest.raises(ValueError) as err:
            poisson_indices(torch.arange(5), rate, torch.Generator())
        assert str(err.value) == f"sample rate must be in (0, 1], got {rate}"
    assert torch.equal(poisson_indices(torch.arange(5), 1.0, torch.Generator()), torch.arange(5))
    sums = clipped_group_sums(torch.ones(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), 2, clip=10.0)
    assert torch.equal(sums, torch.full((2, 3), 2.0))  # float32 sums, as documented
    wide = sums.double()
    noisy = add_group_noise(wide, clip=0.5, sigma=2.0, generator=torch.Generator().manual_seed(3))
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert noisy.dtype == torch.float64 and torch.equal(noisy, wide + expected * 1.0)
