"""A real Jupyter kernel for the notebook tests: nbclient runs the cells, every
``update_display_data`` it receives is recorded, nbconvert renders the result and headless
Chromium photographs it from a file:// URL.

The kernel imports this worktree's package (``PYTHONPATH``) and installs the test-suite's
network guard before any cell runs (an IPython startup file), so the loopback rule holds
inside it too.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class RecordingClient(NotebookClient):
    """nbclient applies display updates in place; this keeps each one as it came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[int, dict[str, Any]]] = []

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        if msg["msg_type"] == "update_display_data":
            self.updates.append((cell_index, copy.deepcopy(msg["content"])))
        return super().process_message(msg, cell, cell_index)


def kernel_environment(monkeypatch: Any, tmp_path: Path) -> None:
    """The kernel inherits this: our package first, the guard at its start."""
    ipython_dir = tmp_path / "ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-netguard.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import netguard\nnetguard.install()\n")
    monkeypatch.setenv("IPYTHONDIR", str(ipython_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")


#: Run in the kernel after the notebook's cells (then dropped from it): the guard is in.
GUARD_CHECK = ("import socket, netguard\n"
               "assert socket.socket.connect is netguard._connect, 'no network guard'\n"
               "print(netguard.violations)")


def run(cells: list[str], cwd: Path, timeout: int = 240) -> tuple[Any, RecordingClient]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]
                                  + [nbformat.v4.new_code_cell(GUARD_CHECK)])
    client = RecordingClient(nb, timeout=timeout, kernel_name="python3",
                             resources={"metadata": {"path": str(cwd)}})
    client.execute()
    check = nb.cells.pop()
    assert [o.get("text") for o in check.outputs] == ["[]\n"], check.outputs
    return nb, client


def to_html(nb: Any, path: Path) -> Path:
    """The notebook as a self-contained page: no script or style from the network."""
    exporter = HTMLExporter(template_name="lab", mathjax_url="", require_js_url="",
                            mermaid_js_url="", mermaid_layout_elk_js_url="",
                            widget_renderer_url="", jquery_url="")
    body, _ = exporter.from_notebook_node(nb)
    assert not re.search(r"""(src|href)=["']https?:|from ["']https?:""", body)
    path.write_text(body)
    return path


def photograph(page: Path, png: Path, profile: Path, size: str = "1100,1500") -> Path:
    """Headless Chromium's screenshot of ``page`` (a local file), network switched off."""
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
         f"--window-size={size}", f"--screenshot={png}", page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120)
    return png
