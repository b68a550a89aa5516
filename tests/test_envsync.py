"""Environment sync (DESIGN §7): mismatched hosts are refused before any task runs, and
modules that exist only in the client's working directory still work in tasks."""

from __future__ import annotations

import importlib
import os
import stat
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud import DistributedPool, EnvironmentMismatchError


def fake_python(tmp_path: Path, patch: str) -> str:
    """A wrapper that runs this interpreter with a ``sitecustomize`` applying ``patch``:
    a host whose Python reports other versions, with no special case in product code."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(textwrap.dedent(patch))
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site_dir} exec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


OTHER_CLOUDPICKLE = """
    import importlib.metadata as md
    _real = md.version
    def version(name):
        return "0.0.1" if name == "cloudpickle" else _real(name)
    md.version = version
"""
OTHER_PYTHON = """
    import platform
    platform.python_version = lambda: "3.1.0"
"""
OTHER_JOBLIB = """
    import importlib.metadata as md
    _real = md.version
    def version(name):
        return "0.9.9" if name == "joblib" else _real(name)
    md.version = version
"""


def write_marker(path: str) -> str:
    Path(path).write_text("ran")
    return path


@pytest.mark.parametrize("patch, words", [
    (OTHER_CLOUDPICKLE, ["cloudpickle 0.0.1", f"cloudpickle=={cloudpickle.__version__}"]),
    (OTHER_PYTHON, ["Python 3.1.0", "python="]),
])
@pytest.mark.parametrize("provider", ["local", "ssh"])
def test_version_mismatch_is_refused_before_any_task_runs(fleet, tmp_path, patch, words,
                                                           provider):
    python = fake_python(tmp_path, patch)
    settings = (fleet.kwargs(python=python, hosts=fleet.hosts[:1]) if provider == "ssh"
                else {"provider": "local", "python": python})
    marker = tmp_path / "marker"
    with pytest.raises(EnvironmentMismatchError) as info, \
            parallel_backend("cloud", **settings):
        Parallel()(delayed(write_marker)(str(marker)) for _ in range(2))
    for word in words:
        assert word in str(info.value)
    with pytest.raises(EnvironmentMismatchError):
        DistributedPool(**settings).map(write_marker, [str(marker)])
    assert not marker.exists(), "a task ran on a host that should have been refused"


def test_other_package_version_warns_and_runs(fleet, tmp_path):
    python = fake_python(tmp_path, OTHER_JOBLIB)
    marker = tmp_path / "marker"
    with pytest.warns(RuntimeWarning, match="joblib 0.9.9"):
        with DistributedPool(**fleet.kwargs(python=python, hosts=fleet.hosts[:1])) as pool:
            assert pool.map(write_marker, [str(marker)]) == [str(marker)]
    assert marker.read_text() == "ran"


def host_can_import(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def uses_module(module):
    """A task that refers to the module object (as ``import mymod_xyz`` at the top of a
    user's script makes every function do)."""
    return lambda x: (module.triple(x), os.getcwd())


@pytest.fixture
def cwd_module(tmp_path, monkeypatch):
    """``mymod_xyz.py`` exists only in the client's working directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymod_xyz.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(sys.modules, "mymod_xyz", raising=False)
    yield work, importlib.import_module("mymod_xyz")
    sys.modules.pop("mymod_xyz", None)


def test_module_only_in_client_cwd_is_usable_in_tasks(fleet, cwd_module):
    work, module = cwd_module
    settings = fleet.kwargs()
    with DistributedPool(**settings) as pool:
        # The hosts really cannot import it: it has to travel with the task.
        assert pool.map(host_can_import, ["mymod_xyz", "json"]) == [False, True]
        assert pool.map(module.triple, range(4)) == [0, 3, 6, 9]
        results = pool.map(uses_module(module), range(6))
    assert [r for r, _ in results] == [0, 3, 6, 9, 12, 15]
    assert all(cwd != str(work) for _, cwd in results)
    with parallel_backend("cloud", **settings):
        out = Parallel()(delayed(module.triple)(i) for i in range(4))
    assert out == [0, 3, 6, 9]
