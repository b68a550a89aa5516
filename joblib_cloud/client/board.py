"""What the client knows of a fleet and of the call under way, in one place: the price it
announced, each host's state, the workers, the tasks done (per host too), the money spent.

The terminal line, the notebook display and the summary a call leaves behind all render
this one state (``client/views.py``), so they never disagree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: A host's states, in the order it goes through them; ``failed`` and ``lost`` end it.
HOST_STATES = ("waiting", "booting", "connecting", "starting agent", "installing", "ready",
               "failed", "lost")


def usd(amount: float) -> str:
    """Dollars, with the cents that matter for small amounts too."""
    return f"${amount:.2f}" if amount >= 0.1 else f"${amount:.4f}"


def installing(meta: Mapping[str, Any]) -> str:
    """A ready host's detail from what its boot still installs (HELLO, then PINGs)."""
    names = meta.get("installing") or []
    if not names:
        return ""
    return ("install failed: " if meta.get("install_failed") else "installing ") + \
        ", ".join(names)


@dataclass
class HostRow:
    name: str
    state: str = "waiting"
    workers: int = 0
    #: Tasks this host finished in the current call.
    done: int = 0
    detail: str = ""


@dataclass
class Summary:
    """What a finished call leaves in the cell: how long, how much work, where, the cost."""

    seconds: float
    tasks: int
    #: Hosts that ran some of its tasks, of the fleet's hosts (joining or gone included).
    hosts_used: int
    hosts: int
    cost: float | None
    per_host: dict[str, int] = field(default_factory=dict)
    #: The call stopped early (a task raised, a timeout, Ctrl-C): ``tasks`` is how far
    #: it got.
    stopped: bool = False

    @property
    def what(self) -> str:
        return (f"stopped after {self.tasks} tasks" if self.stopped
                else f"{self.tasks} tasks")

    def text(self) -> str:
        cost = "" if self.cost is None else f", {usd(self.cost)}"
        return (f"joblib-cloud: {self.what} in {self.seconds:.1f}s on "
                f"{self.hosts_used} of {self.hosts} hosts{cost}")


class Board:
    """Written by the provider, the connect threads and the result callbacks; read by
    the views.  Every method takes the lock briefly and never calls out while holding it."""

    def __init__(self, title: str = "") -> None:
        self.lock = threading.Lock()
        #: What the display is about: ``cluster 'default' (aws)``.
        self.title = title
        self.price: str | None = None
        self.stage = ""
        self.hosts: dict[str, HostRow] = {}
        #: Dollars the fleet has cost so far (the provider's ``Fleet.spent``), or None.
        self.spent: Callable[[], float | None] = lambda: None
        #: The joblib ``Parallel`` of the call under way: its task counters are the truth.
        self.parallel: Any = None
        self.opened = time.monotonic()
        self.spent_at_open: float | None = None

    # -- writers ---------------------------------------------------------------------
    def host(self, name: str, state: str, workers: int | None = None,
             detail: str = "") -> None:
        with self.lock:
            row = self.hosts.setdefault(name, HostRow(name))
            row.state, row.detail = state, detail
            if workers is not None:
                row.workers = workers

    def task_done(self, name: str, count: int) -> None:
        with self.lock:
            row = self.hosts.get(name)
            if row is not None:
                row.done += count

    def open(self, parallel: Any = None) -> None:
        """A call (or a launch) starts: its clock, its tasks and its cost start at zero."""
        spent = self.money()
        with self.lock:
            self.parallel = parallel
            self.opened = time.monotonic()
            self.spent_at_open = spent
            for row in self.hosts.values():
                row.done = 0

    def attach(self, parallel: Any) -> None:
        """The call's ``Parallel``, once joblib starts it (the clock keeps running from a
        launch made for this call)."""
        with self.lock:
            self.parallel = parallel

    # -- readers ---------------------------------------------------------------------
    def money(self) -> float | None:
        try:
            return self.spent()
        except Exception:  # noqa: BLE001 - a display never fails the call
            return None

    def tasks(self) -> tuple[int, int | None]:
        """Tasks done in this call, and the total when joblib knows it (a list, or a
        generator it has finished reading)."""
        parallel = self.parallel
        if parallel is None:
            return 0, None
        done = int(getattr(parallel, "n_completed_tasks", 0))
        total = getattr(parallel, "n_tasks", None)
        if total is None and getattr(parallel, "_original_iterator", 1) is None:
            total = int(getattr(parallel, "n_dispatched_tasks", 0))
        return done, total

    def rows(self) -> list[HostRow]:
        with self.lock:
            return [HostRow(r.name, r.state, r.workers, r.done, r.detail)
                    for r in self.hosts.values()]

    def line(self) -> str:
        """One line: ``3 of 4 hosts ready, 12 workers; 40/60 tasks; $0.05 so far``."""
        rows = self.rows()
        ready = [r for r in rows if r.state == "ready"]
        parts = [f"{len(ready)} of {len(rows)} hosts ready, "
                 f"{sum(r.workers for r in ready)} workers"] if rows else [self.stage]
        details = [r.detail for r in ready if r.detail]
        if details:  # the boot's background install: ``installing numpy, scipy (2 hosts)``
            parts.append(details[0] + (f" ({len(details)} hosts)" if len(details) > 1 else ""))
        done, total = self.tasks()
        if self.parallel is not None:
            parts.append(f"{done}/{total if total is not None else '?'} tasks")
        spent = self.money()
        if spent is not None:
            parts.append(f"{usd(spent)} so far")
        return "; ".join(p for p in parts if p)

    def summary(self) -> Summary:
        rows = self.rows()
        done, _ = self.tasks()
        spent, before = self.money(), self.spent_at_open
        return Summary(seconds=time.monotonic() - self.opened, tasks=done,
                       hosts_used=sum(1 for r in rows if r.done),
                       hosts=len(rows),
                       cost=None if spent is None else spent - (before or 0.0),
                       per_host={r.name: r.done for r in rows},
                       stopped=bool(getattr(self.parallel, "_aborting", False)))
