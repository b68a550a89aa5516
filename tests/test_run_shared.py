"""The cluster's shared directory: jobs see it as ``$JOBLIB_CLOUD_SHARED`` (on ``local``
and ``ssh``, a directory on the first host), and ``joblib-cloud shared ls|put|get|rm``
manages it from the client."""

from __future__ import annotations

from pathlib import Path

import pytest
from runjobs import cli

WRITE = ("import os; open(os.path.join(os.environ['JOBLIB_CLOUD_SHARED'], 'msg.txt'), 'w')"
         ".write('from job one')")
READ = ("import os; d = os.environ['JOBLIB_CLOUD_SHARED']; "
        "print(open(os.path.join(d, 'msg.txt')).read(), "
        "open(os.path.join(d, 'inputs', 'data.csv')).read().strip())")


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "write.py").write_text(WRITE + "\n")
    (root / "read.py").write_text(READ + "\n")
    return root


def test_two_jobs_in_a_row_share_a_file(target, project, tmp_path):
    env = {**target["env"], "JOBLIB_CLOUD_CLUSTER": f"sh-{target['provider']}"}
    t = {**target, "env": env}
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    put = cli(t, project, "shared", "put", str(data), "inputs")
    assert put.returncode == 0, put.stderr

    first = cli(t, project, "run", "--", "python", "write.py")
    assert first.returncode == 0, first.stderr
    second = cli(t, project, "run", "--", "python", "read.py")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "from job one a,b"
    # The file lives in the cluster's shared directory, not in either job's workspace.
    assert not (project / "joblib-cloud-runs").exists() or \
        not list((project / "joblib-cloud-runs").rglob("msg.txt"))

    listing = cli(t, project, "shared", "ls")
    assert listing.returncode == 0, listing.stderr
    paths = [row.split()[0] for row in listing.stdout.splitlines()[1:]]
    assert paths == ["inputs/data.csv", "msg.txt"]

    into = tmp_path / "got"
    got = cli(t, project, "shared", "get", "msg.txt", str(into))
    assert got.returncode == 0, got.stderr
    assert (into / "msg.txt").read_text() == "from job one"
    got_dir = cli(t, project, "shared", "get", "inputs", str(into))
    assert got_dir.returncode == 0, got_dir.stderr
    assert (into / "inputs" / "data.csv").read_text() == "a,b\n"

    assert cli(t, project, "shared", "rm", "msg.txt").returncode == 0
    gone = cli(t, project, "shared", "get", "msg.txt", str(into))
    assert gone.returncode == 1 and "no 'msg.txt' in the shared directory" in gone.stderr
    outside = cli(t, project, "shared", "rm", "../x")
    assert outside.returncode == 1 and "outside the shared directory" in outside.stderr
    # Another cluster has its own.
    other = {**target, "env": {**env, "JOBLIB_CLOUD_CLUSTER": "elsewhere"}}
    assert "inputs/data.csv" not in cli(other, project, "shared", "ls").stdout
