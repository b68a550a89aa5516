"""Host Pythons with a twist, for tests: the real interpreter behind a wrapper script that
puts a ``sitecustomize.py`` first on the path (hide packages, break worker start-up)."""

from __future__ import annotations

import sys
from pathlib import Path


def python_with_sitecustomize(tmp_path: Path, name: str, code: str) -> Path:
    """An executable ``tmp_path/name`` that runs this Python with ``code`` run at start."""
    site = tmp_path / f"{name}-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper
