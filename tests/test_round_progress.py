"""Round progress while a round's replies come in: push/pull like Flower's send_and_receive, ETA, events."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

import strategies.exchange as exchange
from strategies.exchange import RoundWatch, push_and_pull


def _reply(to: str, *, error: bool = False) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to), has_error=lambda: error)


class FakeGrid:
    """Pushes get ids m0, m1, ... (``None`` for unpushable ones); each pull hands out the next batch."""

    def __init__(self, batches: list[list[SimpleNamespace]], unpushable: int = 0) -> None:
        self.batches, self.unpushable, self.pulled = list(batches), unpushable, []

    def push_messages(self, msgs):
        ids = [f"m{i}" for i in range(len(msgs) - self.unpushable)]
        return ids + [None] * self.unpushable

    def pull_messages(self, ids):
        self.pulled.append(set(ids))
        return self.batches.pop(0) if self.batches else []


class Log:
    def __init__(self) -> None:
        self.events = []

    def log(self, event, **fields):
        self.events.append((event, fields))


@pytest.fixture(autouse=True)
def fast_pulls(monkeypatch):
    monkeypatch.setattr(exchange, "_PULL_INTERVAL", 0.01)


def test_push_and_pull_waits_for_every_reply_in_arrival_order():
    grid = FakeGrid([[], [_reply("m2")], [_reply("m0", error=True), _reply("m1")]])
    polls = []
    out = push_and_pull(grid, [1, 2, 3], timeout=5, on_poll=lambda r, final: polls.append((len(r), final)))
    assert [m.metadata.reply_to_message_id for m in out] == ["m2", "m0", "m1"]
    assert grid.pulled == [{"m0", "m1", "m2"}, {"m0", "m1", "m2"}, {"m0", "m1"}]  # only what is still pending
    assert polls == [(0, False), (1, False), (3, True)]


def test_push_and_pull_stops_at_the_timeout_and_skips_unpushable_messages():
    grid = FakeGrid([[_reply("m0")]], unpushable=1)
    t0 = time.time()
    out = push_and_pull(grid, [1, 2, 3], timeout=0.2, on_poll=lambda r, final: None)
    assert 0.2 <= time.time() - t0 < 2 and len(out) == 1
    assert all(None not in ids for ids in grid.pulled) and grid.pulled[-1] == {"m1"}
    assert push_and_pull(FakeGrid([[_reply("m0")]], unpushable=1), [1, 2], timeout=5, on_poll=lambda r, f: None)


def test_round_watch_eta_and_event_cadence():
    run = Log()
    watch = RoundWatch(3, 4, run=run)
    assert watch.status([], watch.t0 + 5)["eta_seconds"] is None
    replies = [_reply("m0", error=True), _reply("m1")]
    status = watch.status(replies, watch.t0 + 10)
    assert status == {"round": 3, "done": 2, "sampled": 4, "failed": 1, "elapsed": 10, "eta_seconds": 10.0}
    watch(replies, False)  # just started: no event yet
    assert run.events == []
    watch.t0 = watch.last = time.monotonic() - RoundWatch.every  # an interval later: one event
    watch(replies, False)
    watch(replies, False)  # not again right away
    assert [e for e, _ in run.events] == ["round_progress"]
    watch([*replies, _reply("m2"), _reply("m3")], True)  # complete: logged once the replies are judged
    assert len(run.events) == 1
    watch.settle(2)  # the error reply and a reply the server rejected
    watch.settle(3)  # once only
    last = run.events[-1][1]
    assert len(run.events) == 2
    assert (last["done"], last["sampled"], last["failed"], last["eta_seconds"]) == (4, 4, 2, 0.0)


def test_round_watch_shows_a_live_line_and_removes_it():
    from fedistill.reporting import progress_bars

    with progress_bars() as bars:
        watch = RoundWatch(1, 2, run=Log(), bars=bars, label="train.distill")
        watch([_reply("m0")], False)
        task = bars.tasks[0]
        assert task.completed == 1 and task.total == 2 and "failed 0" in task.fields["info"]
        watch([_reply("m0"), _reply("m1")], True)
        assert bars.tasks == []


class EchoGrid:
    """Unique ids per push; every pull answers up to ``per_pull`` of the oldest pending messages."""

    def __init__(self, per_pull: int = 2) -> None:
        self.per_pull, self.next, self.pending, self.max_in_flight, self.order = per_pull, 0, [], 0, []

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            ids.append(f"m{self.next}")
            self.order.append(m)
            self.next += 1
        self.pending += ids
        self.max_in_flight = max(self.max_in_flight, len(self.pending))
        return ids

    def pull_messages(self, ids):
        done, self.pending = self.pending[: self.per_pull], self.pending[self.per_pull :]
        return [_reply(mid) for mid in done]


def test_a_window_keeps_few_messages_in_flight_and_still_answers_every_one():
    grid = EchoGrid()
    out = push_and_pull(grid, list(range(25)), timeout=5, on_poll=lambda r, f: None, window=4)
    assert grid.max_in_flight == 4 and grid.order == list(range(25))  # pushed in order, never more than 4 waiting
    assert sorted(int(m.metadata.reply_to_message_id[1:]) for m in out) == list(range(25))
    unbounded = EchoGrid()
    assert len(push_and_pull(unbounded, list(range(25)), timeout=5, on_poll=lambda r, f: None)) == 25
    assert unbounded.max_in_flight == 25


@pytest.fixture
def flower_loggers():
    """Flower's and alembic's loggers restored after the test (levels and filters)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("flwr", "alembic")]
    saved = [(log.level, list(log.filters)) for log in loggers]
    yield loggers
    for log, (level, filters) in zip(loggers, saved, strict=True):
        log.setLevel(level)
        log.filters[:] = filters


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_info_logs_are_off_unless_verbose(flower_loggers, verbose):
    """``verbose=false`` keeps Flower's errors only, even after ``run_simulation`` lowers its level;
    ``verbose=true`` brings Flower's and alembic's INFO lines back."""
    import logging

    from strategies.simulation import quiet_logs

    flwr, alembic = flower_loggers
    quiet = quiet_logs(verbose=verbose)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    flwr.addHandler(handler)
    try:
        flwr.setLevel(logging.DEBUG if verbose else logging.INFO)  # what run_simulation does to it
        flwr.info("Starting Flower ServerApp")
        flwr.error("ServerApp thread raised an exception")
    finally:
        flwr.removeHandler(handler)
        flwr.removeFilter(quiet)
    assert [r.levelname for r in seen] == (["INFO", "ERROR"] if verbose else ["ERROR"])
    assert alembic.isEnabledFor(logging.INFO) == verbose and alembic.isEnabledFor(logging.WARNING)


def test_the_simulation_window_follows_the_actor_pool():
    from fedistill.config import compose_config
    from strategies.simulation import with_window

    def window(*overrides: str) -> int:
        return with_window(compose_config("simulate", list(overrides)))["max_in_flight"]

    assert window("ray.num_cpus=4") == 16 and window("ray.num_cpus=4", "client.num_cpus=2") == 8
    assert window("max_in_flight=3") == 3
