"""paramiko internals, in one place: results handled in paramiko's own transport thread.

paramiko's transport thread decrypts each packet and feeds its data to the channel's
buffer, which wakes a thread blocked in ``recv``.  At ``batch_size=1`` that wake-up (a
condition variable, a thread switch and a GIL hand-off per result) cost the client more
than anything else it did for a task, and the client's CPU is what sets the pace
(bench/tiny_tasks.py).  :class:`DeliveringPipe` replaces a channel's buffer so that, once
switched, data goes straight to a callback in the transport thread.

That needs what ``Channel.recv`` itself does after reading (re-opening the SSH window)
and knowing whether a key exchange is under way: private parts of paramiko.  They are
probed (:data:`AVAILABLE` at import, :func:`delivers` on each channel once its handshake
came through the pipe); without them, a reader thread per agent does the same job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST

#: The private paramiko methods and attributes the fast path uses.
AVAILABLE = (hasattr(paramiko.Channel, "_check_add_window")
             and hasattr(paramiko.Transport, "_send_user_message"))


if TYPE_CHECKING:  # generic only in paramiko's stubs
    _BytesPipe = BufferedPipe[bytes]
else:
    _BytesPipe = BufferedPipe


class DeliveringPipe(_BytesPipe):
    """A channel's receive buffer that can switch from being read to calling back.
    Until :meth:`deliver_to`, it buffers like paramiko's own (the handshake reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self._switch = threading.Lock()
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self.fed = 0  # bytes paramiko handed to this pipe: the probe that it really does

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        on_data = self._on_data
        if on_data is None:
            with self._switch:
                on_data = self._on_data
                if on_data is None:
                    super().feed(data)
                    return
        on_data(data)

    def close(self) -> None:
        super().close()
        if self._on_close is not None:
            self._on_close()

    def deliver_to(self, on_data: Callable[[bytes], None], on_close: Callable[[], None]
                   ) -> None:
        with self._switch:  # a concurrent feed waits, then goes to on_data: order is kept
            if len(self):
                on_data(self.read(len(self)))
            self._on_data, self._on_close = on_data, on_close
        try:
            self.read(1, timeout=0)  # b"": closed before the switch, so close() missed it
        except PipeTimeout:
            return
        on_close()


def install(channel: paramiko.Channel) -> None:
    """Give a fresh channel (nothing received yet) a :class:`DeliveringPipe`."""
    if AVAILABLE and isinstance(getattr(channel, "in_buffer", None), BufferedPipe):
        channel.in_buffer = DeliveringPipe()


def pipe_of(channel: paramiko.Channel) -> DeliveringPipe | None:
    buffer = getattr(channel, "in_buffer", None)
    return buffer if isinstance(buffer, DeliveringPipe) else None


def delivers(channel: paramiko.Channel, pipe: DeliveringPipe | None) -> bool:
    """Whether what the agent sends really arrives through ``pipe`` (checked after the
    handshake, whose bytes must have come that way)."""
    return pipe is not None and channel.in_buffer is pipe and pipe.fed > 0


def clear_to_send(transport: paramiko.Transport) -> bool:
    """No key exchange under way, read under paramiko's own lock without waiting for it:
    mid key exchange a send waits for the transport thread to finish it, and the caller
    may be that very thread (a result callback dispatching the next batch)."""
    lock = getattr(transport, "clear_to_send_lock", None)
    if lock is None:
        return transport.clear_to_send.is_set()
    if not lock.acquire(blocking=False):
        return False
    try:
        return transport.clear_to_send.is_set()
    finally:
        lock.release()


def grant_window(channel: paramiko.Channel, transport: paramiko.Transport,
                 nbytes: int) -> None:
    """What ``Channel.recv`` does after reading: let the agent send more once enough was
    consumed (paramiko's threshold, a tenth of the window)."""
    private_channel: Any = channel  # the private parts have no types
    private_transport: Any = transport
    ack = private_channel._check_add_window(nbytes)
    if ack <= 0:
        return
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
    message.add_int(channel.remote_chanid)
    message.add_int(ack)
    if clear_to_send(transport):
        private_transport._send_user_message(message)
    else:  # mid key exchange, which this very thread may have to finish first
        threading.Thread(target=private_transport._send_user_message, args=(message,),
                         daemon=True).start()
