"""Property-based fuzzing of a device's own data (``data-path``) and of checkpoints.

Random, truncated and corrupted ``.npz`` / ``.safetensors`` files, IDX directories
(plain and gzip) and CIFAR-10 pickle batches must each give a valid :class:`Split` or a
:class:`NodeDataError` naming the file and the fix: never another exception, never a hang
(hypothesis deadline). Checkpoints likewise give their data or a :class:`CheckpointError`.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from fedistill.checkpoint import Checkpoint, CheckpointError, resume_config
from fedistill.data import dataset_info
from fedistill.data.base import DatasetFormatError, DatasetInfo, Split
from fedistill.data.readers import read_cifar_batch
from fedistill.federated.node import IDX_NAMES, NodeDataError, load_node_file
from fedistill.reporting import RunDir

DIGITS, CIFAR = dataset_info("digits"), dataset_info("cifar10")
# no per-example deadline (flaky on a loaded 2-core machine); pytest-timeout bounds a hang
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIX_WORDS = ("re-download", "save", "write", "need", "point", "expected", "replace", "delete", "must")

NP_DTYPES = ["uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64", "bool", "complex64", "<U2"]
SPECIALS = [np.nan, np.inf, -np.inf, -1.0, 0.0, 1.0, 255.0, 256.0, 1e30, 0.5]
IDX_CODES = [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]


@st.composite
def arrays(draw, lead: int | None = None, image: tuple[int, ...] = DIGITS.shape, top: float = 1.0) -> np.ndarray:
    """A numpy array of random dtype and shape, often shaped like images of ``image`` with values in
    ``[0, top]`` (pixels, or labels for ``top=9``), with planted special values."""
    n = lead if lead is not None else draw(st.sampled_from([1, 2, 3, 4, 0]))
    plausible = draw(st.booleans())  # half the time a plausible layout and dtype, to reach the deeper checks
    shapes = [(n, *image), (n, *image[1:]), (n, *image[1:], image[0])] if top <= 1 else [(n,)]
    if not plausible:
        shapes += [(n,), (), (n, *image), (n, 2), "random"]
    shape = draw(st.sampled_from(shapes))
    if shape == "random":
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = rng.uniform(0, top, size=shape)
    flat = base.reshape(-1)
    for pos in draw(st.lists(st.integers(0, max(flat.size - 1, 0)), max_size=2)) if flat.size else []:
        flat[pos] = draw(st.sampled_from(SPECIALS))
    dtype = np.dtype(draw(st.sampled_from(NP_DTYPES[:7] if plausible else NP_DTYPES)))
    if dtype.kind in "US":
        return base.astype(str).astype(dtype)
    if dtype.kind in "iub":
        base = np.nan_to_num(base * (255 / top if top <= 1 else 1), nan=0, posinf=0, neginf=0).clip(-5, 300)
    with np.errstate(all="ignore"):
        return base.astype(dtype)


@st.composite
def node_arrays(draw, image: tuple[int, ...] = DIGITS.shape) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels, mostly with matching lengths (to get past the first checks)."""
    images = draw(arrays(image=image))
    lead = len(images) if images.ndim and draw(st.integers(0, 3)) else None
    labels = draw(arrays(lead=lead, image=(1,), top=9))
    return images, labels


def corrupt(data: st.DataObject, raw: bytes) -> bytes:
    """``raw`` unchanged, truncated, with flipped bytes, extended, or replaced by garbage."""
    how = data.draw(st.sampled_from(["keep"] * 3 + ["truncate", "flip", "append", "garbage"]))
    out = bytearray(raw)
    if how == "truncate" and out:
        out = out[: data.draw(st.integers(0, len(out) - 1))]
    elif how == "flip" and out:
        for pos in data.draw(st.lists(st.integers(0, len(out) - 1), min_size=1, max_size=6)):
            out[pos] ^= data.draw(st.integers(1, 255))
    elif how == "append":
        out += data.draw(st.binary(min_size=1, max_size=16))
    elif how == "garbage":
        out = bytearray(data.draw(st.binary(max_size=200)))
    return bytes(out)


def check_outcome(path: Path, info: DatasetInfo) -> Split | None:
    """Load ``path``; a rejection must be a NodeDataError naming the file and a fix."""
    try:
        split = load_node_file(path, info)
    except NodeDataError as err:
        msg = str(err)
        assert str(path) in msg, msg
        assert any(w in msg for w in FIX_WORDS), msg
        return None
    assert len(split) > 0 and tuple(split.images.shape[1:]) == info.shape
    assert split.images.dtype == torch.float32 and torch.isfinite(split.images).all()
    assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split.images),)
    assert int(split.labels.min()) >= 0 and int(split.labels.max()) < info.num_classes
    return split


