"""Crash-safe file IO and an on-disk cache for expensive artefacts.

Every writer in fedistill goes through :func:`atomic_write_text` or
:func:`atomic_save_tensors`: write to a temporary file beside the target, then
``os.replace`` it, so a reader never sees a half-written file and a crash never
destroys the previous version. :func:`cached_tensors` keys artefacts (teachers,
expert trajectories, baselines) by everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_save_tensors",
    "atomic_write_text",
    "cache_dir",
    "cache_key",
    "cache_path",
    "cached_tensors",
    "load_tensors",
    "read_json_object",
    "read_yaml_mapping",
]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` as safetensors atomically; tensors are made contiguous CPU copies."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(flat, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; raises ``ValueError`` naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt input
        raise ValueError(f"{path}: not a readable safetensors file ({err}); delete it and run again") from err


def read_json_object(path: str | Path, error: type[Exception], fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a run's ``summary.json`` ...); the file is never modified.

    Parameters
    ----------
    path
        The file to read.
    error
        Raised, naming the file, what is wrong and ``fix``, when it is unreadable or not an object.
    fix
        What the user should do about a damaged file.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not a JSON object ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object (it holds a {type(value).__name__}); {fix}")
    return value


def read_yaml_mapping(path: str | Path, error: type[Exception], fix: str) -> dict[str, Any]:
    """The resolved YAML mapping in ``path`` (a run's ``config.yaml``); errors as :func:`read_json_object`."""
    from omegaconf import OmegaConf

    path = Path(path)
    try:
        value = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml and omegaconf raise many types for a damaged file
        raise error(f"{path}: not a readable config ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(value, dict):
        raise error(f"{path}: holds a {type(value).__name__}, not a mapping of settings; {fix}")
    return value  # type: ignore[return-value]


def cache_dir(root: str | Path | None = None) -> Path:
    """The artefact cache: ``root``, else ``$FEDISTILL_CACHE``, else ``~/.cache/fedistill``."""
    base = root or os.environ.get("FEDISTILL_CACHE") or Path.home() / ".cache" / "fedistill"
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(kind: str, **parts: Any) -> str:
    """A stable file stem ``{kind}-{hash}`` for the artefact determined by ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cache_path(kind: str, root: str | Path | None = None, **parts: Any) -> Path:
    """Where :func:`cached_tensors` keeps the artefact keyed by ``(kind, parts)`` under ``root``."""
    return cache_dir(root) / f"{cache_key(kind, **parts)}.safetensors"


def cached_tensors(
    kind: str,
    build: Callable[[], dict[str, torch.Tensor]],
    *,
    root: str | Path | None = None,
    **parts: Any,
) -> dict[str, torch.Tensor]:
    """Load the artefact keyed by ``(kind, parts)`` from the cache, or build and store it.

    Parameters
    ----------
    kind
        Artefact family (``teacher``, ``experts``, ...), the file-name prefix.
    build
        Called on a cache miss; returns the tensors to store.
    root
        Cache directory (see :func:`cache_dir`).
    **parts
        Everything that determines the artefact (dataset, arch, seed, epochs ...),
        JSON-serialisable. Also written into the file's metadata for inspection.
    """
    path = cache_path(kind, root, **parts)
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # corrupt cache entry: rebuild it rather than fail
            path.unlink(missing_ok=True)
    tensors = build()
    atomic_save_tensors(path, tensors, metadata={"fedistill": json.dumps({"kind": kind, **parts}, default=str)})
    return tensors
