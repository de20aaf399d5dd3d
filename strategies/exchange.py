"""How a strategy's messages go out and come back: node discovery, a windowed push/pull, a round's live progress.

:func:`push_and_pull` has the semantics of Flower's ``Grid.send_and_receive`` but keeps at
most a window of messages in flight and reports every poll; :class:`RoundWatch` turns those
polls into a live line and ``round_progress`` events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedistill.federated import ClientFailure, FederationError
from fedistill.reporting import RunDir
from protocol.records import content_bytes, read_metrics, task_content, tensor_record
from strategies.planning import client_order

__all__ = ["Reply", "RoundState", "RoundWatch", "Transport", "push_and_pull"]


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
    ``run.log`` every :attr:`every` seconds while the replies come in. The last one waits
    for :meth:`settle`: once the replies are in (or the round timed out) and judged, its
    ``failed`` counts every failed client, silent and rejected ones included, as the
    round's ``clients_failed`` does.
    """

    #: Seconds between two ``round_progress`` events while a round waits (at least 2).
    every: ClassVar[float] = 10.0

    def __init__(self, round_: int, sampled: int, *, run: RunDir, bars: Any = None, label: str = "") -> None:
        self.round, self.sampled, self.run, self.bars = round_, sampled, run, bars
        self.t0 = self.last = time.monotonic()
        self.line = None if bars is None else bars.add_task(f"  round {round_} {label}", total=sampled, info="")
        self.final: dict[str, Any] | None = None

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
        if final:
            self.final = status  # logged by settle(), once the replies are judged
        elif now - self.last >= max(2.0, self.every):
            self.last = now
            self.run.log("round_progress", **status)

    def settle(self, failed: int) -> None:
        """Log the last ``round_progress`` event, with ``failed`` clients: errors, timeouts and rejected replies."""
        if self.final is not None:
            self.run.log("round_progress", **{**self.final, "failed": failed})
            self.final = None


@dataclass
class Reply:
    """A successful reply: the node, its client key, the message (``None`` when the client's
    payload reached the server only inside a secure sum) and its metrics."""

    node: int
    client: str
    msg: Message | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundState:
    """One round between ``configure_train`` and ``aggregate_train``: who was sampled, who got the
    round's messages (``targets``), and what an earlier exchange of the same round (:meth:`Strategy.open_round`)
    already gathered: replies, failures and bytes; ``watch`` shows the round's main exchange until its replies
    are judged (:meth:`RoundWatch.settle`)."""

    round: int
    nodes: list[int]
    t0: float
    targets: list[int] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    failures: list[ClientFailure] = field(default_factory=list)
    down: int = 0
    up: int = 0
    watch: RoundWatch | None = None


