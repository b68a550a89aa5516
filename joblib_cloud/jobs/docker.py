"""``image=``: run the agent (and ``joblib-cloud run`` jobs) inside a Docker image on the VM.

Everything else speaks of "the ``python`` command line on the host", so an image is just
another such command line: ``sh -c '... exec docker run ... IMAGE python3 "$@"'``.  The
agent's arguments (``-u -c BOOTSTRAP``) pass through ``"$@"`` untouched, so no quoting of
the bootstrap code changes.  The container shares with the VM:

- ``$JOBLIB_CLOUD_HOME`` (same path inside): the data cache, the shipped agent code and the
  activity file the on-VM kill switch watches;
- the network and IPC namespaces (``--network host``, ``--ipc host``): tasks reach what
  the VM reaches, and tasks' shared memory is not capped by Docker's 64 MB ``/dev/shm``;
- the process id namespace (``--pid host``): an agent's cache directory is named by its
  process id, and an agent removes the directories of agents no longer running, so two
  agents on one VM (two clusters) must see each other's ids as the VM does; in their own
  namespaces both would be the same small number and share, then delete, one cache;
- the user id (``--user``), so files it writes stay the VM user's to clean up.

Not PID 1 of a namespace, the agent gets signals (forwarded by ``docker run``) as on the
VM, so no ``--init`` is needed.  ``--rm`` leaves nothing behind, and ``-i`` without
``-t`` keeps stdin/stdout a clean byte stream for the protocol.
"""

from __future__ import annotations

import re
import shlex

from ..errors import ConfigError
from ..wire.contract import HOME_ENV, HOME_SHELL

#: What a Docker image reference may contain (registry/name:tag@digest).
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
#: What ``jobhost`` sets for a job that must reach the job's Python in the container,
#: besides every ``JOBLIB_CLOUD_*`` variable (the job's backend settings, passed by name).
JOB_ENV = ("PYTHONPATH", "PYTHONUNBUFFERED", "SSH_AUTH_SOCK")
#: ``-e NAME`` for each ``JOBLIB_CLOUD_*`` variable set on the VM (names are single words).
_CLOUD_ENV = """$(env | sed -n 's/^\\(JOBLIB_CLOUD_[A-Za-z0-9_]*\\)=.*/-e \\1/p')"""
#: A job's ``run -n N`` backend logs in to its siblings with the ssh-agent forwarded to the
#: VM: its socket (``$SSH_AUTH_SOCK`` is a link to it) is mounted at the same path.
_AGENT_SOCKET = ('A=; if [ -n "${SSH_AUTH_SOCK:-}" ] && [ -S "$SSH_AUTH_SOCK" ]; then '
                 'A=$(readlink -f "$SSH_AUTH_SOCK"); fi; ')
HOME_EXPR = HOME_SHELL


def check_image(image: str) -> str:
    image = image.strip()
    if not _IMAGE_RE.fullmatch(image):
        raise ConfigError(f"invalid Docker image {image!r}: expected a reference such as "
                         "'python:3.11-slim' or 'ghcr.io/me/model:1.2'")
    return image


def docker_run_args(image: str, python: str = "python3", *, mount_cwd: bool = False,
                    docker: str = "docker") -> list[str]:
    """The ``docker run`` words (shell-quoted, ``$H`` = the host's joblib-cloud home)."""
    words = [docker, "run", "--rm", "-i", "--network", "host", "--ipc", "host",
             "--pid", "host", "--user", '"$(id -u):$(id -g)"', "-v", '"$H:$H"',
             "-e", f'"{HOME_ENV}=$H"', "-e", "HOME=/tmp"]
    if mount_cwd:  # a job: its workspace is the working directory inside too
        words += ["-v", '"$PWD:$PWD"', "-w", '"$PWD"', '${A:+-v "$A:$A"}', _CLOUD_ENV]
        for name in JOB_ENV:  # "-e NAME" passes the VM's value through
            words += ["-e", name]
    words.append(shlex.quote(check_image(image)))
    words.append(python)  # a command line itself, like the python setting
    return words


def docker_python(image: str, python: str | None = None, *, mount_cwd: bool = False,
                  docker: str = "docker") -> str:
    """A ``python`` command line that runs ``python`` inside ``image``.

    ``agent_command(docker_python(...))`` starts the agent in the container; a job's
    ``python`` shim made from it runs the job's Python there.
    """
    run = " ".join(docker_run_args(image, python or "python3", mount_cwd=mount_cwd,
                                   docker=docker))
    agent = _AGENT_SOCKET if mount_cwd else ""
    script = f'H={HOME_EXPR}; {agent}mkdir -p "$H" && exec {run} "$@"'
    return f"sh -c {shlex.quote(script)} joblib-cloud-docker"
