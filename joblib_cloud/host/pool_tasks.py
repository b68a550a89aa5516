"""What a ``DistributedPool`` chunk runs on a host.

Kept apart from ``pool.py`` (the client side, which imports the SSH and cluster code)
because a chunk is unpickled on the host, which has only the standard library, joblib
and cloudpickle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

#: Pools whose initializer already ran in this (host worker) process.
_initialized: set[str] = set()


class _Init:
    """A pool's ``initializer(*initargs)``, run once per worker process that needs it."""

    def __init__(self, func: Callable[..., Any], args: tuple) -> None:
        self.token = uuid.uuid4().hex
        self.func, self.args = func, args

    def ensure(self) -> None:
        if self.token not in _initialized:
            self.func(*self.args)
            _initialized.add(self.token)


class _Chunk:
    """The callable a host runs: ``func`` over a few items (picklable, stdlib only)."""

    def __init__(self, func: Callable[..., Any], items: list[Any], star: bool,
                 init: _Init | None = None) -> None:
        self.func = func
        self.items = items
        self.star = star
        self.init = init

    def __call__(self) -> list[Any]:
        if self.init is not None:
            self.init.ensure()
        if self.star:
            return [self.func(*args) for args in self.items]
        return [self.func(item) for item in self.items]


class _Call:
    """``func(*args, **kwds)`` once: what ``apply_async`` ships."""

    def __init__(self, func: Callable[..., Any], args: tuple, kwds: dict,
                 init: _Init | None = None) -> None:
        self.func, self.args, self.kwds, self.init = func, args, kwds, init

    def __call__(self) -> Any:
        if self.init is not None:
            self.init.ensure()
        return self.func(*self.args, **self.kwds)
