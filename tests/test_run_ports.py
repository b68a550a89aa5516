"""``run --port REMOTE[:LOCAL]`` and ``joblib-cloud forward JOB PORT``: a job serving HTTP
on its machine answers at the printed ``http://127.0.0.1:LOCAL/`` on the client (over the
job's own SSH connection on ``ssh``; directly or through a relay on ``local``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from runjobs import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site(tmp_path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the job\n")
    return root


def read_url_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The URL the CLI prints on stderr once something listens."""
    found: list[str] = []

    def reader() -> None:
        for line in proc.stderr:
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if match:
                found.append(match.group(1))
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found, "no URL printed"
    return found[0]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_run_port_prints_a_url_that_answers_from_the_client(target, site):
    remote, local = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "joblib_cloud", "run", "--port", f"{remote}:{local}", "--",
         f"python -m http.server {remote} --bind 127.0.0.1"], cwd=site, env=target["env"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, proc.kill)  # a hung CLI fails the test, never hangs it
    guard.start()
    try:
        url = read_url_line(proc)
        assert url == f"http://127.0.0.1:{local}/"
        assert get(url + "hello.txt") == "hello from the job\n"
        assert get(url + "hello.txt") == "hello from the job\n"  # a second connection
        proc.send_signal(signal.SIGINT)  # Ctrl-C cancels the job, and its server
        assert proc.wait(timeout=60) == 130
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", local), timeout=2).close()


def test_forward_reaches_a_detached_job(target, site):
    remote, local = free_port(), free_port()
    started = cli(target, site, "run", "--detach", "--",
                  f"python -m http.server {remote} --bind 127.0.0.1")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "joblib_cloud", "forward", job,
                             f"{remote}:{local}"], cwd=site, env=target["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, proc.kill)
    guard.start()
    try:
        assert proc.stdout.readline().strip() == f"http://127.0.0.1:{local}/"
        assert get(f"http://127.0.0.1:{local}/hello.txt") == "hello from the job\n"
        # The job ends: forward notices and returns.
        assert cli(target, site, "cancel", job).returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_port_is_a_clear_error(target, site):
    done = cli(target, site, "run", "--port", "http", "--", "true")
    assert done.returncode == 2  # ConfigError
    assert "--port 'http'" in done.stderr and "REMOTE:LOCAL" in done.stderr
    assert os.path.isdir(site)