@FUZZ
@given(arrs=node_arrays(), drop=st.sampled_from([None, None, "images", "labels"]), data=st.data())
def test_fuzzed_npz_node_files(tmp_path_factory, arrs, drop, data):
    path = tmp_path_factory.mktemp("npz") / "node.npz"
    named = {"images": arrs[0], "labels": arrs[1], "extra": arrs[0]}
    np.savez(path, **{k: v for k, v in named.items() if k != drop})
    path.write_bytes(corrupt(data, path.read_bytes()))
    check_outcome(path, DIGITS)


@FUZZ
@given(arrs=node_arrays(), to_bf16=st.booleans(), data=st.data())
def test_fuzzed_safetensors_node_files(tmp_path_factory, arrs, to_bf16, data):
    tensors = {}
    for key, arr in zip(("images", "labels"), arrs, strict=True):
        if arr.dtype.kind in "biuf" and data.draw(st.integers(0, 5)):  # safetensors holds no strings or complex
            t = torch.from_numpy(np.ascontiguousarray(arr))
            tensors[key] = t.to(torch.bfloat16) if to_bf16 and t.is_floating_point() else t
    path = tmp_path_factory.mktemp("st") / "node.safetensors"
    path.write_bytes(corrupt(data, save_safetensors(tensors)))
    check_outcome(path, DIGITS)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """``arr`` as an IDX file of dtype ``code`` (big-endian, as the format says)."""
    dtypes = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with np.errstate(all="ignore"):
        body = np.asarray(arr).astype(dtypes[code]).tobytes()
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + body


@FUZZ
@given(arrs=node_arrays(), codes=st.tuples(*[st.sampled_from(IDX_CODES)] * 2), gz=st.booleans(), data=st.data())
def test_fuzzed_idx_directories(tmp_path_factory, arrs, codes, gz, data):
    folder = tmp_path_factory.mktemp("idx")
    for name, arr, code in zip(IDX_NAMES, arrs, codes, strict=True):
        if arr.dtype.kind in "USc":  # IDX holds real numbers only
            arr = np.zeros(arr.shape, np.uint8)
        raw = idx_bytes(arr, code)
        if gz:
            raw = gzip.compress(raw)
        fname = folder / (name + (".gz" if gz else ""))
        if data.draw(st.sampled_from(["file"] * 9 + ["dir"])) == "dir":
            fname.mkdir()  # a directory where a file should be
        else:
            fname.write_bytes(corrupt(data, raw))
    check_outcome(folder, DIGITS)


cifar_values = st.one_of(
    st.integers(0, 2).map(lambda n: np.arange(n * 3072, dtype=np.uint8).reshape(n, 3072)),
    st.lists(st.integers(0, 9), max_size=2).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.integers(0, 9).map(np.int64), max_size=2),
    arrays(image=(3, 32, 32)),
    st.lists(st.integers(-3, 12), max_size=4),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=2),
    st.binary(max_size=8),
    st.text(max_size=4),
    st.integers(-(2**70), 2**70),
    st.none(),
)

plausible_batches = st.integers(1, 2).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            b"data": st.just(np.arange(n * 3072, dtype=np.uint8).reshape(n, 3072)),
            b"labels": st.lists(st.integers(-1, 10), min_size=n, max_size=n + 1),
        }
    )
)


@FUZZ
@given(
    batch=plausible_batches
    | st.fixed_dictionaries({b"data": cifar_values, b"labels": cifar_values})
    | st.dictionaries(st.sampled_from([b"data", b"labels", b"fine_labels", "data"]), cifar_values, max_size=3)
    | cifar_values,
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    as_dir=st.booleans(),
    data=st.data(),
)
def test_fuzzed_cifar_batches(tmp_path_factory, batch, protocol, as_dir, data):
    folder = tmp_path_factory.mktemp("cifar")
    path = folder / "data_batch_1"
    path.write_bytes(corrupt(data, pickle.dumps(batch, protocol=protocol)))
    check_outcome(folder if as_dir else path, CIFAR)


class _Shell:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "data", "labels"])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = _Shell(marker)
    good = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    batch = evil if where == "top" else {**good, where.encode(): evil}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch))
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs the command
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DatasetFormatError, match=r"refusing to load (posix|os|nt)\.system"):
        read_cifar_batch(path)
    with pytest.raises(NodeDataError, match=re.escape(str(path))):
        load_node_file(tmp_path, CIFAR)
    assert not marker.exists()
    # the same file with a harmless payload loads, so the refusal is specific to the foreign global
    path.write_bytes(pickle.dumps(good))
    assert read_cifar_batch(path)[0].shape == (1, 3, 32, 32)


