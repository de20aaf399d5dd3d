"""The :class:`SyntheticSet`: a distilled dataset with labels and metadata.

Stored as safetensors (tensors ``images``, ``labels``, ``soft_labels``) with the
metadata as JSON both in the safetensors header (key ``fedistill``) and in a
sidecar ``.json`` file for people to read. Never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedistill.data.base import DatasetInfo

__all__ = ["DEFAULT_MAX_SIZE", "SyntheticSet", "SyntheticSetError"]

DEFAULT_MAX_SIZE = 100_000
"""Default cap on the number of synthetic images :meth:`SyntheticSet.validate` accepts."""

FORMAT_VERSION = 1


class SyntheticSetError(ValueError):
    """A synthetic set (or its file) is invalid.

    Attributes
    ----------
    field
        The offending field (``"images"``, ``"labels"``, ``"soft_labels"``, ``"metadata"``, ``"file"``).
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field, self.problem, self.fix = field, problem, fix
        msg = f"synthetic set field {field!r}: {problem}"
        super().__init__(f"{msg}. Fix: {fix}" if fix else msg)


@dataclass
class SyntheticSet:
    """Synthetic images with hard and/or soft labels.

    Attributes
    ----------
    images
        ``[N, C, H, W]`` float32 in the dataset's normalized space.
    labels
        ``[N]`` int64 hard labels (``None`` only if ``soft_labels`` is given).
    soft_labels
        ``[N, K]`` float32 probability rows, or ``None``.
    info
        The dataset the set was distilled from (shape, classes, normalization).
    metadata
        Free JSON-serializable metadata: ``method``, ``ipc``, ``client_ids``, ``privacy`` ...
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    info: DatasetInfo
    soft_labels: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def hard_labels(self) -> torch.Tensor:
        """Hard labels; the argmax of the soft labels when no hard labels are stored."""
        if self.labels is not None:
            return self.labels
        assert self.soft_labels is not None
        return self.soft_labels.argmax(dim=1)

    def nbytes(self) -> int:
        """Payload size in bytes (images and labels)."""
        ts = [t for t in (self.images, self.labels, self.soft_labels) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def detach(self) -> SyntheticSet:
        """A copy with tensors detached, contiguous, on the CPU."""

        def d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu").contiguous().clone()

        return SyntheticSet(d(self.images), d(self.labels), self.info, d(self.soft_labels), dict(self.metadata))

    # ------------------------------------------------------------------ validation
    def validate(self, info: DatasetInfo | None = None, *, max_size: int = DEFAULT_MAX_SIZE) -> SyntheticSet:
        """Check shapes, dtypes, values and size; return ``self`` if valid.

        Parameters
        ----------
        info
            The dataset the set must fit (channels, image size, classes); defaults to ``self.info``.
        max_size
            Largest accepted number of images.

        Raises
        ------
        SyntheticSetError
            Naming the offending field, the problem and the fix.
        """
        info = info or self.info
        x, y, s = self.images, self.labels, self.soft_labels
        if not isinstance(x, torch.Tensor):
            raise SyntheticSetError("images", f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise SyntheticSetError("images", f"expected 4 dimensions [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise SyntheticSetError("images", f"expected dtype float32, got {x.dtype}", "cast with .float()")
        n = x.shape[0]
        if n == 0:
            raise SyntheticSetError("images", "the set is empty")
        if n > max_size:
            raise SyntheticSetError("images", f"{n} images exceed the cap of {max_size}", "lower ipc or raise the cap")
        if tuple(x.shape[1:]) != info.shape:
            raise SyntheticSetError(
                "images",
                f"image shape {tuple(x.shape[1:])} does not match dataset {info.name!r} {info.shape} "
                "(channels, height, width)",
                f"distill with dataset={info.name} or evaluate against the dataset the set came from",
            )
        if not torch.isfinite(x).all():
            raise SyntheticSetError("images", "contains NaN or infinite values")
        if y is None and s is None:
            raise SyntheticSetError("labels", "neither hard labels nor soft labels are present")
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
                raise SyntheticSetError("labels", f"expected an int64 tensor, got {getattr(y, 'dtype', type(y))}")
            if tuple(y.shape) != (n,):
                raise SyntheticSetError("labels", f"expected shape ({n},), got {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
                raise SyntheticSetError(
                    "labels",
                    f"values must lie in [0, {info.num_classes}), got range [{int(y.min())}, {int(y.max())}]",
                )
        if s is not None:
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
                raise SyntheticSetError("soft_labels", f"expected a float32 tensor, got {getattr(s, 'dtype', type(s))}")
            if tuple(s.shape) != (n, info.num_classes):
                raise SyntheticSetError(
                    "soft_labels", f"expected shape ({n}, {info.num_classes}), got {tuple(s.shape)}"
                )
            if not torch.isfinite(s).all():
                raise SyntheticSetError("soft_labels", "contains NaN or infinite values")
            if (s < 0).any() or not torch.allclose(s.sum(1), torch.ones(n), atol=1e-3):
                raise SyntheticSetError("soft_labels", "rows must be probabilities (non-negative, summing to 1)")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise SyntheticSetError("metadata", f"not JSON-serializable ({exc})") from exc
        return self

    # ------------------------------------------------------------------------- IO
    def _header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "dataset": self.info.to_dict(), "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``) and its sidecar ``.json``, atomically.

        Returns
        -------
        pathlib.Path
            The safetensors path.
        """
        from fedistill.io import atomic_save_tensors, atomic_write_text

        path = Path(path)
        self.validate(max_size=max(len(self), DEFAULT_MAX_SIZE))
        tensors = {"images": self.images}
        if self.labels is not None:
            tensors["labels"] = self.labels
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, tensors, metadata={"fedistill": json.dumps(self._header())})
        atomic_write_text(path.with_suffix(".json"), json.dumps(self._header(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, validate: bool = True) -> SyntheticSet:
        """Read a set written by :meth:`save`.

        Raises
        ------
        SyntheticSetError
            ``field="file"`` for a missing, corrupt or foreign file; other fields when
            the content fails :meth:`validate`.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SyntheticSetError("file", f"{path} does not exist", "pass the path of a synthetic.safetensors file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise SyntheticSetError(
                "file", f"{path} is not a readable safetensors file ({exc})", "re-create it with SyntheticSet.save"
            ) from exc
        if "fedistill" not in meta:
            raise SyntheticSetError(
                "file", f"{path} has no fedistill metadata header", "save it with SyntheticSet.save"
            )
        try:
            header = json.loads(meta["fedistill"])
            info = DatasetInfo.from_dict(header["dataset"])
            if not isinstance(header.get("metadata", {}), dict):
                raise TypeError("'metadata' must be a JSON object")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SyntheticSetError("metadata", f"{path}: malformed header ({type(exc).__name__}: {exc})") from exc
        if "images" not in tensors:
            raise SyntheticSetError("images", f"{path} has no 'images' tensor")
        out = cls(
            images=tensors["images"],
            labels=tensors.get("labels"),
            info=info,
            soft_labels=tensors.get("soft_labels"),
            metadata=header.get("metadata", {}),
        )
        if not validate:
            return out
        try:
            return out.validate(max_size=max(len(out), 1))
        except SyntheticSetError as exc:  # name the file the bad content came from
            raise SyntheticSetError(exc.field, f"{path}: {exc.problem}", exc.fix) from exc
