"""A strategy's run from first to last round: fedistill's own loop, checkpoints, and the summary.

:class:`Lifecycle` is the part of :class:`~strategies.base.Strategy` that Flower's
``Strategy.start`` lacks: :meth:`Lifecycle.run_rounds` drives the strategy's Flower methods
round by round (through :meth:`~strategies.base.Strategy.run_round`) and saves a checkpoint
after each, :meth:`Lifecycle.state_dict` / :meth:`Lifecycle.load_state_dict` say what one holds,
and :meth:`Lifecycle.conclude` writes the results (also after Flower's own ``start``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedistill.checkpoint import Checkpoint, CheckpointError, config_key
from fedistill.federated.state import get_path, pack, set_path, unpack
from fedistill.reporting import chance_warning, progress_bars, save_accuracy_plot

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedistill.data.base import DataBundle
    from fedistill.federated import GlobalModel
    from fedistill.reporting import RunDir

__all__ = ["Lifecycle"]


class Lifecycle:
    """Mixin of :class:`~strategies.base.Strategy`: the run loop, round checkpoints, the summary and controls."""

    name: ClassVar[str]
    cfg: dict[str, Any]
    run: RunDir
    bundle: DataBundle
    rounds: int
    history: list[dict[str, Any]]
    global_model: GlobalModel
    bytes_up: int
    bytes_down: int
    failed_total: int
    _bars: Any

    #: What a round checkpoint saves and a resumed run restores (:meth:`state_dict`), as attribute
    #: paths; subclasses extend it with their own state.
    checkpoint_attrs: ClassVar[tuple[str, ...]] = (
        "history",
        "bytes_up",
        "bytes_down",
        "failed_total",
        "global_model.state",
    )

    # ------------------------------------------------------------- hooks
    def finish(self) -> dict[str, Any]:
        """Save strategy outputs after the last round; return extra summary fields."""
        return {}

    def control(self) -> dict[str, Any]:
        """Controls (e.g. the random-real subset) run after the main result is on disk; extra summary fields."""
        return {}

    def chance_hint(self) -> str:
        """The likely cause of a global model at chance level, and where to look (strategies add theirs)."""
        return (
            "it learned nothing from the clients' uploads; see clients_failed and the round failures in metrics.jsonl"
        )

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything the next round needs, by name (:attr:`checkpoint_attrs`), as live objects."""
        return {attr: get_path(self, attr) for attr in self.checkpoint_attrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (every name of :attr:`checkpoint_attrs` must be there)."""
        missing = [attr for attr in self.checkpoint_attrs if attr not in state]
        if missing:
            raise KeyError(f"strategy={self.name} state lacks {missing}")
        for attr in self.checkpoint_attrs:
            set_path(self, attr, state[attr])

    def checkpoint(self) -> Checkpoint:
        """This run's round checkpoint (keyed by the config, so another config cannot resume it)."""
        skip = ("resume", "device", "verbose", "ray", "client", "max_in_flight", "tracking")
        key = config_key({k: v for k, v in self.cfg.items() if k not in skip})
        return Checkpoint(self.run.path / "checkpoint.safetensors", key=key)

    def save_checkpoint(self) -> Path:
        """Atomically save :meth:`state_dict` (after every completed round); returns its path."""
        tensors: dict[str, Any] = {}
        state = {attr: pack(value, tensors, attr) for attr, value in self.state_dict().items()}
        return self.checkpoint().save(tensors, state)

    def restore_checkpoint(self) -> int:
        """Load the last round checkpoint, if any, through :meth:`load_state_dict`; returns the completed rounds."""
        loaded = self.checkpoint().load()
        if loaded is None:
            return 0
        tensors, saved = loaded
        current = self.state_dict()
        state = {}
        for attr in self.checkpoint_attrs:
            try:
                state[attr] = unpack(saved[attr], tensors, current[attr])
            except (KeyError, ValueError, TypeError) as err:
                path = self.checkpoint().path
                raise CheckpointError(
                    f"{path}: field {attr!r} of strategy={self.name} cannot be restored ({err}); the file is from "
                    "another fedistill version or damaged: delete it to start the run over"
                ) from err
        self.load_state_dict(state)
        return len(self.history)

    # --------------------------------------------------------------- run
    def run_rounds(self, grid: Grid, *, resume: bool = False) -> dict[str, Any]:
        """Run every round (after the last checkpointed one when ``resume``); returns the summary."""
        start = time.perf_counter()
        done = self.restore_checkpoint() if resume else 0
        if resume:
            self.run.log("resumed", completed_rounds=done)
        self.connect(grid)  # type: ignore[attr-defined]
        with progress_bars() as bars:
            self._bars = bars  # transmit() shows each round's replies as they arrive on a line of its own
            bar = bars.add_task(f"{self.name} rounds", total=self.rounds, info="", completed=done)
            ckpt: dict[str, Any] = {}  # this process's checkpoint cost: total seconds, size of the last one
            for r in range(done + 1, self.rounds + 1):
                rec = self.run_round(grid, r)  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                size = self.save_checkpoint().stat().st_size
                seconds = time.perf_counter() - t0
                ckpt = {"seconds": round(ckpt.get("seconds", 0.0) + seconds, 4), "bytes": size}
                self.run.log("checkpoint", round=r, seconds=round(seconds, 4), bytes=size)
                bars.update(bar, advance=1, info=f"acc {rec['accuracy']:.2f}%  failed {rec['clients_failed']}")
            self._bars = None
        return self.conclude(wall_seconds=time.perf_counter() - start, checkpoint=ckpt)

    def conclude(
        self, *, wall_seconds: float | None = None, checkpoint: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the run's results after its last round; then run the controls; returns the summary.

        Saves the strategy's outputs (:meth:`finish`), the global model and the accuracy plot,
        writes ``summary.json`` with status ``done`` (a chance-level warning when the global
        model learned nothing), and only then runs :meth:`control`, so the main result is on
        disk before the controls start. Call it after Flower's ``Strategy.start`` too.
        """
        if not self.history:
            raise RuntimeError(f"strategy={self.name}: no round completed, nothing to conclude")
        t0 = time.perf_counter()
        extra = self.finish() | self.attack_summary()  # type: ignore[attr-defined]
        self.global_model.save(self.run.path / "global_model.safetensors")
        save_accuracy_plot(
            self.history, self.run.path / "accuracy.png", title=f"{self.name} on {self.bundle.info.name}"
        )
        chance = chance_warning(
            self.history[-1]["accuracy"], self.bundle.info.num_classes, what="the global model", why=self.chance_hint()
        )
        if chance:
            extra["warnings"] = [chance]
        if wall_seconds is None:
            wall_seconds = sum(h["seconds"] for h in self.history)
        summary = self.run.update_summary(
            final_accuracy=self.history[-1]["accuracy"],
            final_loss=self.history[-1]["loss"],
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            clients_failed=self.failed_total,
            checkpoint=checkpoint or {},
            wall_seconds=round(wall_seconds + time.perf_counter() - t0, 3),
            status="done",
            **extra,
        )
        t1 = time.perf_counter()
        controls = self.control()
        if not controls:
            return summary
        return self.run.update_summary(**controls, control_seconds=round(time.perf_counter() - t1, 3))
