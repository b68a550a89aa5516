"""A package index on loopback whose downloads a test can hold: a slow network on cue.

Guests install from it (the image's ``/etc/uv/uv.toml`` names it, as a company's mirror
would be named), so a test decides when a project's files arrive instead of racing the
real index's bandwidth.  It serves a wheelhouse that ``pip download`` fills once per
set of pins and Python (cached beside the guest images); the product's boot installs
from it as it does from any index, through uv's own configuration.
"""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

from guests import CACHE, IMAGE_UV_CONFIG

from joblib_cloud.providers.aws.boot_packages import normal

#: A held download is let through after this long whatever the test does, so a test that
#: fails before it releases never leaves a guest's install hanging.
HOLD_LIMIT = 600.0


def project(filename: str) -> str:
    """The normalized (PEP 503) project name of a wheel's file name."""
    return normal(filename.split("-", 1)[0])


def wheelhouse(requirements: list[str]) -> Path:
    """Wheels of ``requirements`` and their dependencies, for this Python (the guest runs
    the client's minor), downloaded on first use."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    key = hashlib.sha256(" ".join([minor, *sorted(requirements)]).encode()).hexdigest()[:12]
    path = CACHE / f"wheelhouse-{key}"
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                        "--only-binary=:all:", "--dest", str(partial), *requirements],
                       check=True, timeout=900)
        partial.rename(path)
    return path


class GatedIndex:
    """A PEP 503 simple index of ``wheels`` on 127.0.0.1; :meth:`hold` stops a project's
    file downloads (the request waits) until :meth:`release`."""

    def __init__(self, wheels: Path) -> None:
        self.files = {p.name: p for p in wheels.glob("*.whl")}
        self.digests = {name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for name, p in self.files.items()}
        self.gates: dict[str, threading.Event] = {}
        #: Projects whose files were served, in order.
        self.served: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.answer(with_body=True)

            def do_HEAD(self) -> None:  # uv asks whether range requests work
                self.answer(with_body=False)

            def answer(self, with_body: bool) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) == 2 and parts[0] == "simple":
                    body = index.page(parts[1]).encode()
                    kind = "text/html"
                elif len(parts) == 2 and parts[0] == "files" and parts[1] in index.files:
                    name = project(parts[1])
                    if with_body:
                        index.wait(name)
                        index.served.append(name)
                    body = index.files[parts[1]].read_bytes()
                    kind = "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def page(self, name: str) -> str:
        links = "".join(f'<a href="/files/{f}#sha256={self.digests[f]}">{f}</a>\n'
                        for f in sorted(self.files) if project(f) == name)
        return f"<!DOCTYPE html><html><body>\n{links}</body></html>\n"

    def uv_config(self) -> str:
        """The image's ``/etc/uv/uv.toml`` naming this index as the only one."""
        return f'{IMAGE_UV_CONFIG}\n[[index]]\nurl = "{self.url}"\ndefault = true\n'

    def hold(self, name: str) -> None:
        self.gates[name] = threading.Event()

    def release(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def wait(self, name: str) -> None:
        gate = self.gates.get(name)
        if gate is not None:
            gate.wait(HOLD_LIMIT)

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
