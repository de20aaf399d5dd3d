"""Real Flower processes over loopback: a SuperLink with TLS and SuperNode authentication.

One SuperLink serves every check (the budget is a couple of minutes): three registered
SuperNodes hold their own data (written by ``fedistill deploy node-data``, one format
each), a fourth registered node's ``data-path`` is missing, and a fifth node with an
unregistered key tries to join. One ``oneshot`` DM run with ``flwr run`` must finish
``finished:completed`` (read from ``flwr list --format json``, not an exit code) with
the three nodes' synthetic sets; the missing-data node answers with an error reply
naming the path; the unregistered node is refused with Flower's exit code 305.
Every process runs in its own process group and is killed in the fixture's teardown.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from fedistill.config import compose_config
from fedistill.deploy.certs import make_certs
from fedistill.deploy.loopback import Loopback, descendants, live_processes
from fedistill.deploy.nodedata import write_partitions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("npz", "idx", "safetensors")


def _have_flower() -> bool:
    bindir = Path(sys.executable).parent
    return all((bindir / c).exists() or shutil.which(c) for c in ("flower-superlink", "flower-supernode", "flwr"))


@pytest.fixture(scope="module")
def deployed():
    """The federation, its one run and the run's results; torn down even when a test fails."""
    if not _have_flower():
        pytest.skip("flower-superlink / flower-supernode / flwr not installed")
    work = Path(tempfile.mkdtemp(prefix="fd8-", dir="/tmp"))
    certs = make_certs(work / "certs", nodes=5)
    cfg = compose_config("simulate", ["clients=3", "partition=iid", "seed=0"])
    paths = [write_partitions(work / "data", cfg, fmt=f, nodes=[i])[0] for i, f in enumerate(FORMATS)]
    lb = Loopback(work / "fed", certs=work / "certs", node_auth=True, env={"OMP_NUM_THREADS": "1"})
    try:
        lb.start_superlink()
        for key in certs["node_keys"][:4]:
            lb.register(f"{key}.pub")
        for i, path in enumerate(paths):
            lb.start_supernode(f"node{i}", {"data-path": str(path), "threads": 1}, key=certs["node_keys"][i])
        lb.start_supernode("nodata", {"data-path": str(work / "data" / "gone.npz")}, key=certs["node_keys"][3])
        intruder = lb.start_supernode(
            "intruder", {"data-path": str(paths[0])}, key=certs["node_keys"][4], max_retries=1
        )
        run_dir = work / "run"
        run_id = lb.submit(
            ROOT,
            {
                "clients": 4,
                "method.iterations": 10,
                "strategy.server.epochs": 40,
                "strategy.random_baseline": False,
                "device": "cpu",
                "run-dir": str(run_dir),
            },
        )
        status = lb.wait_run(run_id, timeout=480)  # generous: the 2-core CI machine is shared
        intruder_rc = intruder.wait(timeout=60)
        yield {"lb": lb, "status": status, "run_dir": run_dir, "intruder_rc": intruder_rc, "work": work}
    finally:
        tree = descendants([p.pid for p in lb.procs])
        lb.close()
        shutil.rmtree(work, ignore_errors=True)
        assert not live_processes(lb.groups, tree), "processes outlived the teardown"


def test_run_finishes_completed_with_the_nodes_synthetic_sets(deployed):
    st = deployed["status"]
    assert st["status"] == "finished:completed", st.get("status-details")
    summary = json.loads((deployed["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "done" and summary["node_data"] == "own"
    assert summary["synthetic_images"] == 3 * 10 * 10  # three nodes, IPC 10, ten classes
    assert len(summary["provenance"]) == 3
    assert summary["final_accuracy"] > 50.0  # digits, 300 images: well above chance
    assert (deployed["run_dir"] / "synthetic.safetensors").is_file()
    assert not (deployed["run_dir"] / "partition.json").exists()  # no simulated split in a deployment


def test_node_footprint_is_reported(deployed):
    rounds = [json.loads(x) for x in (deployed["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    (rec,) = [r for r in rounds if r["event"] == "round"]
    ok = [m for m in rec["client_metrics"].values() if "rows" in m]
    assert len(ok) == 3
    for m in ok:
        assert m["partition-id"] == -1 and 0 < m["peak_rss_mb"] < 1024 and m["seconds"] > 0
        assert m["cpu_seconds"] > 0


def test_node_without_data_answers_with_an_error_reply(deployed):
    summary = json.loads((deployed["run_dir"] / "summary.json").read_text())
    assert summary["clients_failed"] == 1
    events = [json.loads(x) for x in (deployed["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    (fail,) = [e for e in events if e["event"] == "client_failed"]
    assert fail["kind"] == "error"
    assert "NodeDataError" in fail["reason"] and "gone.npz does not exist" in fail["reason"]


def test_unregistered_node_is_refused(deployed):
    assert deployed["intruder_rc"] != 0
    assert "Exit Code: 305" in deployed["lb"].log("intruder")
