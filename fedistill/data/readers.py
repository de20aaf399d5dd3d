"""Readers for the standard on-disk dataset formats: IDX (MNIST family) and the
CIFAR-10 python-pickle batches. They return raw ``uint8`` arrays."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedistill.data.base import DatasetFormatError

__all__ = ["read_cifar_batch", "read_idx", "write_idx"]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed).

    Parameters
    ----------
    path
        File path; a ``.gz`` suffix means gzip.

    Returns
    -------
    numpy.ndarray
        The array with the shape and dtype recorded in the header.

    Raises
    ------
    DatasetFormatError
        If the magic number, dtype code or size does not match the IDX format.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot read IDX file ({exc}); re-download it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(f"{path}: not an IDX file (bad magic number); expected MNIST-style IDX data")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX payload has {len(raw) - header} bytes, header {shape} needs {expected}; "
            "the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file; gzip if ``path`` ends in ``.gz``.

    Used to create dataset directories for nodes and for tests.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtins (CIFAR batches need no more)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_1`` ... ``test_batch``).

    Returns
    -------
    images, labels
        ``uint8 [N, 3, 32, 32]`` and ``int64 [N]``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetFormatError(
            f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
            "expected the files of cifar-10-python.tar.gz"
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetFormatError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} / {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels
