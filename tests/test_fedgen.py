"""FedGen without Ray: the ClientApp's generator and latent handlers, payload validation, the strategy."""

from __future__ import annotations

import pytest
import torch
from test_federated import _context, _message

from fedistill.data.synthetic import SyntheticSetError
from fedistill.engines import build_engine
from fedistill.engines.gen import generator_digest
from fedistill.federated import FederationError, node_split
from fedistill.federated.faults import LATENT_FAULTS
from fedistill.federated.generator import build_generator, decode_latent_payload
from fedistill.registry import UnknownNameError

GEN = ["method.iterations=3", "method.batch_real=32", "model.width=16", "strategy.local_epochs=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "fedgen-cache"))


def _strategy(tmp_path, *overrides: str):
    from fedistill.config import compose_config
    from fedistill.data import load_dataset
    from fedistill.reporting import RunDir
    from strategies.app import STRATEGIES

    cfg = compose_config("simulate", ["strategy=fedgen", "clients=3", "ipc=2", "device=cpu", *GEN, *overrides])
    return STRATEGIES.get("fedgen")(cfg, RunDir(tmp_path), load_dataset("digits"))


def _node(pid: int) -> dict:
    return {"partition-id": pid, "num-partitions": 3}


def _ask(strategy, round_: int, pid: int, **extra):
    """What the strategy sends client ``p{pid}`` in ``round_``, answered by the simulation's ClientApp directly."""
    from clients.simulation import app
    from protocol.records import read_metrics, task_content
    from strategies.base import Reply

    task, arrays = strategy.configure(round_)
    msg_type = "train.generator" if strategy.generator_phase(round_) else "train.latents"
    content = task_content({**strategy.client_task(task, f"p{pid}", round_), **extra}, arrays)
    rep = app(_message(content, msg_type), _context(_node(pid)))
    assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
    return Reply(pid + 1, f"p{pid}", rep, read_metrics(rep))


def test_generator_rounds_fedavg_the_clients_generators(tmp_path):
    s = _strategy(tmp_path, "strategy.gen_rounds=2")
    assert s.rounds == 3 and s.generator_phase(2) and not s.generator_phase(3)
    before = {k: v.clone() for k, v in s.generator_state.items()}
    replies = [_ask(s, 1, pid) for pid in range(3)]
    assert all(set(r.msg.content.keys()) == {"model", "metrics"} for r in replies)
    ok, bad = s.accept(1, replies)
    assert len(ok) == 3 and not bad
    states = [r.metrics["state"] for r in ok]
    assert not torch.equal(states[0]["decoder.0.weight"], before["decoder.0.weight"])  # local epochs moved it
    rec = s.update(1, ok)
    n = [r.metrics["examples"] for r in ok]
    assert (
        rec["examples"]
        == sum(n)
        == sum(len(node_split(_node(i), s.client_task({}, "p0", 1)["data"])) for i in range(3))
    )
    for key, avg in s.generator_state.items():
        expected = sum(w * st[key].double() for w, st in zip(n, states, strict=True)) / sum(n)
        assert torch.allclose(avg.double(), expected, atol=1e-6), key
    assert rec["generator_test_mse"] > 0 and rec["client_recon_mse"] > 0


def test_latent_reply_has_no_pixels_and_decodes_deterministically(tmp_path):
    s = _strategy(tmp_path, "strategy.gen_rounds=0")
    r = _ask(s, 1, 0)
    assert set(r.msg.content.keys()) == {"latents", "meta", "metrics"}
    from protocol.records import read_json, read_tensors

    arrays = read_tensors(r.msg.content.array_records["latents"])
    assert set(arrays) == {"latents", "labels"} and arrays["latents"].shape[1] == 16
    meta = read_json(r.msg, "meta", "json")
    assert "latents" not in meta and meta["generator"]["digest"] == generator_digest(s.generator_state)
    info = s.bundle.info
    a = decode_latent_payload(arrays, meta, s.generator, info, max_size=20)
    b = decode_latent_payload(arrays, meta, build_generator(info, s.generator_state, **s.arch), info, max_size=20)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, arrays["labels"])
    # the server's decoded images are exactly the client's: the same engine run, decoded locally
    split = node_split(_node(0), s.client_task({}, "p0", 1)["data"])
    opts = s.engine_task()["method_options"]
    task = s.client_task(s.engine_task(), "p0", 1)
    model = dict(task["model"])
    local = build_engine("gen", model=model.pop("name"), model_kwargs=model, **opts).distill(
        split, 2, seed=task["seed"], generator_state=s.generator_state
    )
    assert torch.equal(local.images, a.images)
    # the uplink is smaller than the same images as float32 pixels
    pixels = len(a) * (4 * a.images[0].numel() + 8)
    assert r.metrics["bytes"] < pixels
    ok, bad = s.accept(1, [r])
    assert not bad and ok[0].metrics["latent_bytes"] == r.metrics["bytes"] < ok[0].metrics["pixel_bytes"]


