"""Progress lines while machines launch and connect.

A live, rewritten line on a terminal; nothing in CI unless ``verbose``; always a record
under the ``joblib_cloud`` logger.
"""

from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("joblib_cloud")


class Progress:
    def __init__(self, verbose: bool = False) -> None:
        self.live = sys.stderr.isatty()
        self.verbose = verbose
        self._lock = threading.Lock()
        self._width = 0

    def update(self, text: str) -> None:
        """A transient stage line (replaced by the next one on a terminal)."""
        log.info(text)
        with self._lock:
            if self.live:
                sys.stderr.write("\r" + text.ljust(self._width))
                sys.stderr.flush()
                self._width = len(text)
            elif self.verbose:
                sys.stderr.write(f"joblib-cloud: {text}\n")

    def done(self, text: str) -> None:
        """A stage's final line, which stays on screen."""
        log.info(text)
        with self._lock:
            if self.live:
                sys.stderr.write("\r" + text.ljust(self._width) + "\n")
                self._width = 0
            elif self.verbose:
                sys.stderr.write(f"joblib-cloud: {text}\n")
            sys.stderr.flush()
