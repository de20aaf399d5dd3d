"""Property-based fuzzing of everything that parses untrusted input: client payloads (pixel
sets, FedGen's latent codes, FedAF's class statistics, dp_stats' noisy sums), SyntheticSet
files and privacy ledgers. Each must return a valid object or raise its own error type
naming the problem: never another exception, never a hang (pytest-timeout). The payload
fuzzers draw well-formed payloads of up to twice the per-client cap often, so the cap is
reached (and ``@example`` pins one over-cap case each)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedistill.data import SyntheticSet, SyntheticSetError, load_dataset
from fedistill.federated import decode_synthetic
from fedistill.privacy import PrivacyLedger

INFO = load_dataset("digits").info
# no per-example deadline (flaky on a loaded 2-core machine); pytest-timeout bounds a hang
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e30, 0.5]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5))
    if len(shape) == 4 and draw(st.booleans()):  # often the right image shape, to get deeper
        shape = [draw(st.integers(0, 6)), *INFO.shape]
    dtype = draw(st.sampled_from(DTYPES))
    base = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    flat = base.view(-1)
    if flat.numel():  # plant a few special values
        for pos in draw(st.lists(st.integers(0, flat.numel() - 1), max_size=3)):
            flat[pos] = draw(st.sampled_from(SPECIALS))
    if dtype.is_floating_point:
        return base.to(dtype)
    return (base.nan_to_num(0, 0, 0).clamp(-3, 3) * 3).to(dtype)


CAP = 4  # the per-client row cap the payload fuzzers decode against


def _well_formed(arrays: dict) -> bool:
    images, labels = arrays.get("images"), arrays.get("labels")
    return (
        set(arrays) == {"images", "labels"}
        and images.dtype == torch.float32
        and tuple(images.shape[1:]) == INFO.shape
        and bool(torch.isfinite(images).all())
        and labels.dtype == torch.int64
        and tuple(labels.shape) == images.shape[:1]
        and bool(((labels >= 0) & (labels < INFO.num_classes)).all())
    )


@st.composite
def well_formed(draw) -> dict[str, torch.Tensor]:
    """A valid pixel payload of 0..2 x CAP rows, sometimes with one value spoiled."""
    n = draw(st.integers(0, 2 * CAP))
    images = torch.randn(n, *INFO.shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    labels = torch.tensor(
        draw(st.lists(st.integers(0, INFO.num_classes - 1), min_size=n, max_size=n)), dtype=torch.int64
    )
    if n and draw(st.booleans()):
        spoil = draw(st.sampled_from(["nan", "label"]))
        if spoil == "nan":
            images.view(-1)[0] = float("nan")
        else:
            labels[0] = INFO.num_classes
    return {"images": images, "labels": labels}


@FUZZ
@given(
    arrays=st.one_of(
        well_formed(),
        st.dictionaries(st.sampled_from(["images", "labels", "soft_labels", "weights"]), tensors(), max_size=4),
    ),
    metadata=json_values,
)
@example(
    arrays={"images": torch.zeros(CAP + 1, *INFO.shape), "labels": torch.zeros(CAP + 1, dtype=torch.int64)}, metadata={}
)
def test_payload_decoding_never_crashes(arrays, metadata):
    try:
        syn = decode_synthetic(arrays, metadata, INFO, max_size=CAP)
    except SyntheticSetError as err:
        assert err.args and str(err)
        rows = arrays.get("images", torch.zeros(0)).shape[:1]
        if _well_formed(arrays) and rows[0] > CAP and isinstance(metadata, dict):
            assert "cap" in str(err), err  # refused for its size, not by accident
        return
    assert len(syn) <= CAP and torch.isfinite(syn.images).all() and tuple(syn.images.shape[1:]) == INFO.shape


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "set.safetensors"
    SyntheticSet(torch.randn(4, *INFO.shape), torch.tensor([0, 1, 2, 3]), INFO).save(path)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_corrupted_synthetic_files_are_rejected_cleanly(saved_bytes, tmp_path_factory, data):
    raw = bytearray(saved_bytes)
    how = data.draw(st.sampled_from(["truncate", "flip", "header", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[pos] ^= data.draw(st.integers(1, 255))
    elif how == "header":  # a well-formed safetensors file whose fedistill header is arbitrary JSON
        from safetensors.torch import save

        header = data.draw(json_values | st.text(max_size=20))
        text = header if isinstance(header, str) else json.dumps(header)
        raw = bytearray(save({"images": torch.randn(2, *INFO.shape)}, metadata={"fedistill": text}))
    else:
        raw = bytearray(data.draw(st.binary(max_size=256)))
    path = tmp_path_factory.mktemp("fuzz") / "bad.safetensors"
    path.write_bytes(bytes(raw))
    try:
        syn = SyntheticSet.load(path)
    except SyntheticSetError as err:
        assert str(path) in str(err) or err.args[0] in {"images", "labels", "soft_labels", "metadata"}
        return
    assert len(syn) > 0 and torch.isfinite(syn.images).all()


@FUZZ
@given(state=json_values)
def test_malformed_privacy_ledgers_are_rejected_cleanly(state):
    try:
        ledger = PrivacyLedger.from_state(state)  # type: ignore[arg-type]
    except ValueError as err:
        assert "ledger" in str(err) or "accountant" in str(err) or "release" in str(err)
        return
    assert ledger.epsilon >= 0


LATENT = 8
GENERATOR = None


def _generator():
    global GENERATOR
    if GENERATOR is None:
        from fedistill.federated.generator import build_generator, new_cvae

        state = new_cvae(INFO, latent_dim=LATENT, hidden=16, seed=0).state_dict()
        GENERATOR = build_generator(INFO, state, latent_dim=LATENT, hidden=16)
    return GENERATOR


@st.composite
def latent_payloads(draw) -> dict[str, torch.Tensor]:
    """FedGen uplinks: often well-formed (0..2 x CAP codes), else arbitrary arrays under the keys."""
    if draw(st.booleans()):
        n = draw(st.integers(0, 2 * CAP))
        z = torch.randn(n, LATENT, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        if n and draw(st.booleans()):
            z[0, 0] = draw(st.sampled_from(SPECIALS))
        labels = draw(st.lists(st.integers(-1, INFO.num_classes), min_size=n, max_size=n))
        return {"latents": z, "labels": torch.tensor(labels, dtype=torch.int64)}
    return draw(st.dictionaries(st.sampled_from(["latents", "labels", "images"]), tensors(), max_size=3))


@FUZZ
@given(arrays=latent_payloads(), metadata=json_values | st.just({"generator": {"digest": "d1"}}))
@example(
    arrays={"latents": torch.zeros(CAP + 1, LATENT), "labels": torch.zeros(CAP + 1, dtype=torch.int64)},
    metadata={"generator": {"digest": "d1"}},
)
def test_latent_payload_decoding_never_crashes(arrays, metadata):
    from fedistill.federated.generator import decode_latent_payload

    try:
        syn = decode_latent_payload(arrays, metadata, _generator(), INFO, max_size=CAP, digest="d1")
    except SyntheticSetError as err:
        assert err.args and str(err)
        z = arrays.get("latents")
        if z is not None and z.dtype == torch.float32 and z.ndim == 2 and z.shape[1] == LATENT and len(z) > CAP:
            assert "cap" in str(err), err
        return
    assert 0 < len(syn) <= CAP and torch.isfinite(syn.images).all() and metadata["generator"]["digest"] == "d1"


@st.composite
def stats_payloads(draw) -> dict[str, torch.Tensor]:
    """FedAF statistics: often the right shapes with planted specials, else arbitrary arrays."""
    k = INFO.num_classes
    if draw(st.booleans()):
        soft = torch.softmax(torch.randn(k, k), 1)
        out = {"class_logits": torch.randn(k, k), "class_soft": soft, "class_counts": torch.arange(k).float()}
        key = draw(st.sampled_from([None, *out]))
        if key is not None:
            out[key] = out[key].clone()
            out[key].view(-1)[draw(st.integers(0, out[key].numel() - 1))] = draw(st.sampled_from(SPECIALS))
        return out
    keys = st.sampled_from(["class_logits", "class_soft", "class_counts", "extra"])
    return draw(st.dictionaries(keys, tensors(), max_size=4))


@FUZZ
@given(stats=stats_payloads())
def test_fedaf_statistics_validation_never_crashes(stats):
    from fedistill.federated.fedaf import StatsError, validate_stats

    try:
        out = validate_stats(stats, INFO.num_classes)
    except StatsError as err:
        assert str(err)
        return
    held = out["class_counts"] > 0
    assert all(torch.isfinite(t).all() for t in out.values()) and (out["class_counts"] >= 0).all()
    assert torch.allclose(out["class_soft"][held].sum(1), torch.ones(int(held.sum())), atol=1e-3)


@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["sums", "counts"]), tensors(), max_size=2))
@example(arrays={"sums": torch.zeros(2, 10, 5)})
def test_release_validation_never_crashes(arrays):
    from fedistill.federated.dp_stats import ReleaseError, validate_release

    try:
        sums = validate_release(arrays, shape=(2, 10, 5))
    except ReleaseError as err:
        assert str(err)
        return
    assert sums.dtype == torch.float64 and tuple(sums.shape) == (2, 10, 5) and torch.isfinite(sums).all()
