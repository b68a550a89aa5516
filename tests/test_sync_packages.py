"""Hosts get what tasks need: a package the client has and a host lacks is installed there
(the client's version) and the batch runs again; packages= reach ssh and local hosts.

Each host here is a throwaway venv (``--system-site-packages``, so it has joblib and
cloudpickle) whose installer finds packages only in a local directory of wheels: nothing
is installed into this machine's own Python, and nothing leaves loopback."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud import DistributedPool
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.host.installer import installer_command

PROBE = "jc_probe_pkg"
PROBE_CODE = "def where(x):\n    return (x, __file__)\n"


def _dist_files(name: str, version: str, code: str) -> dict[str, str]:
    info = f"{name}-{version}.dist-info"
    return {
        f"{name}/__init__.py": code,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: joblib-cloud-tests\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": f"{name}\n",
    }


def build_wheel(directory: Path, name: str = PROBE, version: str = "1.0",
                code: str = PROBE_CODE) -> Path:
    """A pure-Python wheel written by hand (no build backend, no network)."""
    files = _dist_files(name, version, code)
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{path},sha256={digest.decode().rstrip('=')},{len(text.encode())}")
    record_path = f"{name}-{version}.dist-info/RECORD"
    files[record_path] = "\n".join(record + [f"{record_path},,"]) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def install_on_client(site: Path, monkeypatch, name: str = PROBE, version: str = "1.0",
                      code: str = PROBE_CODE):
    """The distribution installed into a directory on this client's ``sys.path`` only,
    with its ``.dist-info`` (so ``importlib.metadata`` finds it)."""
    for path, text in _dist_files(name, version, code).items():
        target = site / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    return module


class HostPython:
    """A throwaway venv behind a wrapper that points pip and uv at ``wheels`` only."""

    def __init__(self, root: Path, wheels: Path, fake_uv_log: Path | None = None,
                 fake_uv_steps: tuple[str, str] = ("", "")) -> None:
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                        "--without-pip", str(self.venv)], check=True)
        self.site = Path(subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        path = "$PATH"
        if fake_uv_log is not None:
            path = f"{self._fake_uv(root / 'fakebin', fake_uv_log, fake_uv_steps)}:$PATH"
        self.wrapper = root / "host-python"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"export PIP_FIND_LINKS={wheels} PIP_NO_INDEX=1 PIP_CACHE_DIR={root}/pip-cache "
            f"UV_FIND_LINKS={wheels} UV_NO_INDEX=1 UV_OFFLINE=1 UV_CACHE_DIR={root}/uv-cache "
            f"PATH={path}\n"
            f'exec {self.venv}/bin/python "$@"\n')
        self.wrapper.chmod(0o755)

    @staticmethod
    def _fake_uv(bin_dir: Path, log: Path, steps: tuple[str, str]) -> Path:
        """A ``uv`` on PATH that logs each call, then does its work with pip (between the
        shell ``steps`` given): it shows how many installs ran and that the agent speaks
        uv's command line."""
        bin_dir.mkdir()
        uv = bin_dir / "uv"
        uv.write_text("#!/bin/sh\n"
                      f'echo "$@" >> {log}\n'
                      '[ "$1 $2 $3" = "pip install --python" ] || exit 2\n'
                      'py="$4"; shift 4\n'
                      f'{steps[0]}\n"$py" -m pip install "$@" || exit $?\n{steps[1]}\n')
        uv.chmod(0o755)
        return bin_dir

    def has(self, name: str) -> bool:
        return (self.site / name / "__init__.py").is_file()


@pytest.fixture
def wheels(tmp_path) -> Path:
    directory = tmp_path / "wheels"
    build_wheel(directory)
    return directory


@pytest.fixture
def probe(tmp_path, monkeypatch):
    return install_on_client(tmp_path / "client-site", monkeypatch)


