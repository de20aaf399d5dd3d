"""A real SuperLink and SuperNodes on this machine over loopback (tests, benchmarks, trying it out).

:class:`Loopback` starts the Flower CLI processes (``flower-superlink``,
``flower-supernode``, ``flwr``) exactly as docs/deploy.md shows them, each in its own
process group, on free loopback ports, with a private ``FLWR_HOME``. It imports no
Flower code; it only runs the installed commands. Use it as a context manager: every
process group it started is terminated on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Loopback", "LoopbackError", "descendants", "free_port", "live_processes", "run_config_arg"]

CONNECTION = "fedistill"
"""Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``."""


class LoopbackError(RuntimeError):
    """A process did not come up, a command failed, or a run did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``--run-config`` text for ``flwr run``: dotted keys quoted, values TOML-encoded."""
    return " ".join(f"{json.dumps(k) if '.' in k else k}={_toml(v)}" for k, v in run_config.items())


class Loopback:
    """One SuperLink and any number of SuperNodes on 127.0.0.1.

    Parameters
    ----------
    workdir
        Logs, ``FLWR_HOME`` and the SuperLink's state go here.
    certs
        Directory written by :func:`fedistill.deploy.certs.make_certs`: TLS on (else ``--insecure``).
    node_auth
        Start the SuperLink with ``--enable-supernode-auth`` (needs ``certs``).
    env
        Extra environment of every process (e.g. ``OMP_NUM_THREADS``).
    port
        The SuperLink's port (default: a free one). Give the port of a SuperLink started
        elsewhere (e.g. by the shell of docs/deploy.md) to add SuperNodes to it and use
        ``flwr`` on it without :meth:`start_superlink`.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        certs: str | Path | None = None,
        node_auth: bool = False,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        if node_auth and certs is None:
            raise ValueError("SuperNode authentication needs TLS: pass certs=")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = Path(certs) if certs is not None else None
        self.node_auth = node_auth
        self.port = port if port is not None else free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self._logs: list[Any] = []
        self.groups: list[int] = []  # every process group started here, also after close()
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            **(env or {}),
        }
        self._write_connection()

    # ----------------------------------------------------------- processes
    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115  (closed in close())
        self._logs.append(log)
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True
        )
        self.procs.append(proc)
        self.groups.append(proc.pid)
        return proc

    def _tls_args(self, *, node: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.certs / "ca.crt")]
        c = self.certs
        files = {"--ssl-ca-certfile": "ca.crt", "--ssl-certfile": "server.pem", "--ssl-keyfile": "server.key"}
        return [x for flag, name in files.items() for x in (flag, str(c / name))]

    def start_superlink(self, *, timeout: float = 60.0) -> subprocess.Popen:
        """Start ``flower-superlink`` and wait until its ``/health`` endpoint answers."""
        cmd = ["flower-superlink", *self._tls_args(node=False), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--disable-runtime-dependency-installation", "--database", str(self.workdir / "state.db")]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        proc = self._spawn("superlink", cmd)
        self.wait_healthy(proc, timeout=timeout)
        return proc

    def wait_healthy(self, proc: subprocess.Popen, *, timeout: float = 60.0) -> None:
        """Poll the SuperLink's ``GET /health`` until it answers 200 (raise if the process died)."""
        scheme = "https" if self.certs is not None else "http"
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.certs is not None else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LoopbackError(f"flower-superlink exited with {proc.returncode}: {self.log('superlink')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LoopbackError(f"SuperLink not healthy after {timeout:.0f} s: {self.log('superlink')[-2000:]}")

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, Any],
        *,
        key: str | Path | None = None,
        max_retries: int | None = None,
        ca: str | Path | None = None,
        insecure: bool = False,
    ) -> subprocess.Popen:
        """Start ``flower-supernode`` with its own runtime port and ``--node-config``.

        ``key`` is the node's private key (``--auth-supernode-private-key``);
        ``max_retries`` bounds reconnection attempts (a refused node then exits).
        ``ca`` replaces the loopback's CA certificate (``--root-certificates``) and
        ``insecure`` connects without TLS whatever the SuperLink serves: both make nodes
        the SuperLink must refuse.
        """
        config = " ".join(f"{k}={_toml(v)}" for k, v in node_config.items())
        if insecure:
            tls = ["--insecure"]
        elif ca is not None:
            tls = ["--root-certificates", str(ca)]
        else:
            tls = self._tls_args(node=True)
        cmd = ["flower-supernode", *tls, "--superlink", self.address]
        cmd += ["--port", str(free_port()), "--node-config", config]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self._spawn(name, cmd)

    def log(self, name: str) -> str:
        """Text of a process's log so far."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def close(self, *, grace: float = 10.0) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after ``grace`` seconds.

        Descendants that left their group (Flower starts the SuperLink's SuperExec in a
        new session) are found through ``/proc`` before the kill and killed as well.
        """
        tree = descendants([p.pid for p in self.procs if p.poll() is None])
        for proc in reversed(self.procs):  # nodes first, then the SuperLink
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        while live_processes(self.groups, tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in live_processes(self.groups, tree):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        self.procs.clear()
        self._logs.clear()

    def __enter__(self) -> Loopback:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------- the flwr CLI
    def _write_connection(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if self.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.certs / "ca.crt"}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, cwd: str | Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS...`` with this loopback's ``FLWR_HOME``; raise with its output on failure."""
        res = subprocess.run(
            ["flwr", *args], env=self.env, cwd=cwd or self.workdir, capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            raise LoopbackError(f"flwr {' '.join(args)} exited with {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def register(self, public_key: str | Path) -> None:
        """``flwr supernode register KEY.pub`` on this SuperLink."""
        self.flwr("supernode", "register", str(public_key), CONNECTION)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (``flwr supernode list --format json``)."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return list(json.loads(res.stdout[res.stdout.index("{") :])["nodes"])

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP_DIR CONNECTION --run-config ...``; returns the run id."""
        res = self.flwr(
            "run",
            str(Path(app_dir).resolve()),
            CONNECTION,
            "--run-config",
            run_config_arg(run_config),
            "--format",
            "json",
        )
        out = json.loads(res.stdout[res.stdout.index("{") :])
        if not out.get("success"):
            raise LoopbackError(f"flwr run failed: {res.stdout}")
        return int(out["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's entry of ``flwr list --run-id ID --format json``."""
        res = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        return dict(runs[0])

    def wait_run(self, run_id: int, *, timeout: float = 300.0, poll: float = 1.0) -> dict[str, Any]:
        """Poll :meth:`status` until the run is ``finished:*``; returns its last entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                return st
            time.sleep(poll)
        raise LoopbackError(f"run {run_id} not finished after {timeout:.0f} s: {self.status(run_id)}")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """``pid -> (ppid, pgid, state)`` of every process, from ``/proc`` (empty where there is none)."""
    table = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(d.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(pids: Sequence[int]) -> set[int]:
    """``pids`` and every process below them (from ``/proc``)."""
    table, found, todo = _proc_table(), set(pids), list(pids)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def live_processes(groups: Sequence[int], pids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Processes still running (not zombies) in ``groups`` or among ``pids``."""
    return sorted(
        pid for pid, (_, pgid, state) in _proc_table().items() if state != "Z" and (pgid in groups or pid in pids)
    )
