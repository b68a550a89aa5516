"""Where job-helper commands run: a local subprocess, or an exec channel of a verified
SSH connection (``ssh`` and ``aws``): one interface, :class:`Target`, for every provider.

The helper is shipped on every call as source, like the agent's bootstrap: a small
program loads ``wire/archive.py`` (safe unpacking), ``host/jobfiles.py`` (workspace
files), ``host/jobstore.py`` (S3 on aws) and ``host/jobhost.py`` (process control) as
modules and runs the operation, so nothing needs installing on the host.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko

from ..client.ssh import MAX_PACKET_SIZE, WINDOW_SIZE, SSHConnection
from ..host import jobfiles, jobhost, jobstore
from ..wire import archive

Sink = Callable[[bytes], None]

_BOOT = """\
import sys, types
def _load(name, source):
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, name + ".py", "exec"), module.__dict__)
    return module
_load("archive", {archive!r})
_load("jobfiles", {files!r})
_load("jobstore", {store!r})
_load("jobhost", {host!r}).main(sys.argv[1:])
"""


def _helper_source() -> str:
    return _BOOT.format(archive=Path(archive.__file__).read_text(),
                        files=Path(jobfiles.__file__).read_text(),
                        store=Path(jobstore.__file__).read_text(),
                        host=Path(jobhost.__file__).read_text())


def helper_command(python: str, args: list[str]) -> str:
    """Shell command running the host helper with ``python`` (itself a command line)."""
    return f"exec {python} -c {shlex.quote(_helper_source())} {shlex.join(args)}"


@dataclasses.dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes


class Target:
    """A machine that runs host-helper commands: the same interface for every provider."""

    name: str
    python: str
    #: The verified SSH connection (None for the local provider): ports forward over it.
    connection: SSHConnection | None = None

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None, forward_agent: bool = False) -> Result:
        """Run the helper; stream its output to ``out``/``err`` or collect it.  With
        ``forward_agent``, the helper (and what it starts) sees this computer's ssh-agent
        for as long as the call lasts."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _pump(read: Callable[[int], bytes], sink: Sink | None, keep: list[bytes]) -> None:
    while True:
        try:
            data = read(1 << 16)
        except (OSError, EOFError):
            return
        if not data:
            return
        if sink is None:
            keep.append(data)
        else:
            sink(data)


def _collect(readers: list[tuple[Callable[[int], bytes], Sink | None]],
             send: Callable[[], None]) -> tuple[bytes, bytes]:
    kept: list[list[bytes]] = [[], []]
    threads = [threading.Thread(target=_pump, args=(read, sink, kept[i]), daemon=True)
               for i, (read, sink) in enumerate(readers)]
    for thread in threads:
        thread.start()
    send()
    for thread in threads:
        while thread.is_alive():  # join() with a timeout keeps Ctrl-C responsive
            thread.join(0.2)
    return b"".join(kept[0]), b"".join(kept[1])


class LocalTarget(Target):
    """A host that is this machine (no SSH): jobs run in a copy under its home_dir()."""

    def __init__(self, python: str, name: str) -> None:
        self.name = name
        self.python = python

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None, forward_agent: bool = False) -> Result:
        proc = subprocess.Popen(["/bin/sh", "-c", helper_command(self.python, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
        assert proc.stdin and proc.stdout and proc.stderr  # all three are pipes
        pipe_in = proc.stdin

        def send() -> None:
            try:
                pipe_in.write(stdin)
            except BrokenPipeError:
                pass
            pipe_in.close()

        try:
            stdout, stderr = _collect([(proc.stdout.read, out), (proc.stderr.read, err)],
                                      send)
            return Result(proc.wait(), stdout, stderr)
        finally:
            if proc.poll() is None:  # interrupted: the helper, not the job, stops
                proc.kill()
                proc.wait()


class SSHTarget(Target):
    """An ``ssh`` or ``aws`` host: one verified SSH connection, a channel per call."""

    connection: SSHConnection

    def __init__(self, connection: SSHConnection, python: str) -> None:
        self.connection = connection
        self.name = connection.spec.name
        self.python = python

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None, forward_agent: bool = False) -> Result:
        command = helper_command(self.python, args)
        if forward_agent:
            channel = self.connection.transport.open_session(
                window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
            # The agent's key stays here: the host only asks this computer to sign.
            handler = paramiko.agent.AgentRequestHandler(channel)
            channel.exec_command(command)
        else:
            channel, handler = self.connection.exec(command), None

        def send() -> None:
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()

        try:
            stdout, stderr = _collect([(channel.recv, out), (channel.recv_stderr, err)],
                                      send)
            return Result(channel.recv_exit_status(), stdout, stderr)
        finally:
            channel.close()
            if handler is not None:
                handler.close()

    def close(self) -> None:
        self.connection.close()
