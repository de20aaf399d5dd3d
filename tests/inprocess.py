"""Whole strategies without Ray: a Flower Grid stand-in that calls the ClientApp in this process."""

from __future__ import annotations

import time
from typing import Any


class InProcessGrid:
    """A Flower Grid stand-in: routes each message to the ClientApp in this process and records traffic.

    Node ``n`` (1-based) holds partition ``n - 1`` of ``num`` partitions.
    """

    def __init__(self, num: int) -> None:
        from clients.simulation import app

        self.app, self.num = app, num
        self.sent: list[tuple[int, str, set[str]]] = []
        self.replies: list[tuple[int, str, set[str]]] = []
        self._pending: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num + 1))

    def push_messages(self, messages):
        """Run the ClientApp on every message now; its replies wait for :meth:`pull_messages`."""
        from flwr.app import Context, Message, Metadata, RecordDict

        ids = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            md = Metadata(
                run_id=1,
                message_id=f"m{len(self.sent)}",
                src_node_id=0,
                dst_node_id=node,
                reply_to_message_id="",
                group_id="1",
                created_at=time.time(),
                ttl=600,
                message_type=kind,
            )
            self.sent.append((node, kind, set(msg.content.array_records)))
            ctx = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": self.num},
                state=RecordDict(),
                run_config={},
            )
            rep = self.app(Message(metadata=md, content=msg.content), ctx)
            self.replies.append((node, kind, set() if rep.has_error() else set(rep.content.array_records)))
            self._pending[md.message_id] = rep
            ids.append(md.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def make_strategy(name: str, tmp_path: Any, *overrides: str) -> Any:
    """Strategy ``name`` on digits (ConvNet width 16, CPU) with the ``simulate`` config plus ``overrides``."""
    from fedistill.config import compose_config
    from fedistill.data import load_dataset
    from fedistill.reporting import RunDir
    from strategies.app import STRATEGIES

    cfg = compose_config("simulate", [f"strategy={name}", "device=cpu", "model.width=16", *overrides])
    return STRATEGIES.get(name)(cfg, RunDir(tmp_path), load_dataset("digits"))
