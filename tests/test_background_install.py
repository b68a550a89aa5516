"""Tasks while the boot still installs the heavy packages (host/background.py): a task
that imports a module that install provides waits for it and runs again, others run at
once, and a failed install fails those tasks with its log.

The "boot" here is a process of the test that holds the state file's ``flock`` as the
boot script's background install does, and "installs" a module by writing it into a
directory on the local agent's ``PYTHONPATH``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until
from joblib import Parallel, delayed, parallel_backend
from test_sync_packages import install_on_client

from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.host import background
from joblib_cloud.host.installer import Installer
from joblib_cloud.wire import contract

MODULE = "jc_bg_probe"
CODE = "VALUE = 7\n\nclass Scale:\n    def __init__(self, k):\n        self.k = k\n"
LOCKER = ("import fcntl, sys\nf = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)\n"
          "print('locked', flush=True)\nsys.stdin.read()\n")


def _uses_module(x: int) -> int:
    from jc_bg_probe import VALUE

    return VALUE * x


def _scaled(scale, x: int) -> int:  # ``scale`` unpickles only where the module is
    return scale.k * x


def _stamp(x: int) -> tuple[int, float]:
    return x, time.time()


class BootInstall:
    """The state file, and a process holding its lock while "installing"."""

    def __init__(self, home: Path, log: Path, modules: list[str] | None = None,
                 state: str = "installing", locked: bool = True) -> None:
        self.path = home / contract.INSTALLING_FILE
        self.state = {"state": state, "distributions": ["jc-bg-probe"],
                      "modules": [MODULE] if modules is None else modules, "log": str(log)}
        self.path.write_text(json.dumps(self.state))
        self.locker = None
        if locked:
            self.locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(self.path)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True)
            assert self.locker.stdout.readline() == "locked\n"

    def finish(self, ok: bool) -> None:
        if ok:
            self.path.unlink()
        else:
            self.path.write_text(json.dumps({**self.state, "state": "failed"}))
        self.release()

    def release(self) -> None:
        if self.locker is not None and self.locker.poll() is None:
            self.locker.stdin.close()
            self.locker.wait(10)

    def stop(self) -> None:
        self.release()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def host_site(tmp_path, monkeypatch):
    """A directory only the local agent imports from (its PYTHONPATH), empty until the
    "install" writes the module there."""
    site = tmp_path / "host-site"
    site.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    yield site
    registry.close_all()


def _settings(cluster: str) -> dict:
    return {"provider": "local", "n": 1, "workers_per_host": 3, "cluster": cluster}


def test_a_task_waits_for_the_module_the_boot_installs_while_stdlib_tasks_run(
        host_site, tmp_path, monkeypatch):
    install_on_client(tmp_path / "client-site", monkeypatch, MODULE, code=CODE)
    from jc_bg_probe import Scale

    boot = BootInstall(Path(contract.home()), tmp_path / "packages.log")
    installed_at: list[float] = []
    # Half-written: the package's directory is there, its __init__.py not yet (it imports
    # as a namespace package, which must not outlive the install).
    (host_site / MODULE).mkdir()

    once = threading.Lock()

    def install() -> None:
        """When the stdlib results are all in (or after a minute: then the test fails)."""
        if once.acquire(blocking=False):
            (host_site / MODULE / "__init__.py").write_text(CODE)
            installed_at.append(time.time())
            boot.finish(ok=True)

    late = threading.Timer(60.0, install)
    try:
        settings = {**_settings("bg-wait"), "heartbeat_timeout": 2.0}
        with parallel_backend("cloud", **settings):
            late.start()
            results = Parallel(return_as="generator_unordered", batch_size=1, pre_dispatch=8)(
                [delayed(_uses_module)(3), delayed(_scaled)(Scale(5), 4)]
                + [delayed(_stamp)(i) for i in range(6)])
            got = []
            for result in results:
                got.append((result, time.time()))
                if len(got) == 1:  # what the host said at connect: the display shows it
                    lines = [registry.get_cluster(resolve_config(**settings)).progress.board
                             .line()]
                if sum(isinstance(r, tuple) for r, _ in got) == 6:
                    install()
            board = registry.get_cluster(resolve_config(**settings)).progress.board
            wait_until(lambda: "installing" not in board.line(), 15,
                       "the host's PING saying the install is over")
    finally:
        late.cancel()
        boot.stop()
    assert "installing jc-bg-probe" in lines[0], lines
    stamps = [r for r, _ in got if isinstance(r, tuple)]
    assert sorted(x for x, _ in stamps) == list(range(6))
    assert all(t < installed_at[0] for _, t in stamps)  # ran while it installed
    waited = {r: t for r, t in got if isinstance(r, int)}
    assert waited.keys() == {21, 20}  # both right: the body's import and the argument's
    assert all(t >= installed_at[0] for t in waited.values())


def test_a_failed_boot_install_fails_the_tasks_that_need_it_with_its_log(host_site, tmp_path):
    log = tmp_path / "packages.log"
    log.write_text("Resolving...\nerror: No solution found: jc-bg-probe==1.0 is not on the "
                   "index\n")
    boot = BootInstall(Path(contract.home()), log)
    threading.Timer(1.0, boot.finish, kwargs={"ok": False}).start()
    try:
        with parallel_backend("cloud", **_settings("bg-failed")):
            assert Parallel()(delayed(pow)(i, 2) for i in range(4)) == [0, 1, 4, 9]
            with pytest.raises(ModuleNotFoundError) as info:
                Parallel()(delayed(_uses_module)(i) for i in range(2))
    finally:
        boot.stop()
    message = str(info.value)
    assert "No module named 'jc_bg_probe'" in message, message
    assert "installs jc-bg-probe after the agent starts, and that install failed" \
        in message, message
    assert "jc-bg-probe==1.0 is not on the index" in message, message
    assert "reach the package index" in message, message


def test_an_install_that_died_and_a_module_it_does_not_provide_fail_at_once(
        host_site, tmp_path):
    log = tmp_path / "packages.log"
    log.write_text("Downloading scipy\n")
    settings = _settings("bg-other")
    boot = BootInstall(Path(contract.home()), log, modules=["scipy"])
    try:
        with parallel_backend("cloud", **settings):
            started = time.monotonic()
            with pytest.raises(ModuleNotFoundError, match="No module named 'jc_bg_probe'$"):
                Parallel()(delayed(_uses_module)(i) for i in range(2))
            assert time.monotonic() - started < 5  # not provided by it: no wait
        boot.stop()
        boot = BootInstall(Path(contract.home()), log, locked=False)  # nobody holds it
        with parallel_backend("cloud", **settings):
            with pytest.raises(ModuleNotFoundError, match="stopped before it finished"):
                Parallel()(delayed(_uses_module)(i) for i in range(2))
    finally:
        boot.stop()


def test_the_agents_own_installs_wait_for_the_boots(tmp_path):
    """One installer per environment: an INSTALL that comes while the boot installs starts
    once the boot's install, OpenMP runtime included, is over (the agent's heartbeat looks
    again); tasks need not wait for the OpenMP runtime."""
    import selectors

    answers: list = []
    selector = selectors.DefaultSelector()
    installer = Installer(selector, answers.append)
    boot = BootInstall(Path(contract.home()), tmp_path / "packages.log")
    try:
        installer.request({"id": 1, "requirements": ["--help"], "requirements_file": None})
        installer.check_deadline()
        assert installer.running is None and len(installer.queue) == 1
        # The packages are in, the OpenMP runtime still installs (the lock is held): tasks
        # go on, the agent's installs still wait.
        boot.path.write_text(json.dumps({**boot.state, "state": "installed"}))
        started = time.monotonic()
        assert background.wait_for(MODULE) is None and time.monotonic() - started < 1
        installer.check_deadline()
        assert installer.running is None
        boot.finish(ok=True)
        installer.check_deadline()
        assert installer.running is not None
        deadline = time.monotonic() + 60
        while not answers and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                key.data(key.fd)
        assert [a["id"] for a in answers] == [1] and answers[0]["ok"], answers
    finally:
        installer.close()
        boot.stop()


def test_a_job_starts_once_the_boots_install_is_over_and_says_if_it_failed(tmp_path):
    """``joblib-cloud run``'s command waits as tasks do (its script may import numpy at
    its top), and a failed install is named with its log before the command runs."""
    from joblib_cloud.host.jobfiles import after_boot_install

    home = Path(contract.home())
    log = tmp_path / "packages.log"
    boot = BootInstall(home, log)
    try:
        job = subprocess.Popen(["/bin/sh", "-c", after_boot_install("echo ran", str(home))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            job.wait(1.0)  # held while the install runs
        boot.finish(ok=False)
        out, err = job.communicate(timeout=10)
    finally:
        boot.stop()
    assert out == "ran\n"
    assert err == f"joblib-cloud: the host's install of the packages failed: see {log}\n"
    done = subprocess.run(["/bin/sh", "-c", after_boot_install("echo ran", str(home))],
                          capture_output=True, text=True, timeout=10)
    assert (done.stdout, done.stderr) == ("ran\n", "")  # nothing installing: at once
