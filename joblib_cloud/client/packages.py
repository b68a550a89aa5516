"""Hosts get what tasks need (``sync_packages``).

A batch that cannot be unpickled on a host because a module is missing there comes back
with ``missing_module``.  If this client has that module from an installed distribution,
the host's agent installs the client's exact version of it (``INSTALL``) and the batch
runs again on that host, once.  Batches that miss the same module on the same host while
its install runs wait for that one install.  ``packages=`` and ``requirements=`` go
through the same path once a host is connected, on providers whose boot does not install
them.

A distribution this client got from a path, a URL or a version-control checkout (its
``direct_url.json`` says so) is not installed on a host by name: a package of that name
on the host's index may be anyone's (dependency confusion).  The batch then fails saying
how to give the hosts the right source.

Threads: ``take_over`` and ``on_installed`` run on the host's reader (results and answers
arrive in order there); ``install_configured`` runs on a connecting thread and waits.
What this module sees of a host is narrow: its ``Outbound`` (INSTALL frames, batches sent
again) and two doors into the scheduler's in-flight table (look a batch up, free its slot).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CloudConfig
from ..errors import HostConnectError
from ..host.installer import INSTALL_TIMEOUT
from ..wire.protocol import InstalledMeta, InstallMeta, Kind, ResultMeta
from .batch import Batch, remote_exception, resolve

if TYPE_CHECKING:
    from .outbound import Outbound

#: Lines of the installer's output an error shows.
OUTPUT_LINES = 15
_install_ids = itertools.count(1)


def client_pins(module: str) -> list[str] | None:
    """``dist==version`` for each installed distribution that provides the top-level
    ``module`` here; None when this client cannot import it or it comes from no installed
    distribution (a plain directory on ``sys.path``: nothing to install from)."""
    top = module.partition(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return None
    except (ImportError, ValueError):
        return None
    pins = []
    for name in dict.fromkeys(importlib.metadata.packages_distributions().get(top, ())):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins or None


def not_by_name(pins: list[str]) -> str | None:
    """Why the distributions ``pins`` name must not be installed on a host by name from
    its index, or None when they may."""
    for pin in pins:
        name = pin.partition("==")[0]
        try:
            text = importlib.metadata.distribution(name).read_text("direct_url.json")
        except importlib.metadata.PackageNotFoundError:
            continue
        if text:
            try:
                info = json.loads(text)
            except ValueError:
                info = {}
            url = info.get("url", "?")
            how = ("a local path" if "dir_info" in info else
                   f"{info['vcs_info'].get('vcs', 'version control')}" if "vcs_info" in info
                   else "a URL")
            return f"this client installed {name} from {how} ({url})"
    return None


@dataclass(eq=False)
class PackageInstall:
    """One INSTALL on one host: what it installs, the batches waiting, how it ended."""

    requirements: list[str]
    requirements_file: str | None = None
    id: int = field(default_factory=lambda: next(_install_ids))
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    command: str = ""
    output: str = ""
    #: Batches waiting for it, each with the result that said what it missed.
    waiters: list[tuple[Batch, ResultMeta, bytes]] = field(default_factory=list)

    def what(self) -> str:
        return ", ".join(self.requirements) or "the requirements file"

    def tail(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return "\n".join("    " + line for line in lines[-OUTPUT_LINES:]) or "    (nothing)"


class HostPackages:
    """One host's installs."""

    def __init__(self, out: Outbound, running: Callable[[int], Batch | None],
                 release: Callable[[int], object]) -> None:
        self.out = out
        #: The batch with this id in flight on the host, if it still is.
        self.running = running
        #: Free a batch's slot on the host (its outcome is decided here).
        self.release = release
        #: Guards each install's waiters against its answer.
        self._lock = threading.Lock()
        self.by_module: dict[str, PackageInstall] = {}
        self.by_id: dict[int, PackageInstall] = {}
        self.configured: set[tuple[tuple[str, ...], str | None]] = set()
        #: Modules not installed by name, and why (:func:`not_by_name`).
        self.refused: dict[str, str] = {}
        #: Batches sent again here after an install: a second miss fails them.
        self.ran_again: weakref.WeakKeyDictionary[Batch, PackageInstall] = \
            weakref.WeakKeyDictionary()

    # -- a batch missed a module -------------------------------------------------------
    def take_over(self, meta: ResultMeta, data: bytes | memoryview) -> bool:
        """Called for a result with ``missing_module``.  True: this batch is ours now (it
        waits for an install, runs again, or fails with the installer's words); False:
        it fails as any error does (no sync, or nothing here to install from)."""
        job = self.running(meta["id"])
        if job is None or not job.sync_packages or job.aborted:
            return False
        if job in self.ran_again:
            self._fail(job, self.ran_again[job], meta, data)
            return True
        top = meta["missing_module"].partition(".")[0]
        install = self.by_module.get(top)
        if install is None and top not in self.refused:
            pins = client_pins(top)
            if pins is None:
                return False
            if (why := not_by_name(pins)) is not None:
                self.refused[top] = f"{why}. Installing {', '.join(pins)} there by name"
            else:
                install = self.by_module[top] = PackageInstall(pins)
                self._request(install)
        if install is None:
            self._refuse(job, meta, data, self.refused[top])
            return True
        if install.done.is_set() and not install.ok:
            self._fail(job, install, meta, data)
            return True
        with self._lock:
            if install.done.is_set():  # installed while this batch was on its way back
                self._run_again(job, install)
            else:
                install.waiters.append((job, meta, bytes(data)))
        return True

    def _request(self, install: PackageInstall) -> None:
        request: InstallMeta = {"id": install.id, "requirements": install.requirements,
                                "requirements_file": install.requirements_file}
        with self._lock:
            self.by_id[install.id] = install
        self.out.post(Kind.INSTALL, request)

    def _run_again(self, job: Batch, install: PackageInstall) -> None:
        """With ``_lock`` held; ``job`` is still in this host's in-flight table."""
        self.ran_again[job] = install
        self.out.resend(job)

    def _release(self, job: Batch) -> None:
        """``job`` leaves this host's in-flight table: its slot goes to the next batch."""
        self.release(job.id)

    def _refuse(self, job: Batch, meta: ResultMeta, data: bytes | memoryview,
                why: str) -> None:
        name = self.out.name
        self._release(job)
        missing = meta["missing_module"]
        error = ModuleNotFoundError(
            f"{job.label} needs module {missing!r}, which host {name} cannot import; "
            f"{why} could give it a different package of the same name from the host's "
            "index, so joblib-cloud did not. Give the hosts its source: requirements= a "
            "file with `--index-url URL` (or `--extra-index-url URL`) and the pin, or "
            "packages= with its URL or path; or install it on the hosts yourself.",
            name=missing)
        error.__cause__ = remote_exception(meta, data, name,
                                           job.label).__cause__
        resolve(job, exc=error)

    def _fail(self, job: Batch, install: PackageInstall, meta: ResultMeta,
              data: bytes | memoryview) -> None:
        name = self.out.name
        self._release(job)
        missing = meta["missing_module"]
        if install.ok:
            what = (f"{install.what()} was installed there, yet {job.label} still cannot "
                    f"import {missing!r}")
        else:
            what = f"installing {install.what()} there failed"
        error = ModuleNotFoundError(
            f"{job.label} needs module {missing!r}, which host {name} cannot import; "
            f"{what}. The installer ({install.command or 'none'}) said:\n{install.tail()}\n"
            f"Install it on that host yourself, or name it in packages="
            f"{list(install.requirements)!r} (or requirements=) so that hosts get it when "
            "they connect.", name=missing)
        error.__cause__ = remote_exception(meta, data, name,
                                           job.label).__cause__
        resolve(job, exc=error)

    # -- the agent's answer --------------------------------------------------------------
    def on_installed(self, meta: InstalledMeta) -> None:
        with self._lock:
            install = self.by_id.pop(meta["id"], None)
        if install is None:
            return
        install.ok, install.command, install.output = meta["ok"], meta["command"], meta["output"]
        failed = []
        with self._lock:
            install.done.set()
            waiters, install.waiters = install.waiters, []
            for job, meta_, data in waiters:
                if job.aborted or job.future.done() or self.running(job.id) is None:
                    self.release(job.id)
                elif install.ok:
                    self._run_again(job, install)
                else:
                    failed.append((job, meta_, data))
        for job, meta_, data in failed:
            self._fail(job, install, meta_, data)

    # -- packages= and requirements= ------------------------------------------------------
    def install_configured(self, config: CloudConfig) -> None:
        """Install ``packages=`` and ``requirements=`` on this host and wait (once per
        set: a reused connection does not install them again)."""
        text = read_requirements(config.requirements)
        key = (tuple(config.packages), text)
        if (not config.packages and text is None) or key in self.configured:
            return
        install = PackageInstall(list(config.packages), text)
        self._request(install)
        deadline = time.monotonic() + INSTALL_TIMEOUT + config.heartbeat_timeout
        while not install.done.wait(0.2):
            if not self.out.alive or time.monotonic() > deadline:
                raise HostConnectError(
                    f"host {self.out.name} did not finish installing {install.what()} "
                    f"({self.out.lost_reason or 'no answer'}). Check that it can reach "
                    "a package index, or install them there yourself.")
        if not install.ok:
            raise HostConnectError(
                f"installing {install.what()} on host {self.out.name} failed. The "
                f"installer ({install.command or 'none'}) said:\n{install.tail()}\nFix "
                "packages= or requirements=, or install them on that host yourself.")
        self.configured.add(key)


def read_requirements(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ValueError(f"the requirements file {path!r} (requirements=) cannot be read: "
                         f"{exc}. Point requirements= at a readable file.") from None

