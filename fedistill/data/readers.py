"""Readers for the standard on-disk dataset formats: IDX (MNIST family) and the
CIFAR-10 python-pickle batches. They return raw ``uint8`` arrays."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
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
        If the file cannot be read (truncated or corrupt gzip), or the magic number,
        dtype code or size does not match the IDX format.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
            shape, dtype = _idx_header(path, head)
            expected = math.prod(shape) * dtype.itemsize
            payload = _read_at_most(f, expected + 1)  # bounded: a gzip bomb cannot exhaust memory
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetFormatError(f"{path}: cannot read IDX file ({type(exc).__name__}: {exc}); re-download it") from exc
    if len(payload) != expected:
        raise DatasetFormatError(
            f"{path}: IDX payload has {len(payload)}{'+' if len(payload) > expected else ''} bytes, "
            f"header {shape} needs {expected}; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_header(path: Path, head: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an IDX header (magic ``00 00 code ndim`` + ``ndim`` big-endian sizes)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DatasetFormatError(f"{path}: not an IDX file (bad magic number); expected MNIST-style IDX data")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: unknown IDX dtype code 0x{code:02x}; the file is corrupt, re-download it")
    if len(head) < 4 + 4 * ndim:
        raise DatasetFormatError(f"{path}: truncated IDX header; the file is corrupt, re-download it")
    return struct.unpack(f">{ndim}I", head[4:]), np.dtype(_IDX_DTYPES[code])


def _read_at_most(f: io.BufferedIOBase, limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of ``f``, read in chunks (a single huge ``read`` would allocate ``limit`` up front)."""
    parts, total = [], 0
    while total < limit:
        part = f.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


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
    """Unpickler that only rebuilds numpy arrays, numpy scalars and builtins (CIFAR batches need no more).

    Each allowed global only builds data from data: ``_reconstruct`` / ``ndarray`` / ``dtype``
    (arrays, every protocol), ``_frombuffer`` (arrays, protocol 5, Python 3.14's default),
    ``scalar`` (numpy scalars in a label list) and ``_codecs.encode`` (bytes, protocols 0-2).
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if name == "bytes" and module in ("builtins", "__builtin__"):  # b"" at protocols 0-2
            return _empty_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` for a pickle; any argument is refused (``bytes(10**12)`` would allocate a terabyte)."""
    if args:
        raise pickle.UnpicklingError("refusing bytes(...) with arguments in a CIFAR batch")
    return b""


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_1`` ... ``test_batch``).

    The batch is a pickle, so it is loaded with an unpickler that can only rebuild
    builtins and numpy arrays: a file that names anything else (``os.system`` ...) is
    refused before any of it runs.

    Parameters
    ----------
    path
        The batch file.

    Returns
    -------
    images, labels
        ``uint8 [N, 3, 32, 32]`` and ``int64 [N]``.

    Raises
    ------
    DatasetFormatError
        If the file is not a CIFAR-10 python batch (unreadable, foreign pickle, or
        ``data`` / ``labels`` of the wrong type or shape).
    """
    path = Path(path)
    hint = "expected the files of cifar-10-python.tar.gz"
    try:
        raw = path.read_bytes()
        d = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # unpickling corrupt bytes raises many types; every one means "not a batch"
        raise DatasetFormatError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); {hint}") from exc
    data, labels = _cifar_fields(path, d, hint)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFormatError(f"{path}: field 'data' must be a uint8 array [N, 3072], got {what}; {hint}")
    labels = _cifar_labels(labels)
    if labels is None or len(labels) != len(data):
        got = "not a list of integers" if labels is None else f"{len(labels)} labels for {len(data)} images"
        raise DatasetFormatError(f"{path}: field 'labels' must hold one integer per image ({got}); {hint}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_fields(path: Path, d: object, hint: str) -> tuple[object, object]:
    """``data`` and ``labels`` (or CIFAR-100 ``fine_labels``) of an unpickled batch."""
    if not isinstance(d, dict):
        raise DatasetFormatError(f"{path}: holds a pickled {type(d).__name__}, not a dict of batch fields; {hint}")
    labels = d.get(b"labels", d.get(b"fine_labels"))
    missing = [name for name, v in (("data", d.get(b"data")), ("labels", labels)) if v is None]
    if missing:
        raise DatasetFormatError(f"{path}: field {missing[0]!r} is missing (keys: {sorted(map(str, d))}); {hint}")
    return d[b"data"], labels


def _cifar_labels(labels: object) -> np.ndarray | None:
    """Labels as ``int64 [N]``, or ``None`` unless they are a list of ints or a 1-D integer array.

    Nothing is converted before the check, so a nested (possibly self-sharing) list cannot
    make numpy walk an exponentially large structure.
    """
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if isinstance(labels, list) and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels):
        try:
            return np.asarray(labels, dtype=np.int64)
        except OverflowError:
            return None
    return None
