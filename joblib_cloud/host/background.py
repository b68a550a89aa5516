"""What the boot is still installing after the agent may start, and waiting for it.

The aws boot installs joblib and cloudpickle (all the agent needs), lets the client in,
then installs the heavy packages (numpy, scipy, scikit-learn, ``packages=``...) in the
background, describing them in the state directory's :data:`~..wire.contract.INSTALLING_FILE`
(``flock``-ed by the installer while it runs; ``installed``, then removed, when it
succeeded).  A task that
fails to import a module that install provides waits for it inside its worker and runs
again; tasks that need nothing from it run at once.  Doing it on the host keeps the
client's ``sync_packages`` path out of it: the client never sees a module missing that
the boot is about to install, and never asks for a second installer in the same
environment meanwhile.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..wire import contract

#: A task waits at most this long for the boot's install (the agent's own installs get
#: as long: host/installer.py INSTALL_TIMEOUT).
WAIT_LIMIT = 900.0
#: Lines of the install's log a failure shows.
LOG_LINES = 15


@dataclass
class BackgroundInstall:
    """The state file's content (see ``wire/contract.py``)."""

    #: "installing", then "installed" (the OpenMP runtime may still install: ``running``)
    #: or "failed"
    state: str
    distributions: list[str]
    modules: list[str] | None
    log: str
    running: bool  # the installer holds its lock

    def provides(self, module: str | None) -> bool:
        """May ``module`` come from this install?  Unknown (no name, or an install from a
        requirements file): yes."""
        if module is None or self.modules is None:
            return True
        return module.partition(".")[0] in self.modules

    def failure(self) -> str:
        """Why it failed, with the end of its log."""
        # "installing" with its lock free: it ended without saying how
        why = {"failed": "failed", "installing": "stopped before it finished"}.get(
            self.state, self.state)
        try:
            lines = Path(self.log).read_text(errors="replace").splitlines()
        except OSError as exc:
            lines = [f"(its log {self.log} cannot be read: {exc})"]
        tail = "\n".join("    " + line for line in lines[-LOG_LINES:] if line.strip())
        return (f"the host's boot installs {', '.join(self.distributions)} after the agent "
                f"starts, and that install {why}. It said:\n{tail or '    (nothing)'}\n"
                "Check that the hosts reach the package index and that packages= and "
                "requirements= name versions that exist for the hosts' Python.")


def state_file() -> Path:
    return Path(contract.home()) / contract.INSTALLING_FILE


def current(path: Path | None = None) -> BackgroundInstall | None:
    """The boot's background install as its state file says, or None: nothing is being
    installed (or it finished well)."""
    path = path or state_file()
    for _ in range(20):  # a file being written: read it again
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
                running = _locked(fh.fileno())
            break
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    else:
        return None
    if not path.exists():  # it finished well between the read and the lock test
        return None
    return BackgroundInstall(state=str(data.get("state")),
                             distributions=list(data.get("distributions") or []),
                             modules=data.get("modules"), log=str(data.get("log") or ""),
                             running=running)


def _locked(fd: int) -> bool:
    """Does the installer hold its lock (it is running)?"""
    import fcntl  # hosts are POSIX; clients on Windows never call this

    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def wait_for(module: str | None, limit: float = WAIT_LIMIT,
             poll: float = 0.2) -> BackgroundInstall | None | Literal[False]:
    """Called when a task could not import ``module`` (None: unknown).  False: the boot
    is installing nothing that may provide it (the error stands); None: it was, and has
    now finished (run the task again); a :class:`BackgroundInstall` that failed (or did
    not finish within ``limit``): the task fails with its
    :meth:`~BackgroundInstall.failure`."""
    install = current()
    if install is None or not install.provides(module):
        return False
    before = install
    deadline = time.monotonic() + limit
    while install is not None and install.state == "installing" and install.running:
        if time.monotonic() > deadline:
            install.state = f"is still running after {limit:.0f}s"
            return install
        time.sleep(poll)
        install = current()
    if install is not None and install.state != "installed":
        return install
    _forget_half_installed(before)
    return None


def _forget_half_installed(install: BackgroundInstall) -> None:
    """Python drops a module whose import failed, and what imported well stays (it must:
    numpy's extension cannot load twice in a process).  But a package directory that had
    no ``__init__.py`` yet imported as a namespace package, which stays and hides the
    real package: those go, with what was imported under them.  The finders' cached
    directory listings predate the install: they go too."""
    importlib.invalidate_caches()
    hollow = [name for name, module in list(sys.modules.items())
              if module is not None and getattr(module, "__file__", None) is None
              and hasattr(module, "__path__") and install.provides(name)]
    for name in list(sys.modules):
        if any(name == h or name.startswith(h + ".") for h in hollow):
            del sys.modules[name]
