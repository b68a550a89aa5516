"""Progress while machines launch and connect, and while a call runs.

Where it shows depends on where the program runs: in a Jupyter kernel, one display in the
cell that updates in place and ends as the call's summary (``client/notebook.py``); on a
terminal, a live, rewritten line; in CI and pipes nothing but the price line before a
launch (and warnings, which go through ``warnings``/``logging`` as always), unless
``verbose``.  Everything is also a record under the ``joblib_cloud`` logger.  What is shown
comes from one :class:`~joblib_cloud.client.board.Board`.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Protocol

from .board import Board, Summary

log = logging.getLogger("joblib_cloud")


class View(Protocol):
    def announce(self, text: str) -> None: ...
    def stage(self, text: str, final: bool) -> None: ...
    def changed(self) -> None: ...
    def open(self) -> None: ...
    def current(self) -> bool: ...
    def close(self, summary: Summary | None) -> None: ...


def in_notebook() -> bool:
    """A Jupyter kernel runs this program (its shell has a kernel; a terminal IPython's
    has not).  IPython is not imported to find out: a kernel has it imported already."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return getattr(shell, "kernel", None) is not None


class _StreamView:
    """What a view that writes lines to stderr does with the rest of a call: nothing (no
    display to open, refresh or close; it is always the current one)."""

    def changed(self) -> None:
        pass

    def open(self) -> None:
        pass

    def current(self) -> bool:
        return True

    def close(self, summary: Summary | None) -> None:
        pass


class LineView(_StreamView):
    """A terminal: one line rewritten in place; a stage's final line stays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._width = 0

    def announce(self, text: str) -> None:
        self.stage(text, final=True)

    def stage(self, text: str, final: bool) -> None:
        with self._lock:
            sys.stderr.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            sys.stderr.flush()
            self._width = 0 if final else len(text)


class QuietView(_StreamView):
    """CI and pipes: the price line once per launch; stages only with ``verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def announce(self, text: str) -> None:
        sys.stderr.write(f"joblib-cloud: {text}\n")
        sys.stderr.flush()

    def stage(self, text: str, final: bool) -> None:
        if self.verbose:
            sys.stderr.write(f"joblib-cloud: {text}\n")
            sys.stderr.flush()


def pick_view(board: Board, verbose: bool) -> View:
    if in_notebook():
        from .notebook import NotebookView

        return NotebookView(board)
    return LineView() if sys.stderr.isatty() else QuietView(verbose)


class Progress:
    """The calls providers, the connect threads and the backend make as things happen."""

    def __init__(self, verbose: bool = False, view: View | None = None,
                 title: str = "") -> None:
        self.board = Board(title)
        self.view = view if view is not None else pick_view(self.board, verbose)
        self.view.open()
        #: The display opened for a launch goes on into the call that asked for it.
        self._open = True

    def announce(self, text: str) -> None:
        """The price line before a launch: shown wherever the program runs."""
        log.info(text)
        self.board.price = text
        self.view.announce(text)

    def update(self, text: str) -> None:
        """A transient stage line (replaced by the next one)."""
        log.info(text)
        self.board.stage = text
        self.view.stage(text, final=False)

    def done(self, text: str) -> None:
        """A stage's final line, which stays on a terminal."""
        log.info(text)
        self.board.stage = text
        self.view.stage(text, final=True)

    def host(self, name: str, state: str, workers: int | None = None,
             detail: str = "") -> None:
        log.debug("host %s: %s %s", name, state, detail)
        self.board.host(name, state, workers, detail)
        self.view.changed()

    def task_done(self, name: str, count: int) -> None:
        self.board.task_done(name, count)
        self.view.changed()

    def start_call(self, parallel: Any) -> None:
        """A ``Parallel`` call starts: in the display that shows its cluster's launch
        when that happened for this call (in this cell), else in a new one."""
        if self._open and self.view.current():
            self.board.attach(parallel)
        else:
            self.board.open(parallel)
            self.view.open()
        self._open = True
        self.view.changed()

    def stop_call(self) -> Summary:
        """The call ended (or failed): its summary replaces the live display."""
        summary = self.board.summary()
        log.info(summary.text())
        self._open = False
        self.view.close(summary)
        self.board.attach(None)
        return summary

    def abandon(self) -> None:
        """No host came up: the display keeps its last state, and stops."""
        self._open = False
        self.view.close(None)
