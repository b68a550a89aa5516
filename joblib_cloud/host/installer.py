"""Installs into the host's own Python environment, run from the agent's event loop.

An install takes seconds to minutes, and the agent has one thread: the installer is a
subprocess whose output pipe the event loop watches like any other, so heartbeats and
other batches go on meanwhile.  Requests run one at a time (two installers writing into one
environment at once can break it), in the order they came, and after the boot's own
background install (``background.py``) has ended.

The installer is uv when there is one (the aws boot puts it at :data:`MANAGED_UV`; else
``uv`` on PATH), else pip of the agent's interpreter.  Both read their usual environment
variables and configuration files (``PIP_INDEX_URL``, ``UV_FIND_LINKS``, ``pip.conf``...).
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from ..wire.protocol import InstalledMeta, InstallMeta
from . import background

#: Where the aws boot script installs uv (providers/aws/userdata.py: ``{ROOT}/bin``).
MANAGED_UV = "/opt/joblib-cloud/bin/uv"
#: An installer still running after this long is stopped and its request fails.
INSTALL_TIMEOUT = 900.0
#: How much of the installer's output is kept for the answer.
OUTPUT_TAIL = 4000

Answer = Callable[[InstalledMeta], None]


def find_uv() -> str | None:
    if os.access(MANAGED_UV, os.X_OK):
        return MANAGED_UV
    return shutil.which("uv")


def installer_command(args: list[str], python: str = sys.executable,
                      uv: str | None = None) -> list[str]:
    """The command that installs ``args`` (requirements, ``-r file``) into ``python``'s
    environment: the agent's own, which its workers share."""
    if uv:
        return [uv, "pip", "install", "--python", python, *args]
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            *args]


class _Running:
    """One installer process and what it printed so far."""

    def __init__(self, request: InstallMeta, command: list[str],
                 proc: subprocess.Popen[bytes], cleanup: list[str]) -> None:
        assert proc.stdout is not None  # a pipe
        self.request = request
        self.command = command
        self.proc = proc
        self.stdout = proc.stdout
        self.fd = proc.stdout.fileno()
        self.output = bytearray()
        self.deadline = time.monotonic() + INSTALL_TIMEOUT
        self.cleanup = cleanup

    def keep(self, data: bytes) -> None:
        self.output += data
        del self.output[:-OUTPUT_TAIL]


class Installer:
    """Install requests, one at a time, answered through ``answer``.

    Not thread-safe: the agent's event loop (``selector``) is its only caller."""

    def __init__(self, selector: selectors.BaseSelector, answer: Answer) -> None:
        self.selector = selector
        self.answer = answer
        self.queue: collections.deque[InstallMeta] = collections.deque()
        self.running: _Running | None = None

    def request(self, meta: InstallMeta) -> None:
        self.queue.append(meta)
        self._start_next()

    def _start_next(self) -> None:
        if self.queue and self._boot_installing():
            return  # one installer per environment: the heartbeat looks again
        while self.running is None and self.queue:
            meta = self.queue.popleft()
            try:
                self.running = self._spawn(meta)
            except OSError as exc:
                self._answer(meta, "", False, f"the installer could not start: {exc}")
                continue
            self.selector.register(self.running.fd, selectors.EVENT_READ, self._on_output)

    def _spawn(self, meta: InstallMeta) -> _Running:
        args = list(meta["requirements"])
        cleanup: list[str] = []
        if meta.get("requirements_file"):
            fd, path = tempfile.mkstemp(prefix="joblib-cloud-requirements-", suffix=".txt")
            with os.fdopen(fd, "w") as fh:
                fh.write(meta["requirements_file"] or "")
            args += ["-r", path]
            cleanup.append(path)
        command = installer_command(args, uv=find_uv())
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError:
            _remove(cleanup)
            raise
        return _Running(meta, command, proc, cleanup)

    def _on_output(self, fd: int) -> None:
        run = self.running
        if run is None:  # unregistered before its end was read
            return
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if data:
            run.keep(data)
            return
        try:  # its output ended: it is exiting
            returncode = run.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill(run.proc)
            returncode = run.proc.wait()
        self._finish(returncode == 0, f"exit code {returncode}" if returncode else "")

    @staticmethod
    def _boot_installing() -> bool:
        install = background.current()
        return install is not None and install.running

    def check_deadline(self) -> None:
        """Called on the agent's heartbeat: stop an installer that hangs; start requests
        held while the boot's own install ran."""
        if self.running is None:
            self._start_next()
        run = self.running
        if run is not None and time.monotonic() > run.deadline:
            _kill(run.proc)
            run.proc.wait()
            self._finish(False, f"stopped after {INSTALL_TIMEOUT:.0f}s")

    def _finish(self, ok: bool, why: str) -> None:
        run, self.running = self.running, None
        if run is None:
            return
        self.selector.unregister(run.fd)
        run.stdout.close()
        _remove(run.cleanup)
        text = run.output.decode(errors="replace")
        if why:
            text += f"\n[{why}]"
        self._answer(run.request, " ".join(run.command), ok, text)
        self._start_next()

    def _answer(self, meta: InstallMeta, command: str, ok: bool, output: str) -> None:
        answer: InstalledMeta = {"id": meta["id"], "ok": ok, "command": command,
                                 "output": output[-OUTPUT_TAIL:]}
        self.answer(answer)

    def close(self) -> None:
        """The agent is leaving: so does a running installer."""
        self.queue.clear()
        if self.running is not None:
            _kill(self.running.proc)
            self.running.proc.wait()
            _remove(self.running.cleanup)
            self.running = None


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
