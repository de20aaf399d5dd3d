"""Real Flower processes over loopback: docs/deploy.md's walkthrough, run as written, plus nodes it must refuse.

One deployment serves every check (the budget is a couple of minutes). The shell blocks
of the page's loopback section run in one bash session as a reader pastes them (only
``FD`` and ``PORT`` come from the environment, and the run gets a tiny budget, see
``TINY``): the start block (SuperLink with TLS and
SuperNode authentication, three registered SuperNodes with their own data), the run
block (``flwr run``, then ``flwr list`` until ``finished:*``), the refused block (a node
with an unregistered key: Flower's exit code 305) and, in the teardown, the stop block,
after which no process of the walkthrough may be left. Beside the run, the test adds
through :class:`~fedistill.deploy.loopback.Loopback`: a fourth registered node whose
``data-path`` is missing (it answers with an error reply naming the path), a registered
node that trusts another CA (TLS handshake refused) and a node started with
``--insecure`` (disconnected); the run must finish ``finished:completed`` (read from
``flwr list --format json``, not an exit code) with the three good nodes' sets only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from docshell import BashSession, marked_processes, shell_blocks

from fedistill.config import compose_config
from fedistill.data import SyntheticSet
from fedistill.deploy.certs import make_certs
from fedistill.deploy.loopback import Loopback, descendants, free_port, live_processes, run_config_arg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deploy.md"
BLOCKS = ("start", "run", "refused", "stop")
MARK = "FEDISTILL_DEPLOY_E2E"  # in the environment of every process the walkthrough starts
# The one change to the page's commands: the run also gets a tiny budget (10 DM iterations,
# 40 server epochs, no random-real control; the suite runs on 2 cores) and clients=4, so the
# server waits for the node without data as well (a later --run-config key wins).
TINY = {"clients": 4, "method.iterations": 10, "strategy.server.epochs": 40, "strategy.random_baseline": False}
SUBMIT = "--format json | tee $FD/submit.json"


def _have_flower() -> bool:
    bindir = Path(sys.executable).parent
    return all((bindir / c).exists() or shutil.which(c) for c in ("flower-superlink", "flower-supernode", "flwr"))


def _port_block() -> int:
    """A port P with P and the walkthrough's SuperNode ports P+10..P+13 free."""
    for _ in range(50):
        port = free_port()
        try:
            for p in (port, *range(port + 10, port + 14)):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def _stop(sh: BashSession, script: str, marker: str) -> list[int]:
    """Run the page's stop block; the walkthrough's processes (but the shell) still alive 30 s later."""
    sh.run(script, timeout=60)
    deadline = time.monotonic() + 30
    while (left := [p for p in marked_processes(MARK, marker) if p != sh.proc.pid]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def deployed():
    """The walkthrough's federation and run, the extra nodes, the results; always torn down."""
    if not _have_flower():
        pytest.skip("flower-superlink / flower-supernode / flwr not installed")
    blocks = shell_blocks(DOC, "loopback")
    assert set(blocks) == set(BLOCKS), f"docs/deploy.md loopback blocks: {sorted(blocks)}"
    assert blocks["run"].count("flwr run . local") == 1 and blocks["run"].count(SUBMIT) == 1, blocks["run"]
    tiny_run = blocks["run"].replace(SUBMIT, f"--run-config '{run_config_arg(TINY)}' {SUBMIT}")
    work = Path(tempfile.mkdtemp(prefix="fd8-", dir="/tmp"))
    fd, port = work / "fd", _port_block()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "FD": str(fd), "PORT": str(port)}
    env[MARK] = work.name
    sh = BashSession(env, cwd=ROOT)
    extra = Loopback(work / "extra", certs=fd / "certs", node_auth=True, port=port, env={"OMP_NUM_THREADS": "1"})
    refused = None
    try:
        # a second CA and keys of its own (`fedistill deploy certs` in another directory)
        other = make_certs(work / "other", nodes=2)
        rc, out = sh.run(blocks["start"], timeout=240)
        assert rc == 0 and out.count("registered successfully") == 3, out
        # the refused block needs only FD and PORT: it runs beside the rest, in its own shell
        refused = subprocess.Popen(
            ["bash", "-c", blocks["refused"]], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        good = {"data-path": str(fd / "data" / "node-0.npz")}
        insecure = extra.start_supernode("insecure", good, insecure=True, max_retries=1)

        def outsiders() -> subprocess.Popen:  # the server waits for the node without data (clients=4)
            for key in other["node_keys"]:
                extra.register(f"{key}.pub")  # registered: only TLS can keep the wrong-CA node out
            extra.start_supernode("nodata", {"data-path": str(fd / "data" / "gone.npz")}, key=other["node_keys"][0])
            return extra.start_supernode("wrong-ca", good, key=other["node_keys"][1], ca=other["ca"], max_retries=1)

        with ThreadPoolExecutor(1) as pool:  # beside the ServerApp's start-up, not before it
            started = pool.submit(outsiders)
            rc, out = sh.run(tiny_run, timeout=540)  # generous: the 2-core CI machine is shared
            wrong_ca = started.result()
        run_id = int(json.loads((fd / "submit.json").read_text())["run-id"])
        yield {
            "fd": fd,
            "run_dir": fd / "run",
            "run_output": out,
            "status": extra.status(run_id),
            "refused": refused.communicate(timeout=120)[0].decode(errors="replace"),
            "wrong_ca": wrong_ca.wait(timeout=60),
            "insecure": insecure.wait(timeout=60),
            "extra": extra,
            "nodes": {n["node-id"]: n["status"] for n in extra.nodes()},
        }
    finally:
        left = _stop(sh, blocks["stop"], work.name)
        tree = descendants([p.pid for p in extra.procs])
        extra.close()
        if refused is not None and refused.poll() is None:
            refused.kill()
        sh.close()  # kills whatever the stop block left in the shell's process group
        for pid in marked_processes(MARK, work.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
        assert not left, f"the stop command of docs/deploy.md left processes {left}"
        assert not live_processes(extra.groups, tree), "processes outlived the teardown"


def test_walkthrough_run_finishes_completed_with_the_nodes_synthetic_sets(deployed):
    st = deployed["status"]
    assert st["status"] == "finished:completed", st.get("status-details")
    assert "finished:completed" in deployed["run_output"] and "RUN FAILED" not in deployed["run_output"]
    summary = json.loads((deployed["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "done" and summary["node_data"] == "own"
    # the nodes read their own files: the config's Dirichlet split was never used and is not recorded
    assert summary["partition"] == {"scheme": "node-data"} and "alpha" not in summary
    assert summary["synthetic_images"] == 3 * 10 * 10  # three nodes, IPC 10, ten classes
    assert [p["client"] for p in summary["provenance"]] == ["p0", "p1", "p2"]
    assert summary["final_accuracy"] > 50.0  # digits, 300 images: well above chance
    assert (deployed["run_dir"] / "synthetic.safetensors").is_file()
    assert not (deployed["run_dir"] / "partition.json").exists()  # no simulated split in a deployment
    logs = deployed["fd"] / "logs"
    for name in ("superlink", "supernode-0", "supernode-1", "supernode-2"):
        assert (logs / f"{name}.log").stat().st_size > 0, name


def test_node_footprint_is_reported(deployed):
    rounds = [json.loads(x) for x in (deployed["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    (rec,) = [r for r in rounds if r["event"] == "round"]
    ok = {c: m for c, m in rec["client_metrics"].items() if "rows" in m}
    assert sorted(ok) == ["p0", "p1", "p2"]
    for c, m in ok.items():
        assert m["partition-id"] == int(c[1:]) and 0 < m["peak_rss_mb"] < 1024 and m["seconds"] > 0
        assert m["cpu_seconds"] > 0


def test_node_without_data_answers_with_an_error_reply(deployed):
    summary = json.loads((deployed["run_dir"] / "summary.json").read_text())
    assert summary["clients_failed"] == 1
    events = [json.loads(x) for x in (deployed["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    (fail,) = [e for e in events if e["event"] == "client_failed"]
    assert fail["kind"] == "error"
    assert "NodeDataError" in fail["reason"] and "gone.npz does not exist" in fail["reason"]


def test_unregistered_node_is_refused(deployed):
    out = deployed["refused"]
    assert "flower-supernode exited with 1" in out and "Exit Code: 305" in out
    assert "Failed to activate SuperNode" in out  # refused for its key, not for a network error
    assert "Exit Code: 305" in (deployed["fd"] / "logs" / "unregistered.log").read_text()


def test_wrong_ca_and_insecure_nodes_are_refused_and_never_take_part(deployed):
    extra = deployed["extra"]
    assert deployed["wrong_ca"] != 0 and deployed["insecure"] != 0
    wrong_ca = extra.log("wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca and "Exit Code: 305" in wrong_ca
    assert "Exit Code: 305" in extra.log("insecure")
    events = [json.loads(x) for x in (deployed["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    (nodes,) = [e for e in events if e["event"] == "nodes"]
    # the walkthrough's three and the node without data (keyed by node id): nobody else joined
    assert nodes["count"] == 4 and nodes["clients"][:3] == ["p0", "p1", "p2"]
    assert nodes["clients"][3].startswith("n")
    # the wrong-CA node's key is registered, yet that node never came online
    assert list(deployed["nodes"].values()).count("registered") == 1, deployed["nodes"]


def test_the_set_records_the_model_the_run_trained(deployed):
    """``fedistill evaluate RUN/synthetic.safetensors`` (no ``model=``) trains the model the set records."""
    path = deployed["run_dir"] / "synthetic.safetensors"
    syn = SyntheticSet.load(path)
    run_model = yaml.safe_load((deployed["run_dir"] / "config.yaml").read_text())["model"]
    assert syn.metadata["model"] == run_model and run_model["name"] == "convnet"
    cfg = compose_config("evaluate", [f"synthetic_path={path}"])
    assert cfg.get("model") is None  # so run_evaluate takes the recorded one (tests/test_cli.py runs that path)
