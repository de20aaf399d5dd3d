"""Crash-safe checkpoints: one safetensors file of tensors plus a JSON state, written atomically.

Used by the server after every round (``fedistill simulate resume=RUN_DIR``) and by
resumable engines every ``checkpoint_every`` iterations (``fedistill central
resume=RUN_DIR``). A checkpoint carries a *key* (a hash of the configuration that
produced it), so resuming with a different configuration is refused instead of silently
mixing two runs. The file is replaced atomically: a crash leaves the previous one intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedistill.io import atomic_save_tensors, cache_key, read_yaml_mapping

__all__ = ["Checkpoint", "CheckpointError", "config_key", "resume_config"]

_META = "fedistill-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, or from another configuration)."""


def config_key(cfg: Any) -> str:
    """A stable key of a (JSON-able) configuration."""
    return cache_key("config", cfg=cfg)


class Checkpoint:
    """A checkpoint file at ``path`` for the configuration ``key``.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    key
        :func:`config_key` of what must match on resume.
    every
        For iteration checkpoints: save when ``iteration % every == 0`` (0 = never).
    """

    def __init__(self, path: str | Path, *, key: str, every: int = 0) -> None:
        self.path, self.key, self.every = Path(path), key, int(every)

    def due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (1-based count of finished steps) is a save point."""
        return self.every > 0 and iteration % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """Write tensors and the JSON ``state`` atomically (the previous checkpoint survives a crash)."""
        meta = {_META: json.dumps({"key": self.key, "state": state}, default=str)}
        return atomic_save_tensors(self.path, tensors, metadata=meta)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, state)``, or ``None`` when there is no checkpoint yet.

        Raises
        ------
        CheckpointError
            For an unreadable file or one written by another configuration.
        """
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            key, state = meta["key"], meta["state"]
        except Exception as err:  # safetensors and json raise several types for corrupt input
            raise CheckpointError(
                f"{self.path}: unreadable checkpoint ({type(err).__name__}: {err}); delete it to start over"
            ) from err
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.path}: unreadable checkpoint (its state is a {type(state).__name__}, not an object); "
                "delete it to start over"
            )
        if key != self.key:
            raise CheckpointError(
                f"{self.path} was written by a different configuration; resume with the run's own config.yaml "
                "(fedistill <command> resume=RUN_DIR, no other overrides) or delete the checkpoint to start over"
            )
        return tensors, state


def resume_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run was started with (its ``config.yaml``), with ``resume`` set to ``run_dir``.

    Raises
    ------
    CheckpointError
        When ``config.yaml`` is missing, unreadable or not a mapping (the message names it).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: resume=RUN_DIR needs the directory of an interrupted run")
    fix = "restore the run's config.yaml (written when the run started) or start a new run"
    cfg = read_yaml_mapping(path, CheckpointError, fix)
    cfg["resume"] = str(run_dir)
    return cfg