def _settings(provider: str, fleet, python: Path, cluster: str, **extra) -> dict:
    if provider == "ssh":
        return fleet.kwargs(hosts=fleet.hosts[:1], python=str(python), cluster=cluster,
                            workers_per_host=2, **extra)
    return {"provider": "local", "n": 1, "workers_per_host": 2, "python": str(python),
            "cluster": cluster, **extra}


@pytest.mark.parametrize("provider", ["local", "ssh"])
def test_missing_package_is_installed_on_the_host_and_the_batch_runs(
        provider, fleet, tmp_path, wheels, probe):
    host = HostPython(tmp_path / "host", wheels)
    assert not host.has(PROBE)
    settings = _settings(provider, fleet, host.wrapper, f"sync-{provider}",
                         sync_packages=True)
    with parallel_backend("cloud", **settings):
        out = Parallel(batch_size=1)(delayed(probe.where)(i) for i in range(4))
    assert [x for x, _ in out] == [0, 1, 2, 3]
    # The tasks imported it from the host's own environment, where it now is.
    assert {Path(file).parent for _, file in out} == {host.site / PROBE}
    assert host.has(PROBE)
    assert (host.site / f"{PROBE}-1.0.dist-info").is_dir()
    registry.close_all()


def test_without_sync_packages_the_missing_module_fails_as_before(tmp_path, wheels, probe):
    host = HostPython(tmp_path / "host", wheels)
    with parallel_backend("cloud", **_settings("local", None, host.wrapper, "sync-off")):
        with pytest.raises(ModuleNotFoundError) as info:
            Parallel()(delayed(probe.where)(i) for i in range(2))
    assert info.value.name == PROBE
    assert f"needs module {PROBE!r}, which host local-0 cannot import" in str(info.value)
    assert not host.has(PROBE)
    registry.close_all()


@pytest.mark.parametrize(("origin", "said"), [
    ({"url": "file:///home/me/src/jc_probe_pkg", "dir_info": {"editable": True}},
     "from a local path (file:///home/me/src/jc_probe_pkg)"),
    ({"url": "https://git.corp.example/ml/probe.git",
      "vcs_info": {"vcs": "git", "commit_id": "0" * 40}},
     "from git (https://git.corp.example/ml/probe.git)"),
])
def test_a_package_the_client_got_from_a_path_or_a_repository_is_not_installed_by_name(
        tmp_path, wheels, monkeypatch, origin, said):
    """The host's index has a package of that name (``wheels``): it may be anyone's."""
    site = tmp_path / "client-site"
    probe = install_on_client(site, monkeypatch)
    (site / f"{PROBE}-1.0.dist-info" / "direct_url.json").write_text(json.dumps(origin))
    host = HostPython(tmp_path / "host", wheels)
    settings = _settings("local", None, host.wrapper, "sync-origin", sync_packages=True)
    with parallel_backend("cloud", **settings):
        with pytest.raises(ModuleNotFoundError) as info:
            Parallel(batch_size=1)(delayed(probe.where)(i) for i in range(3))
        assert Parallel()(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]  # host fine
    message = str(info.value)
    for words in (said, f"{PROBE}==1.0", "so joblib-cloud did not", "requirements=",
                  "--index-url", "packages= with its URL or path"):
        assert words in message, (words, message)
    assert info.value.name == PROBE
    assert not host.has(PROBE)
    registry.close_all()


