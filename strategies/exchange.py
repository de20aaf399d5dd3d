"""How a strategy's messages go out and come back: a windowed push/pull and a round's live progress.

:func:`push_and_pull` has the semantics of Flower's ``Grid.send_and_receive`` but keeps at
most a window of messages in flight and reports every poll; :class:`RoundWatch` turns those
polls into a live line and ``round_progress`` events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from flwr.app import Message
from flwr.serverapp import Grid

from fedistill.reporting import RunDir

__all__ = ["RoundWatch", "push_and_pull"]


def push_and_pull(
    grid: Grid,
    msgs: list[Message],
    *,
    timeout: float,
    on_poll: Callable[[list[Message], bool], None],
    window: int | None = None,
) -> list[Message]:
    """``grid.send_and_receive(msgs, timeout=timeout)``, calling ``on_poll(replies so far, final)`` as it waits.

    The same semantics as Flower's: push the messages, pull the replies every
    :data:`_PULL_INTERVAL` seconds until each pushed message has one or ``timeout``
    seconds (wall clock, from the first push) have passed; replies come in arrival order
    (the caller orders them by client). A message the grid could not push (a ``None`` id)
    can never be answered and is not waited for.

    ``window`` keeps at most that many messages in flight, pushing the next ones (in
    order) as replies arrive (``None``: all at once). Flower's in-memory SuperLink scans
    every stored message for every node about ten times a second, so hundreds of messages
    in flight cost the simulation's driver a whole core; a window of a few times the
    number of Ray actors keeps every actor busy at a fraction of that.
    """
    queue = list(msgs)
    size = len(queue) if window is None else max(1, int(window))
    pending: set[str] = set()
    end = time.time() + timeout
    replies: list[Message] = []
    while True:
        room = size - len(pending)
        if room > 0 and queue:
            batch, queue = queue[:room], queue[room:]
            pending.update(mid for mid in grid.push_messages(batch) if mid)
            continue  # refill until the window is full or nothing is left
        if (not pending and not queue) or time.time() >= end:
            break
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if got and queue:
            continue  # room for more: push before sleeping
        if not pending and not queue:
            break
        on_poll(replies, False)
        time.sleep(_PULL_INTERVAL)
    on_poll(replies, True)
    return replies


#: Seconds between two pulls of a round's replies.
_PULL_INTERVAL = 0.3


class RoundWatch:
    """Progress of one round's replies: a live line on ``bars`` and ``round_progress`` events.

    Called as ``watch(replies, final)`` after every pull. The event (``round``, ``done``,
    ``sampled``, ``failed``: error replies so far, ``elapsed`` and ``eta_seconds``: the
    remaining clients at the rate so far, ``None`` before the first reply) goes to
    ``run.log`` every :attr:`every` seconds and once more when the replies are complete
    or the round timed out.
    """

    #: Seconds between two ``round_progress`` events while a round waits (at least 2).
    every: ClassVar[float] = 10.0

    def __init__(self, round_: int, sampled: int, *, run: RunDir, bars: Any = None, label: str = "") -> None:
        self.round, self.sampled, self.run, self.bars = round_, sampled, run, bars
        self.t0 = self.last = time.monotonic()
        self.line = None if bars is None else bars.add_task(f"  round {round_} {label}", total=sampled, info="")

    def status(self, replies: list[Message], now: float) -> dict[str, Any]:
        """The event's fields for ``replies`` received by ``now`` (a :func:`time.monotonic` reading)."""
        done, elapsed = len(replies), now - self.t0
        eta = elapsed * (self.sampled - done) / done if done else None
        return {
            "round": self.round,
            "done": done,
            "sampled": self.sampled,
            "failed": sum(1 for r in replies if r.has_error()),
            "elapsed": round(elapsed, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
        }

    def __call__(self, replies: list[Message], final: bool) -> None:
        now = time.monotonic()
        status = self.status(replies, now)
        if self.bars is not None:
            eta = "?" if status["eta_seconds"] is None else f"{status['eta_seconds']:.0f}s"
            info = f"failed {status['failed']}  eta {eta}"
            self.bars.update(self.line, completed=status["done"], info=info)
            if final:
                self.bars.remove_task(self.line)
        if final or now - self.last >= max(2.0, self.every):
            self.last = now
            self.run.log("round_progress", **status)
