"""A job's port, forwarded from a program that goes on running (a notebook): the
non-blocking sibling of ``joblib-cloud forward``."""

from __future__ import annotations

import html

from ..errors import JobError
from . import ports
from .control import state_of
from .records import find_record, target_for


class OpenForward:
    """Port ``remote`` of a running job at ``url`` until :meth:`close`."""

    def __init__(self, job: str, remote: int, local: int | None = None) -> None:
        record = find_record(job)
        self._target = target_for(record)
        try:
            if state_of(self._target, record)["state"] != "running":
                raise JobError(f"job {record.id} is not running: nothing to forward")
            self.job = record.id
            self._forward = ports.Forward(self._target.connection,
                                          ports.PortSpec(remote, local or remote),
                                          lambda url: None)
        except BaseException:
            self._target.close()
            raise
        self.url = self._forward.url

    def close(self) -> None:
        self._forward.close()
        self._target.close()

    def __repr__(self) -> str:
        return f"{self.url} (job {self.job}; .close() stops forwarding)"

    def _repr_html_(self) -> str:
        url = html.escape(self.url)
        return (f'<a href="{url}" target="_blank">{url}</a> (job {html.escape(self.job)}; '
                "<code>.close()</code> stops forwarding)")


def open_forward(job: str, remote: int, local: int | None = None) -> OpenForward:
    return OpenForward(job, remote, local)