def _generator(info):
    from fedistill.engines.gen import new_cvae

    return build_generator(
        info, new_cvae(info, latent_dim=16, hidden=32, seed=0).state_dict(), latent_dim=16, hidden=32
    )


GOOD = {"latents": torch.randn(6, 16), "labels": torch.tensor([0, 0, 1, 1, 2, 2])}


@pytest.mark.parametrize(
    ("fault", "field", "match"),
    [
        ("nan", "latents", "NaN"),
        ("shape", "latents", r"float32 \[N, 16\]"),
        ("labels", "labels", "range"),
        ("oversize", "latents", "cap of 6"),
    ],
)
def test_malformed_latent_payload_is_rejected_with_its_reason(digits, fault, field, match):
    gen = _generator(digits.info)
    assert len(decode_latent_payload(GOOD, {}, gen, digits.info, max_size=6)) == 6
    bad, _ = LATENT_FAULTS.get(fault)({k: v.clone() for k, v in GOOD.items()}, {}, digits.info.num_classes)
    with pytest.raises(SyntheticSetError, match=match) as err:
        decode_latent_payload(bad, {}, gen, digits.info, max_size=6)
    assert err.value.field == field


def test_latent_payload_accepts_no_pixels_and_only_the_servers_generator(digits):
    gen = _generator(digits.info)
    pixels = {**GOOD, "images": torch.zeros(6, 1, 8, 8)}
    with pytest.raises(SyntheticSetError, match="unexpected arrays"):
        decode_latent_payload(pixels, {}, gen, digits.info, max_size=6)
    with pytest.raises(SyntheticSetError, match="missing"):
        decode_latent_payload({"latents": GOOD["latents"]}, {}, gen, digits.info, max_size=6)
    with pytest.raises(SyntheticSetError, match="int64"):
        decode_latent_payload({**GOOD, "labels": GOOD["labels"].float()}, {}, gen, digits.info, max_size=6)
    with pytest.raises(SyntheticSetError, match="optimized for generator abc"):
        decode_latent_payload(GOOD, {"generator": {"digest": "abc"}}, gen, digits.info, max_size=6, digest="def")


def test_faulty_latent_reply_is_rejected_by_the_strategy_with_its_reason(tmp_path):
    s = _strategy(tmp_path, "strategy.gen_rounds=0")
    replies = [_ask(s, 1, 0), _ask(s, 1, 1, fault="nan")]
    ok, bad = s.accept(1, replies)
    assert [r.client for r in ok] == ["p0"]
    assert [(f.client, f.kind) for f in bad] == [("p1", "rejected")] and "NaN" in bad[0].reason
    assert "latents" in bad[0].reason


def test_generator_checkpoint_skips_the_generator_rounds(tmp_path):
    from fedistill.io import atomic_save_tensors

    s = _strategy(tmp_path / "a")
    assert s.gen_rounds == 10 and s.rounds == 11
    path = atomic_save_tensors(tmp_path / "g.safetensors", s.generator_state)
    t = _strategy(tmp_path / "b", f"strategy.generator_path={path}")
    assert t.gen_rounds == 0 and t.rounds == 1 and not t.generator_phase(1)
    assert generator_digest(t.generator_state) == generator_digest(s.generator_state)
    with pytest.raises(FederationError, match="latent_dim"):
        _strategy(tmp_path / "c", f"strategy.generator_path={path}", "method.latent_dim=8")
    with pytest.raises(FederationError, match="does not exist"):
        _strategy(tmp_path / "d", f"strategy.generator_path={tmp_path / 'missing.safetensors'}")
    with pytest.raises(UnknownNameError, match="needs method=gen"):
        _strategy(tmp_path / "e", "method=dm")


def test_round_checkpoint_keeps_the_generator(tmp_path):
    """A resumed fedgen run continues from the averaged generator, not a fresh one."""
    s = _strategy(tmp_path, "strategy.gen_rounds=2")
    replies = [_ask(s, 1, pid) for pid in range(3)]
    s.update(1, s.accept(1, replies)[0])
    s.history.append({"round": 1, "accuracy": 10.0})
    s.save_checkpoint()
    t = _strategy(tmp_path, "strategy.gen_rounds=2")
    assert generator_digest(t.generator_state) != generator_digest(s.generator_state)
    assert t.restore_checkpoint() == 1
    assert generator_digest(t.generator_state) == generator_digest(s.generator_state)