def test_failed_install_fails_the_batch_once_with_the_installers_words(
        tmp_path, wheels, monkeypatch):
    # The client has it, but no wheel of it exists anywhere the host may look.
    nowheel = install_on_client(tmp_path / "client-site", monkeypatch, "jc_probe_nowheel",
                                "2.5")
    log = tmp_path / "uv.log"
    host = HostPython(tmp_path / "host", wheels, fake_uv_log=log)
    settings = _settings("local", None, host.wrapper, "sync-fails", sync_packages=True)
    with parallel_backend("cloud", **settings):
        with pytest.raises(ModuleNotFoundError) as info:
            Parallel(batch_size=1)(delayed(nowheel.where)(i) for i in range(4))
        message = str(info.value)
        for words in ("jc_probe_nowheel", "jc_probe_nowheel==2.5", "host local-0",
                      "installing jc_probe_nowheel==2.5 there failed", "uv pip install",
                      "packages=['jc_probe_nowheel==2.5']"):
            assert words in message, (words, message)
        assert "No matching distribution" in message or "from versions: none" in message
        assert info.value.name == "jc_probe_nowheel"
        # A later call needing it fails at once, without another install.
        with pytest.raises(ModuleNotFoundError, match="there failed"):
            Parallel()(delayed(nowheel.where)(i) for i in range(2))
        assert Parallel()(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]  # host still fine
    assert len(log.read_text().splitlines()) == 1
    assert not host.has("jc_probe_nowheel")
    registry.close_all()


def test_batches_missing_the_same_module_share_one_install(tmp_path, wheels, probe):
    log = tmp_path / "uv.log"
    host = HostPython(tmp_path / "host", wheels, fake_uv_log=log)
    settings = _settings("local", None, host.wrapper, "sync-shared", sync_packages=True)
    with DistributedPool(**settings) as pool:
        # Four batches in flight on 2 workers: all of them miss the module at first.
        out = pool.map(probe.where, range(8), chunksize=2)
    assert [x for x, _ in out] == list(range(8))
    calls = log.read_text().splitlines()
    assert len(calls) == 1, calls
    assert calls[0].split()[:4] == ["pip", "install", "--python", str(host.venv / "bin" /
                                                                      "python")]
    assert calls[0].split()[4:] == [f"{PROBE}==1.0"]
    assert host.has(PROBE)
    registry.close_all()


#: The install leaves site-packages' modification time as it was, as on a file system with
#: coarse timestamps: a worker's import system then believes its cached listing.
SAME_MTIME = (
    'site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()[\'purelib\'])")\n'
    'touch -r "$site" "$0.stamp"',
    'touch -r "$0.stamp" "$site"')


def test_workers_that_missed_the_module_import_it_once_installed(tmp_path, wheels, probe):
    log = tmp_path / "uv.log"
    host = HostPython(tmp_path / "host", wheels, fake_uv_log=log, fake_uv_steps=SAME_MTIME)
    settings = _settings("local", None, host.wrapper, "sync-mtime", sync_packages=True)
    with parallel_backend("cloud", **settings):
        out = Parallel(batch_size=1)(delayed(probe.where)(i) for i in range(4))
    assert [x for x, _ in out] == [0, 1, 2, 3]
    assert len(log.read_text().splitlines()) == 1
    registry.close_all()


def test_a_long_install_does_not_stop_the_heartbeats(tmp_path, wheels, probe):
    """The agent watches the installer from its event loop: an install longer than
    heartbeat_timeout does not get the host taken for lost, on either side."""
    log = tmp_path / "uv.log"
    host = HostPython(tmp_path / "host", wheels, fake_uv_log=log,
                      fake_uv_steps=("sleep 4", ""))
    settings = _settings("local", None, host.wrapper, "sync-slow", sync_packages=True,
                         heartbeat_timeout=1.5)
    with parallel_backend("cloud", **settings):
        cluster = registry.get_cluster(resolve_config(**settings))  # the backend's own
        out = Parallel(batch_size=1)(delayed(probe.where)(i) for i in range(2))
        assert cluster.alive_hosts == cluster.hosts and not cluster.closed
    assert [x for x, _ in out] == [0, 1]
    registry.close_all()


