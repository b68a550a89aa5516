"""The live display in a Jupyter kernel: one output per call, updated in place through the
display protocol (``display_data`` once, then ``update_display_data`` with its id), that
ends as the call's summary and stays in the cell.

Updates go out from a thread of ours, at most every :data:`INTERVAL` seconds, and once a
second while machines boot or a call runs (the money moves with time).  Only
``IPython.display``, which every kernel has, is used.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

from .board import Board, HostRow, Summary, usd

#: Shortest time between two updates of the display.
INTERVAL = 0.25
#: The longest the display goes without an update while something is under way.
TICK = 1.0

_STATE_COLOURS = {"ready": "#2e7d32", "failed": "#c62828", "lost": "#c62828"}
BOX = ("font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; "
        "font-size: 13px; line-height: 1.45; border: 1px solid #d0d7de; border-radius: 6px; "
        "padding: 8px 12px; max-width: 760px; background: #fafbfc; color: #1f2328")
_CELL = "padding: 2px 10px 2px 0; text-align: left; border: none"


def _e(value: object) -> str:
    return html.escape(str(value))


def _bar(done: int, total: int | None) -> str:
    if not total:
        return ""
    width = min(100.0, 100.0 * done / total)
    return (f'<div style="background:#e1e4e8;border-radius:3px;height:8px;width:320px;'
            f'display:inline-block;vertical-align:middle;margin-right:8px">'
            f'<div style="background:#1f6feb;border-radius:3px;height:8px;width:{width:.1f}%">'
            '</div></div>')


def _host_row(row: HostRow) -> str:
    colour = _STATE_COLOURS.get(row.state, "#9a6700")
    state = _e(row.state) + (f" <span style='color:#656d76'>({_e(row.detail)})</span>"
                             if row.detail else "")
    return (f"<tr><td style='{_CELL}'><code>{_e(row.name)}</code></td>"
            f"<td style='{_CELL};color:{colour}'>{state}</td>"
            f"<td style='{_CELL}'>{row.workers or ''}</td>"
            f"<td style='{_CELL}'>{row.done}</td></tr>")


def board_html(board: Board) -> str:
    """The live view: price, stage, tasks of the call, one row per host, money."""
    rows = board.rows()
    done, total = board.tasks()
    parts = [f'<div class="joblib-cloud-live" style="{BOX}">',
             f"<div style='font-weight:600'>joblib-cloud {_e(board.title)}</div>"]
    if board.price:
        parts.append(f"<div>{_e(board.price)}</div>")
    ready = [r for r in rows if r.state == "ready"]
    ready_line = f"{len(ready)} of {len(rows)} hosts ready"
    if board.stage and not board.stage.startswith(ready_line):  # the table says it
        parts.append(f"<div style='color:#656d76'>{_e(board.stage)}</div>")
    if board.parallel is not None:
        of = f" of {total}" if total is not None else ""
        parts.append(f"<div style='margin:4px 0'>{_bar(done, total)}"
                     f"<b>{done}</b>{of} tasks done</div>")
    if rows:
        parts.append(f"<div>{ready_line}, "
                     f"{sum(r.workers for r in ready)} workers</div>")
        head = "".join(f"<th style='{_CELL}'>{h}</th>"
                       for h in ("host", "state", "workers", "tasks done"))
        parts.append(f"<table style='border-collapse:collapse;margin:4px 0'>"
                     f"<tr>{head}</tr>{''.join(_host_row(r) for r in rows)}</table>")
    footer = [f"{time.monotonic() - board.opened:.0f}s"]
    spent = board.money()
    if spent is not None:
        footer.insert(0, f"{usd(spent)} so far")
    parts.append(f"<div style='color:#656d76'>{' · '.join(footer)}</div></div>")
    return "".join(parts)


def summary_html(summary: Summary, board: Board) -> str:
    """What a finished call leaves in the cell."""
    cost = "" if summary.cost is None else f" · <b>{usd(summary.cost)}</b>"
    per_host = " · ".join(f"<code>{_e(name)}</code> {count}"
                          for name, count in summary.per_host.items())
    price = f"<div style='color:#656d76'>{_e(board.price)}</div>" if board.price else ""
    mark = ("<span style='color:#c62828'>&#10007;</span>" if summary.stopped
            else "<span style='color:#2e7d32'>&#10003;</span>")
    what = (f"stopped after <b>{summary.tasks}</b> tasks" if summary.stopped
            else f"<b>{summary.tasks}</b> tasks")
    return (f'<div class="joblib-cloud-summary" style="{BOX}">'
            f"<div>{mark} joblib-cloud "
            f"{_e(board.title)}: {what} in "
            f"<b>{summary.seconds:.1f}s</b> on <b>{summary.hosts_used}</b> of "
            f"{summary.hosts} hosts{cost}</div>{price}"
            f"<div style='color:#656d76'>tasks per host: {per_host or 'none'}</div></div>")


def _cell_id() -> str | None:
    """The message id of the cell the kernel is running now."""
    from IPython import get_ipython

    shell = get_ipython()
    header = getattr(getattr(shell, "display_pub", None), "parent_header", None) or {}
    return (header.get("header") or {}).get("msg_id")


class NotebookView:
    def __init__(self, board: Board) -> None:
        self.board = board
        self._lock = threading.Lock()
        self._handle: Any = None
        self._cell: str | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the Progress view interface ---------------------------------------------------
    def announce(self, text: str) -> None:
        self.changed()

    def stage(self, text: str, final: bool) -> None:
        self.changed()

    def current(self) -> bool:
        """A display is live in the cell that runs now."""
        return self._handle is not None and self._cell == _cell_id()

    def open(self) -> None:
        from IPython.display import display

        with self._lock:
            self._handle = display(self._bundle(board_html(self.board)), raw=True,
                                   display_id=True)
            self._cell = _cell_id()
        self.changed()

    def changed(self) -> None:
        with self._lock:
            if self._handle is None:
                return  # closed: the summary stays as it is until the next call
            self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._refresh, daemon=True,
                                                name="joblib-cloud-display")
                self._thread.start()

    def close(self, summary: Summary | None) -> None:
        with self._lock:
            handle, self._handle = self._handle, None
            thread = self._thread
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if handle is not None:
            body = board_html(self.board) if summary is None else summary_html(summary,
                                                                                self.board)
            handle.update(self._bundle(body, summary), raw=True)

    # -- inside --------------------------------------------------------------------
    def _bundle(self, body: str, summary: Summary | None = None) -> dict[str, str]:
        text = summary.text() if summary is not None else f"joblib-cloud: {self.board.line()}"
        return {"text/html": body, "text/plain": text}

    def _busy(self) -> bool:
        """Something is under way whose display moves by itself (money, clock)."""
        return self.board.parallel is not None or any(
            r.state not in ("ready", "failed", "lost") for r in self.board.rows())

    def _refresh(self) -> None:
        while True:
            woke = self._wake.wait(TICK)
            self._wake.clear()
            with self._lock:
                handle = self._handle
            if handle is None or not (woke or self._busy()):
                return
            handle.update(self._bundle(board_html(self.board)), raw=True)
            time.sleep(INTERVAL)
