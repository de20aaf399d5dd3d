"""Property-based fuzzing of everything that parses untrusted input: client payloads,
SyntheticSet files and privacy ledgers. Each must return a valid object or raise its own
error type naming the problem: never another exception, never a hang (hypothesis deadline)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
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


@FUZZ
@given(
    arrays=st.dictionaries(st.sampled_from(["images", "labels", "soft_labels", "weights"]), tensors(), max_size=4),
    metadata=json_values,
)
def test_payload_decoding_never_crashes(arrays, metadata):
    try:
        syn = decode_synthetic(arrays, metadata, INFO, max_size=50)
    except SyntheticSetError as err:
        assert err.args and str(err)
        return
    assert len(syn) <= 50 and torch.isfinite(syn.images).all() and tuple(syn.images.shape[1:]) == INFO.shape


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
