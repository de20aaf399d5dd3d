"""SyntheticSet: bit-exact round-trip, validation naming the field, clear file errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedistill.data import SyntheticSet, SyntheticSetError, dataset_info


def _set(n=20, soft=True, info=None):
    info = info or dataset_info("digits")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % info.num_classes
    sl = torch.softmax(torch.randn(n, info.num_classes, generator=g), 1) if soft else None
    return SyntheticSet(
        torch.randn(n, *info.shape, generator=g), labels, info, sl, {"method": "dm", "ipc": 2, "client_ids": [3, 5]}
    )


def test_roundtrip_is_bit_exact(tmp_path):
    s = _set()
    path = s.save(tmp_path / "syn.safetensors")
    assert (tmp_path / "syn.json").is_file()
    t = SyntheticSet.load(path)
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
    assert torch.equal(t.soft_labels, s.soft_labels)
    assert t.metadata == s.metadata and t.info == s.info


def test_roundtrip_without_hard_labels(tmp_path):
    s = _set()
    s.labels = None
    t = SyntheticSet.load(s.save(tmp_path / "s.safetensors"))
    assert t.labels is None and torch.equal(t.hard_labels, s.soft_labels.argmax(1))


def _mutations():
    fm = dataset_info("fashion_mnist")
    return [
        ("images", "4 dimensions", lambda s: setattr(s, "images", s.images[:, 0])),
        ("images", "float32", lambda s: setattr(s, "images", s.images.double())),
        ("images", "NaN", lambda s: s.images.__setitem__((0, 0, 0, 0), float("nan"))),
        ("images", "does not match dataset", lambda s: setattr(s, "images", torch.zeros(20, *fm.shape))),
        ("labels", r"\[0, 10\)", lambda s: s.labels.__setitem__(0, 10)),
        ("labels", r"\[0, 10\)", lambda s: s.labels.__setitem__(0, -1)),
        ("labels", "int64", lambda s: setattr(s, "labels", s.labels.int())),
        ("labels", "shape", lambda s: setattr(s, "labels", s.labels[:5])),
        ("soft_labels", "probabilities", lambda s: s.soft_labels.mul_(2)),
        ("soft_labels", "shape", lambda s: setattr(s, "soft_labels", s.soft_labels[:, :5])),
        ("soft_labels", "NaN", lambda s: s.soft_labels.__setitem__((1, 1), float("inf"))),
        ("labels", "neither", lambda s: (setattr(s, "labels", None), setattr(s, "soft_labels", None))),
        ("metadata", "JSON", lambda s: s.metadata.__setitem__("bad", object())),
    ]


@pytest.mark.parametrize(("field", "problem", "mutate"), _mutations())
def test_validate_names_the_field(field, problem, mutate):
    s = _set()
    mutate(s)
    with pytest.raises(SyntheticSetError, match=problem) as exc:
        s.validate()
    assert exc.value.field == field and repr(field) in str(exc.value)


def test_validate_size_cap():
    with pytest.raises(SyntheticSetError, match="exceed the cap of 10") as exc:
        _set(n=20).validate(max_size=10)
    assert exc.value.field == "images"


def test_validate_against_another_dataset():
    with pytest.raises(SyntheticSetError, match="fashion_mnist"):
        _set().validate(dataset_info("fashion_mnist"))


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    path = _set().save(tmp_path / "s.safetensors")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    fixes = {
        "trunc.safetensors": ("not a readable safetensors file", "re-create it with SyntheticSet.save"),
        "junk.safetensors": ("not a readable safetensors file", "re-create it with SyntheticSet.save"),
        "missing.safetensors": ("does not exist", "pass the path of a synthetic.safetensors file"),
    }
    for name, (problem, fix) in fixes.items():
        with pytest.raises(SyntheticSetError) as exc:
            SyntheticSet.load(tmp_path / name)
        assert exc.value.field == "file" and name in str(exc.value)
        assert problem in exc.value.problem and exc.value.fix == fix and str(exc.value).endswith(f"Fix: {fix}")
    # a foreign safetensors file (no fedistill header) is refused with the reason and the fix
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(1, 1, 8, 8)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SyntheticSetError, match="no fedistill metadata") as exc:
        SyntheticSet.load(tmp_path / "foreign.safetensors")
    assert exc.value.field == "file" and exc.value.fix == "save it with SyntheticSet.save"
    # a fedistill header that is not what save writes, or a file without images
    for header, field, problem in (
        ("{not json", "metadata", "malformed header (JSONDecodeError"),
        ('{"metadata": {}}', "metadata", "malformed header (KeyError"),
        (json.dumps({"dataset": _set().info.to_dict(), "metadata": []}), "metadata", "must be a JSON object"),
    ):
        save_file(
            {"images": torch.zeros(1, 1, 8, 8)}, str(tmp_path / "bad.safetensors"), metadata={"fedistill": header}
        )
        with pytest.raises(SyntheticSetError) as exc:
            SyntheticSet.load(tmp_path / "bad.safetensors")
        assert exc.value.field == field and problem in exc.value.problem, exc.value
    header = json.dumps({"dataset": _set().info.to_dict()})
    save_file(
        {"labels": torch.zeros(1, dtype=torch.int64)},
        str(tmp_path / "noimg.safetensors"),
        metadata={"fedistill": header},
    )
    with pytest.raises(SyntheticSetError, match="has no 'images' tensor") as exc:
        SyntheticSet.load(tmp_path / "noimg.safetensors")
    assert exc.value.field == "images"


def test_tampered_content_is_rejected_on_load(tmp_path):
    s = _set(soft=False)
    s.labels = s.labels.clone()
    path = s.save(tmp_path / "s.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["labels"][0] = 99
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SyntheticSetError, match="labels"):
        SyntheticSet.load(path)