class Transport:
    """Mixin of :class:`~strategies.base.Strategy`: finding the nodes and one exchange of messages with them.

    Reads the strategy's ``cfg``, ``opts``, ``run``, ``clients`` and ``client_task``.
    """

    cfg: dict[str, Any]
    opts: dict[str, Any]
    run: RunDir
    clients: dict[int, str]
    _bars: Any
    _round: RoundState | None

    def connect(self, grid: Grid) -> None:
        """Wait for the nodes and learn their partition ids, once per run."""
        if self.clients:
            return
        nodes = self.wait_for_nodes(grid)
        self.discover(grid, nodes)
        self.run.log("nodes", count=len(nodes), clients=sorted(self.clients.values(), key=client_order))

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Block until the expected number of nodes registered (or time out with a clear error)."""
        expected = int(self.cfg["clients"])
        timeout = float(self.opts["wait_timeout"])
        start = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            if time.monotonic() - start > timeout:
                raise FederationError(
                    f"only {len(nodes)} of {expected} nodes registered within {timeout:.0f} s; "
                    "start more SuperNodes or lower clients="
                )
            time.sleep(0.5)
        return nodes

    def discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask every node for its partition id; key clients ``p{id}`` (``n{node}`` without one).

        Waits up to ``wait_timeout`` (the nodes' start-up, e.g. Ray actors importing torch), not
        the round's ``round_timeout``: a short round timeout must not cost nodes their stable keys.
        """
        msgs = [Message(task_content({}), dst_node_id=n, message_type="query.info") for n in nodes]
        self.clients = {n: f"n{n}" for n in nodes}
        for rep in grid.send_and_receive(msgs, timeout=float(self.opts["wait_timeout"])):
            if not rep.has_error():
                pid = int(read_metrics(rep).get("partition-id", -1))
                if pid >= 0:
                    self.clients[rep.metadata.src_node_id] = f"p{pid}"

    def messages(
        self,
        round_: int,
        nodes: list[int],
        message_type: str,
        task: dict[str, Any],
        arrays: dict[str, torch.Tensor] | None,
        inputs: dict[str, torch.Tensor] | None = None,
        *,
        config: dict[str, Any] | None = None,
    ) -> tuple[list[Message], int]:
        """One message of ``message_type`` per node, and the bytes they carry.

        ``arrays`` go as the ``global`` record (the global weights), ``inputs`` as the
        ``inputs`` record (engine inputs); each is serialized once for all nodes. ``config``
        entries go beside the task in the ``config`` record.
        """
        record = tensor_record(arrays) if arrays is not None else None
        extra = tensor_record(inputs) if inputs is not None else None
        msgs, down = [], 0
        for n in nodes:
            content = task_content(self.client_task(task, self.clients[n], round_), record, extra, config=config)
            down += content_bytes(content)
            msgs.append(Message(content, dst_node_id=n, message_type=message_type))
        return msgs, down

    def transmit(self, grid: Grid, round_: int, msgs: list[Message]) -> list[Message]:
        """Push ``msgs`` and pull their replies, a window at a time (``max_in_flight``), with live progress.

        While the replies come in, a line under the round bar (when :meth:`run_rounds` drives)
        and ``round_progress`` events in ``metrics.jsonl`` show clients done, failures so far,
        elapsed seconds and an ETA (see :class:`~strategies.exchange.RoundWatch`); the round's
        last event follows when :meth:`~strategies.base.Strategy.close_round` has judged the replies.
        """
        replies, watch = self._watched(grid, round_, msgs)
        if watch is not None and self._round is not None and self._round.round == round_:
            self._round.watch = watch
        return replies

    def _watched(self, grid: Grid, round_: int, msgs: list[Message]) -> tuple[list[Message], RoundWatch | None]:
        """The replies to ``msgs`` and the :class:`RoundWatch` that showed them coming in (``None``: no message)."""
        if not msgs:
            return [], None
        label = msgs[0].metadata.message_type
        watch = RoundWatch(round_, len(msgs), run=self.run, bars=self._bars, label=label)
        timeout = float(self.opts["round_timeout"])
        replies = push_and_pull(grid, msgs, timeout=timeout, on_poll=watch, window=self.cfg["max_in_flight"])
        return replies, watch

    def collect(self, nodes: list[int], replies: list[Message]) -> tuple[list[Reply], list[ClientFailure], int]:
        """The successful replies (in client order), a failure per error reply and per silent node, the bytes up."""
        got, failures, up, seen = [], [], 0, set()
        for rep in replies:
            node = rep.metadata.src_node_id
            seen.add(node)
            client = self.clients.get(node, f"n{node}")
            if rep.has_error():
                failures.append(ClientFailure(node, client, "error", str(rep.error.reason)))
                continue
            up += content_bytes(rep.content)
            got.append(Reply(node, client, rep, read_metrics(rep)))
        for n in nodes:
            if n not in seen:
                failures.append(ClientFailure(n, self.clients[n], "timeout", "no reply within round_timeout"))
        got.sort(key=lambda r: client_order(r.client))
        return got, failures, up

    def exchange(self, grid: Grid, round_: int, msgs: list[Message]) -> tuple[list[Reply], list[ClientFailure], int]:
        """A whole exchange inside a round (e.g. FedAF's statistics): replies, failures and bytes up."""
        nodes = [m.metadata.dst_node_id for m in msgs]
        replies, watch = self._watched(grid, round_, msgs)
        got, failures, up = self.collect(nodes, replies)
        if watch is not None:
            watch.settle(len(failures))
        return got, failures, up
