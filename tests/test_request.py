"""The engine request API: one request object, inputs an engine declares, no per-call state on engines."""

from __future__ import annotations

import pytest
import torch

from fedistill.engines import ENGINES, DistillRequest, build_engine
from fedistill.engines.base import REQUEST_INPUTS
from fedistill.models import build_model
from fedistill.privacy import PrivacyLedger

TINY = {"iterations": 6, "batch_real": 16, "model_kwargs": {"width": 8}, "log_every": 3}


def _same(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_every_engine_declares_only_known_inputs_and_the_flags_follow_from_them():
    for name in ENGINES.names():
        assert ENGINES.get(name).accepts <= set(REQUEST_INPUTS), name
    assert {n for n in ENGINES.names() if ENGINES.get(n).takes("ledger")} == {"dp_dm", "dp_dc", "dp_dsa"}
    assert {"dm", "dm_hom", "feddm", "fedaf"} <= {n for n in ENGINES.names() if ENGINES.get(n).takes("checkpoint")}
    assert not ENGINES.get("dp_dm").takes("checkpoint")  # a resumed DP run would spend its releases twice
    with pytest.raises(ValueError, match="unknown request input 'ledgr'"):
        ENGINES.get("dm").takes("ledgr")


def test_run_refuses_an_input_the_engine_does_not_read_naming_it_and_the_engines_that_do(digits):
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5)
    seen = []
    request = DistillRequest(data=digits.train, ipc=1, ledger=ledger, progress=lambda *a: seen.append(a))
    with pytest.raises(ValueError, match=r"method=dm does not take ledger; the engines that do: dp_dc, dp_dm, dp_dsa"):
        build_engine("dm", **TINY).run(request)
    assert not seen and ledger.releases == 0  # refused before any work
    with pytest.raises(ValueError, match="method=rded does not take base_state"):
        build_engine("rded").run(DistillRequest(data=digits.train, ipc=1, base_state={}))


def test_run_resolves_auto_init_per_engine_and_equals_the_keyword_call(digits):
    engine = build_engine("dm", **TINY)
    via_request = engine.run(DistillRequest(data=digits.train, ipc=2, seed=4))
    assert via_request.metadata["init"] == "real"
    assert _same(via_request, engine.distill(digits.train, 2, init="real", seed=4))
    private = build_engine("dp_dm", **TINY, releases=2, epsilon=10.0)
    assert private.run(DistillRequest(data=digits.train, ipc=1, seed=4)).metadata["init"] == "noise"


@pytest.mark.parametrize(
    ("method", "inputs"),
    [
        ("feddm", {"base_state": True}),
        ("fedaf", {"base_state": True, "global_logits": True}),
        ("dm_hom", {}),
        ("dp_dc", {"ledger": True}),
    ],
)
def test_an_engine_keeps_no_per_call_state(method, inputs, digits):
    """Inputs live in the call, not on the instance: after a run with a base model / global logits /
    a ledger, the same engine instance run without them gives what a fresh engine gives, and its
    attributes are what they were before."""
    opts = dict(TINY, iterations=2) if method == "dp_dc" else TINY
    extra = {"epsilon": 10.0, "outer_loop": 1} if method == "dp_dc" else {}
    engine = build_engine(method, **opts, **extra)
    before = dict(vars(engine))
    given: dict = {}
    if "base_state" in inputs:
        given["base_state"] = build_model("convnet", digits.train.info, seed=9, width=8).state_dict()
    if "global_logits" in inputs:
        given["global_logits"] = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    if "ledger" in inputs:
        given["ledger"] = PrivacyLedger(accountant="rdp", delta=1e-5, budget=10.0)
    with_inputs = engine.run(DistillRequest(data=digits.train, ipc=1, seed=2, **given))
    assert vars(engine).keys() == before.keys() and all(vars(engine)[k] is v for k, v in before.items())
    plain = DistillRequest(data=digits.train, ipc=1, seed=2)
    assert _same(engine.run(plain), build_engine(method, **opts, **extra).run(plain))
    if given and method != "dp_dc":  # the inputs changed the result (dp_dc: the ledger only accounts)
        assert not _same(with_inputs, engine.run(plain))
    if "ledger" in given:  # every release of the run is in the holder's ledger: iterations x outer steps
        assert given["ledger"].releases == opts["iterations"] * extra["outer_loop"]
        assert with_inputs.metadata["privacy"]["releases"] == given["ledger"].releases
