"""``strategy=dp_stats strategy.secure_aggregation=true`` through Flower's simulation engine on Ray.

The run happens in this process (the ServerApp's thread; clients in Ray actors), so the
test can watch what the server-side code is handed: every reply the SecAgg+ workflow
pulls from the grid and what it gives the strategy after unmasking. Each client's own
release is recomputed here from its task (its noise is seeded), and no server-side array
may equal one of them, while the recovered sum must equal theirs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedistill.config import compose_config
from fedistill.federated.client import release_task
from fedistill.federated.node import node_split

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_server_learns_only_the_exact_sum_and_survives_a_dropout(tmp_path, monkeypatch):
    import strategies.dp_stats as dp_stats
    import strategies.secagg as secagg
    from strategies.simulation import run_simulate

    seen: dict = {"pulled": [], "handed": None, "tasks": None, "clients": None, "scale": None}
    original_send = secagg._CountingGrid.send_and_receive

    def spy_send(self, messages, *, timeout=None):
        replies = original_send(self, messages, timeout=timeout)
        for r in replies:
            if not r.has_error():
                seen["pulled"] += [a.numpy() for rec in r.content.array_records.values() for a in rec.values()]
        return replies

    original_aggregate = secagg._SumStrategy.aggregate_fit

    def spy_aggregate(self, rnd, results, failures):
        seen["handed"] = [[a.copy() for a in secagg.parameters_to_ndarrays(res.parameters)] for _, res in results]
        seen["tasks"] = self.tasks
        return original_aggregate(self, rnd, results, failures)

    original_open = dp_stats.DPStats.open_round

    def spy_open(self, grid, state):
        out = original_open(self, grid, state)
        seen["clients"], seen["total"] = dict(self.clients), self.secure_total.clone()
        return out

    monkeypatch.setattr(secagg._CountingGrid, "send_and_receive", spy_send)
    monkeypatch.setattr(secagg._SumStrategy, "aggregate_fit", spy_aggregate)
    monkeypatch.setattr(dp_stats.DPStats, "open_round", spy_open)
    cfg = compose_config(
        "simulate",
        [
            "strategy=dp_stats",
            "strategy.secure_threshold=0.75",
            "clients=4",
            "device=cpu",
            "method.epsilon=2",
            "method.iterations=60",
            "method.releases=6",
            "strategy.server.epochs=30",
            "strategy.random_baseline=false",
            "+faults.3=crash",  # p3 fails inside SecAgg+'s stage 2, after the key exchange: a dropout
        ],
    )
    assert cfg["strategy"]["secure_aggregation"] is True  # the default
    summary = run_simulate(cfg, tmp_path / "run")
    assert summary["status"] == "done" and summary["clients_failed"] == 1

    clients = seen["clients"]
    survivors = {n: t for n, t in seen["tasks"].items() if clients[n] != "p3"}
    assert sorted(clients[n] for n in survivors) == ["p0", "p1", "p2"]
    own = {}
    for n, task in survivors.items():
        pid = int(clients[n][1:])
        split = node_split({"partition-id": pid, "num-partitions": 4}, task["data"])
        sums = release_task(split, task)[0]["sums"].double()
        own[n] = (sums / task["secure_scale"]).numpy()
        assert task["noise_share"] == pytest.approx(1 / np.sqrt(3))  # t = ceil(0.75 x 4) = 3 survivors needed

    # the server-side code never held a client's own vector: not in any pulled reply, not in what
    # the strategy was handed (three copies of the unmasked aggregate)
    for arr in seen["pulled"] + [a for arrays in seen["handed"] for a in arrays]:
        flat = np.asarray(arr, dtype=np.float64).ravel()
        for vec in own.values():
            if flat.size == vec.size:
                assert not np.allclose(flat, vec.ravel(), atol=1e-3)
    assert len(seen["handed"]) == 3 and all(np.array_equal(h[0], seen["handed"][0][0]) for h in seen["handed"])

    # ... and the sum it recovered is exact up to SecAgg+'s quantization step (per client, unbiased)
    expected = sum(own.values())
    step = 2 * secagg.CLIPPING_RANGE / secagg.quantization_steps(4)
    scale = next(iter(survivors.values()))["secure_scale"]
    recovered = seen["total"].numpy() / scale
    assert np.abs(recovered - expected).max() <= 3 * step
    assert not np.allclose(recovered, own[next(iter(own))], atol=1e-3)

    # the dropout is a logged failure; every survivor's epsilon is accounted, within its budget
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (rec,) = [e for e in events if e["event"] == "round"]
    assert [(f["client"], f["kind"]) for f in rec["failures"]] == [("p3", "dropped")]
    eps = summary["privacy"]["clients"]
    assert sorted(eps) == ["p0", "p1", "p2"] and max(eps.values()) <= 2.0 * 1.01
    assert summary["final_accuracy"] > 30  # chance is 10