def test_node_data_checks_pixels_and_labels(tmp_path):
    ok = np.full((2, 8, 8), 0.5, np.float32)
    cases = {
        "nan": (np.where(np.eye(8, dtype=bool), np.nan, ok), np.zeros(2, np.int64), "NaN or infinite"),
        "range": (ok * 4, np.zeros(2, np.int64), r"float pixels span 2\.\.2, need \[0, 1\]"),
        "int": (np.full((2, 8, 8), 300, np.int32), np.zeros(2, np.int64), "integer pixels span 300..300"),
        "flabels": (ok, np.array([0.5, 1.0]), "labels must be integers"),
        "neg": (ok, np.array([0, -1]), r"labels span -1\.\.0"),
        "big": (ok, np.array([0, 10]), r"0\.\.9"),
        "len": (ok, np.zeros(3, np.int64), "3 labels for 2 images"),
        "empty": (ok[:0], np.zeros(0, np.int64), "holds no images"),
        "str": (ok.astype(str), np.zeros(2, np.int64), "dtype <U"),
    }
    for name, (images, labels, match) in cases.items():
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
        with pytest.raises(NodeDataError, match=match):
            load_node_file(tmp_path / f"{name}.npz", DIGITS)
    np.savez(tmp_path / "good.npz", images=ok, labels=np.array([3, 9], np.uint8))
    split = load_node_file(tmp_path / "good.npz", DIGITS)
    assert split.labels.tolist() == [3, 9] and torch.allclose(
        split.images, DIGITS.normalize(torch.full((2, 1, 8, 8), 0.5))
    )


def test_bfloat16_safetensors_and_npy_named_npz(tmp_path):
    path = tmp_path / "n.safetensors"
    path.write_bytes(
        save_safetensors(
            {"images": torch.full((2, 8, 8), 0.5, dtype=torch.bfloat16), "labels": torch.ones(2, dtype=torch.int64)}
        )
    )
    assert load_node_file(path, DIGITS).images.shape == (2, 1, 8, 8)
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(NodeDataError, match=r"not an \.npz archive"):
        load_node_file(tmp_path / "a.npz", DIGITS)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    Checkpoint(path, key="k").save({"x": torch.arange(6.0)}, {"iteration": 2, "history": [1.0]})
    return path.read_bytes()


@FUZZ
@given(data=st.data(), header=st.none() | st.text(max_size=30) | st.dictionaries(st.text(max_size=5), st.integers()))
def test_fuzzed_checkpoints(tmp_path_factory, checkpoint_bytes, data, header):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    raw = checkpoint_bytes
    if header is not None:  # a well-formed file whose checkpoint metadata is arbitrary
        text = header if isinstance(header, str) else json.dumps(header)
        raw = save_safetensors({"x": torch.ones(2)}, metadata={"fedistill-checkpoint": text})
    path.write_bytes(corrupt(data, raw))
    try:
        tensors, state = Checkpoint(path, key="k").load()
    except CheckpointError as err:
        assert str(path) in str(err) and ("delete it" in str(err) or "config" in str(err)), str(err)
        return
    assert isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_checkpoint_without_a_state_object_is_refused(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    meta = {"fedistill-checkpoint": json.dumps({"key": "k", "state": [1, 2]})}
    path.write_bytes(save_safetensors({"x": torch.ones(1)}, metadata=meta))
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors.*state.*delete it"):
        Checkpoint(path, key="k").load()


def test_resume_with_a_corrupt_run_directory_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("a: [1, 2\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml.*not a readable"):
        resume_config(tmp_path)
    (tmp_path / "config.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml.*mapping"):
        resume_config(tmp_path)
    (tmp_path / "summary.json").write_text('{"rounds": 3')
    with pytest.raises(CheckpointError, match=r"summary\.json.*not a JSON object"):
        RunDir(tmp_path, resume=True)
    assert (tmp_path / "summary.json").read_text() == '{"rounds": 3'  # kept for the user to repair


def test_audit_of_a_run_with_a_damaged_config_names_the_file(tmp_path):
    from fedistill.privacy.audit import RunDirError, run_audit

    (tmp_path / "synthetic.safetensors").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("model: {name: convnet\n")
    with pytest.raises(RunDirError, match=r"(?s)config\.yaml: not a readable config.*finished run"):
        run_audit({"run_dir": str(tmp_path)}, tmp_path / "audit")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(RunDirError, match=r"config\.yaml: has no 'model'"):
        run_audit({"run_dir": str(tmp_path)}, tmp_path / "audit")
    (tmp_path / "config.yaml").write_text("model: {name: convnet}\neval: {epochs: 1}\n")
    (tmp_path / "summary.json").write_text("[")
    with pytest.raises(RunDirError, match=r"summary\.json: not a JSON object \(JSONDecodeError"):
        run_audit({"run_dir": str(tmp_path)}, tmp_path / "audit")
    assert not (tmp_path / "audit").exists() and (tmp_path / "summary.json").read_text() == "["


def test_checkpoint_state_naming_a_missing_tensor_is_a_clear_error():
    from fedistill.federated.state import pack, unpack

    tensors: dict[str, torch.Tensor] = {}
    packed = pack({"w": torch.ones(2)}, tensors, "model")
    assert torch.equal(unpack(packed, tensors)["w"], torch.ones(2))
    with pytest.raises(ValueError, match=r"names tensor 'model\.w', which the file does not hold"):
        unpack(packed, {})
