"""Core dataset types: :class:`DatasetInfo`, :class:`Split`, :class:`DataBundle`.

Everything is held as tensors in memory: images ``[N, C, H, W]`` float32 in the
normalized space, labels ``[N]`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DataBundle", "DatasetFormatError", "DatasetInfo", "DatasetNotFoundError", "Split"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes
    ----------
    name
        Registry name (``"digits"``, ``"fashion_mnist"``, ...).
    num_classes, channels, image_size
        Label count and image geometry ``(C, H, W)`` = ``(channels, *image_size)``.
    mean, std
        Per-channel normalization constants (in ``[0, 1]`` pixel units).
    class_names
        Human-readable class names.
    flip
        Whether horizontal flips are label-preserving (used by augmentation).
    """

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    flip: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(C, H, W)``."""
        return (self.channels, *self.image_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixels in ``[0, 1]`` to the normalized space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (not clipped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def to_dict(self) -> dict:
        """JSON-serializable form (see :meth:`from_dict`)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "flip": self.flip,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            name=str(d["name"]),
            num_classes=int(d["num_classes"]),
            channels=int(d["channels"]),
            image_size=tuple(int(v) for v in d["image_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            class_names=tuple(str(v) for v in d.get("class_names", ())),
            flip=bool(d.get("flip", True)),
        )


@dataclass
class Split:
    """Labelled images of one dataset split (or one client's partition).

    Attributes
    ----------
    images
        ``[N, C, H, W]`` float32, normalized.
    labels
        ``[N]`` int64 in ``[0, info.num_classes)``.
    info
        The dataset these images come from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        """The split restricted to ``index`` (a LongTensor of positions)."""
        return Split(self.images[index], self.labels[index], self.info)

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class, ``[num_classes]`` int64."""
        return torch.bincount(self.labels, minlength=self.info.num_classes)


@dataclass
class DataBundle:
    """Train / validation / test splits of a dataset.

    The validation split is carved from the original training set and is the only
    split any tuning may look at; the test split is for final reporting.
    """

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    extras: dict = field(default_factory=dict)
