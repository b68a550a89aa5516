"""Byte streams to host agents that need no SSH, and the agent code every stream starts.

The agent code itself is shipped on every start (a ~100 kB zip of this package through
the stream), so the host always runs the client's exact version.  Nothing here imports
paramiko: the ``local`` provider also runs on hosts (inside ``joblib-cloud run`` jobs),
which have only the standard library, joblib and cloudpickle.
"""

from __future__ import annotations

import functools
import io
import os
import shlex
import signal
import subprocess
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..wire import contract

# Reads the agent zip from fd 0 (length-prefixed), stores it by hash, imports it.  Raw
# os.read (not sys.stdin) so no byte of the protocol that follows is swallowed by a buffer.
BOOTSTRAP = r"""
import os, sys, hashlib
umask = os.umask(0o077)
def rd(n):
    b = b''
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit('joblib-cloud agent: stdin closed during start')
        b += c
    return b
z = rd(int.from_bytes(rd(@LENGTH_PREFIX@), 'big'))
h = os.environ.get('@HOME_ENV@') or os.path.expanduser('@HOME_DEFAULT@')
d = os.path.join(h, 'agent')
os.makedirs(d, mode=0o700, exist_ok=True)
p = os.path.join(d, hashlib.sha256(z).hexdigest()[:16] + '.zip')
if not os.path.exists(p):
    t = p + '.%d' % os.getpid()
    with open(t, 'wb') as f:
        f.write(z)
    os.replace(t, p)
os.umask(umask)
sys.path.insert(0, p)
from @AGENT_MODULE@ import main
main()
""".strip()
for _name in ("LENGTH_PREFIX", "HOME_ENV", "HOME_DEFAULT", "AGENT_MODULE"):
    BOOTSTRAP = BOOTSTRAP.replace(f"@{_name}@", str(getattr(contract, _name)))


@functools.lru_cache(maxsize=1)
def agent_zip() -> bytes:
    """This package's source as a zip: what the host imports the agent from."""
    root = Path(__file__).resolve().parent.parent  # the joblib_cloud package
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*.py")):
            info = zipfile.ZipInfo(f"joblib_cloud/{path.relative_to(root).as_posix()}",
                                   date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return out.getvalue()


def agent_preamble() -> bytes:
    blob = agent_zip()
    return contract.length_prefix(blob) + blob


#: The first line of an SSH agent's stderr: the process (and group: sshd starts each
#: command in a session of its own) to kill if its start hangs.
PID_LINE = b"joblib-cloud-agent-pid "


def agent_command(python: str, announce_pid: bool = False) -> str:
    """Shell command that starts the agent (``python`` may itself be a command line);
    with ``announce_pid``, its stderr starts with ``PID_LINE`` and the pid."""
    command = f"exec {python} -u -c {shlex.quote(BOOTSTRAP)}"
    if not announce_pid:
        return command
    # in sh, whatever the login shell is: ``$$`` and ``>&2`` are not everybody's syntax
    return f"exec sh -c {shlex.quote(f'echo {PID_LINE.decode()}$$ >&2; {command}')}"


class AgentStream:
    """A bidirectional byte stream to one agent, plus its stderr."""

    name: str
    #: Set when the agent's stderr has ended: its last words are all in.  Its stdout may
    #: end first (two pipes, read by two threads), so a reason is read after this.
    stderr_ended: threading.Event

    def _pump_stderr(self, read: Callable[[int], bytes], sink: Callable[[bytes], None]) -> None:
        """Hand the agent's stderr to ``sink`` from a thread of its own, until it ends."""
        self.stderr_ended = threading.Event()
        threading.Thread(target=pump_stderr, args=(read, sink, self.stderr_ended),
                         daemon=True, name=f"stderr-{self.name}").start()

    def sendall(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def recv(self, n: int) -> bytes:
        raise NotImplementedError

    def can_write_now(self, nbytes: int) -> bool:
        """Whether ``nbytes`` can be written without waiting for the other side to read
        (a stalled host must never block a thread that is not its own sender)."""
        return True

    def has_unread(self) -> bool:
        """Whether bytes from the host wait here, not read yet (then it is not silent)."""
        return False

    def deliver(self, on_data: Callable[[bytes], None], on_close: Callable[[], None]) -> bool:
        """From now on, hand what arrives to ``on_data`` (and the end to ``on_close``) from
        the stream's own thread.  False: this stream has no such thread; read it."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Close, and end the agent's processes even if they ignore the end of input (a
        start that hangs)."""
        self.close()


class LocalAgent(AgentStream):
    """The ``local`` provider's host: an agent subprocess, talking over pipes."""

    def __init__(self, name: str, python: str, on_stderr: Callable[[bytes], None],
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", agent_command(python)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            env={**os.environ, **(env or {})}, start_new_session=True)
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr  # all pipes
        self._pipes = (self.proc.stdin, self.proc.stdout)
        self._stdin_fd = self.proc.stdin.fileno()
        self._stdout_fd = self.proc.stdout.fileno()
        self._pump_stderr(self.proc.stderr.read, on_stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._stdin_fd, view):]

    def recv(self, n: int) -> bytes:
        return os.read(self._stdout_fd, n)

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # not even EOF stops it: its whole session goes
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (OSError, AttributeError):  # gone, or no process groups (Windows)
                self.proc.kill()
            self.proc.wait()


def pump_stderr(read: Callable[[int], bytes], sink: Callable[[bytes], None],
                ended: threading.Event) -> None:
    try:
        while True:
            try:
                data = read(1 << 16)
            except (TimeoutError, OSError, ValueError, EOFError):
                return
            if not data:
                return
            sink(data)
    finally:
        ended.set()
