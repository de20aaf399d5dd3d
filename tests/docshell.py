"""Run the shell blocks of a docs page the way a reader pastes them: one bash session, block after block.

A page marks each block a test runs with an HTML comment on the line before its fence
(``<!-- loopback: start -->`` then a ```` ```bash ```` block); :func:`shell_blocks`
returns them by name. :class:`BashSession` keeps one ``bash`` process, so variables and
exports of one block are seen by the next, as in a terminal.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["BashSession", "marked_processes", "shell_blocks"]


def shell_blocks(page: str | Path, tag: str) -> dict[str, str]:
    """``{name: script}`` of every bash block of ``page`` preceded by ``<!-- TAG: NAME -->``."""
    text = Path(page).read_text()
    pattern = rf"<!-- {re.escape(tag)}: (\S+) -->\n```bash\n(.*?)```"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, text, flags=re.S)}


class BashSession:
    """One non-interactive ``bash`` in its own session; :meth:`run` sources a script in it.

    Parameters
    ----------
    env, cwd
        The shell's environment and working directory.
    """

    def __init__(self, env: Mapping[str, str], cwd: str | Path) -> None:
        self.proc = subprocess.Popen(
            ["bash"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._dir = Path(tempfile.mkdtemp(prefix="docshell-"))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, script: str, *, timeout: float) -> tuple[int, str]:
        """Source ``script`` (stdin from /dev/null); returns its last exit status and its output.

        Raises ``TimeoutError`` (with the output so far) when it has not finished in ``timeout`` s.
        """
        path = self._dir / f"block-{uuid.uuid4().hex}.sh"
        path.write_text(script)
        mark = f"__docshell_{uuid.uuid4().hex}__"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'source {path} < /dev/null; echo "{mark} $?"\n')
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"block not finished after {timeout:.0f} s:\n{''.join(out)[-4000:]}") from None
            if line is None:
                raise RuntimeError(f"bash exited with {self.proc.wait()}:\n{''.join(out)[-4000:]}")
            if line.startswith(mark):
                return int(line.split()[1]), "".join(out)
            out.append(line)

    def close(self) -> None:
        """End the shell (what it started in the background is left to the page's stop command)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for f in self._dir.iterdir():
            f.unlink()
        self._dir.rmdir()


def marked_processes(name: str, value: str) -> list[int]:
    """Live processes (not zombies) whose environment has ``NAME=VALUE`` (ours only: others are unreadable)."""
    needle = f"{name}={value}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if needle in env and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(d.name))
    return found