def host_can_import(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("provider", ["local", "ssh"])
def test_packages_are_installed_on_ssh_and_local_hosts_at_connect(provider, fleet, tmp_path,
                                                                  wheels):
    host = HostPython(tmp_path / "host", wheels)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# what the tasks need\n{PROBE}==1.0\n")
    settings = _settings(provider, fleet, host.wrapper, f"connect-{provider}",
                         sync_packages=True, requirements=str(requirements))
    with parallel_backend("cloud", **settings):
        # There before the first batch: the tasks only look, they never fail to unpickle.
        assert Parallel()(delayed(host_can_import)(PROBE) for _ in range(2)) == [True] * 2
    assert host.has(PROBE)
    registry.close_all()


def test_packages_that_do_not_install_fail_the_connect_with_the_installers_words(
        tmp_path, wheels):
    host = HostPython(tmp_path / "host", wheels)
    settings = _settings("local", None, host.wrapper, "connect-fails", sync_packages=True,
                         packages=["jc_no_such_dist==9.9"])
    from joblib_cloud.errors import HostConnectError

    with pytest.raises(HostConnectError) as info, parallel_backend("cloud", **settings):
        Parallel()(delayed(abs)(i) for i in range(2))
    assert "jc_no_such_dist==9.9" in str(info.value) and "local-0" in str(info.value)
    assert "Fix packages= or requirements=" in str(info.value)


def test_sync_packages_setting_defaults_by_provider(monkeypatch):
    assert resolve_config(provider="aws", _environ={}, _file={}).sync_packages is True
    assert resolve_config(provider="local", _environ={}, _file={}).sync_packages is False
    assert resolve_config(provider="ssh", hosts=["u@h:22"], _environ={},
                          _file={}).sync_packages is False
    assert resolve_config(provider="local", sync_packages=True, _environ={},
                          _file={}).sync_packages is True
    env = {"JOBLIB_CLOUD_SYNC_PACKAGES": "false"}
    assert resolve_config(provider="aws", _environ=env, _file={}).sync_packages is False
    assert resolve_config(provider="local", _environ={},
                          _file={"sync_packages": True}).sync_packages is True
    with pytest.raises(ValueError, match="JOBLIB_CLOUD_SYNC_PACKAGES"):
        resolve_config(provider="local", _environ={"JOBLIB_CLOUD_SYNC_PACKAGES": "maybe"},
                       _file={})


def test_aws_hosts_let_the_agent_install_with_the_boots_uv():
    from joblib_cloud.host.installer import MANAGED_UV
    from joblib_cloud.providers.aws import userdata

    assert MANAGED_UV == f"{userdata.ROOT}/bin/uv"
    script = userdata.boot_script("ec2-user", "3.11", ["joblib==1.4.2"], False)
    assert f"python3 {userdata.ROOT}/fetch_uv.py {userdata.UV_VERSION} {userdata.ROOT}/bin" \
        in script
    assert f"chown -R ec2-user: {userdata.VENV}\n" in script


def test_installer_command_prefers_uv_and_targets_the_agents_python():
    assert installer_command(["a==1"], python="/py", uv="/opt/uv") == [
        "/opt/uv", "pip", "install", "--python", "/py", "a==1"]
    assert installer_command(["a==1", "-r", "f"], python="/py")[:4] == [
        "/py", "-m", "pip", "install"]


def test_turning_sync_on_keeps_the_cluster_and_installs_the_packages(tmp_path, wheels):
    """sync_packages does not define the fleet: the same agents go on, and the packages
    the call names are installed on them."""
    host = HostPython(tmp_path / "host", wheels)
    plain = _settings("local", None, host.wrapper, "sync-later")
    synced = {**plain, "sync_packages": True, "packages": [f"{PROBE}==1.0"]}
    with parallel_backend("cloud", **plain):
        assert Parallel()(delayed(host_can_import)(PROBE) for _ in range(2)) == [False] * 2
    cluster = registry.get_cluster(resolve_config(**plain))
    with parallel_backend("cloud", **synced):
        assert Parallel()(delayed(host_can_import)(PROBE) for _ in range(2)) == [True] * 2
    assert registry.get_cluster(resolve_config(**synced)) is cluster
    assert host.has(PROBE)
    registry.close_all()
