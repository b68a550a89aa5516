"""``aws`` jobs and joblib-cloud's S3 bucket (moto behind a loopback HTTP server, the
machines loopback sshd hosts): a finished job's outputs are saved under its id before it
says it ended, so ``pull`` works once the machine is gone; the shared directory is the
bucket's ``shared/<cluster>/`` prefix, mirrored on the job's machine, only changed files
moving.  The machine gets presigned URLs, never credentials."""

from __future__ import annotations

import base64
import datetime
import getpass
import json
import sys
import textwrap
from pathlib import Path

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    loopback_ec2_fixture,
)
from s3double import s3_fixture  # noqa: F401

from joblib_cloud import cli
from joblib_cloud.client import registry
from joblib_cloud.providers.aws.bucket import Bucket

JOB = """
import json, os, sys
shared = os.environ["JOBLIB_CLOUD_SHARED"]
seen = sorted(os.listdir(shared))
os.makedirs("results", exist_ok=True)
with open("results/model.txt", "w") as fh:
    fh.write("weights\\n")
if sys.argv[1] == "write":
    with open(os.path.join(shared, "result.txt"), "w") as fh:
        fh.write("from job one")
print(json.dumps({"seen": seen, "aws": sorted(k for k in os.environ if k.startswith("AWS_")),
                  "read": open(os.path.join(shared, "inputs", "data.csv")).read()}))
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "job.py").write_text(textwrap.dedent(JOB))
    monkeypatch.chdir(root)
    for name, value in {"REGION": REGION, "INGRESS_CIDR": CIDR, "USER": getpass.getuser(),
                        "PYTHON": sys.executable, "WORKERS_PER_HOST": "1",
                        "PROVIDER": "aws", "INSTANCE": "C2", "CLUSTER": "s3c"}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    yield root
    registry.close_all()


def bucket() -> Bucket:
    return Bucket.for_region(REGION, create=False)


def test_outputs_saved_to_s3_come_back_after_the_machine_is_gone(s3, loopback_ec2, project,
                                                                 tmp_path, capfd):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    assert cli.main(["shared", "put", str(data), "inputs"]) == 0  # straight to the bucket
    assert list(bucket().keys("shared/s3c/")) == ["shared/s3c/inputs/data.csv"]

    assert cli.main(["run", "--", "python", "job.py", "write"]) == 0
    out, err = capfd.readouterr()
    info = json.loads(out.strip().splitlines()[-1])
    assert info == {"seen": ["inputs"], "aws": [], "read": "a,b\n"}  # no credentials there
    (job,) = [p.stem for p in (tmp_path / "home" / "job-records").iterdir()]
    assert f"jobs/{job}/outputs.tar.gz" in set(bucket().keys("jobs/"))
    assert "shared/s3c/result.txt" in set(bucket().keys("shared/"))

    # The upload policies the machine got: the outputs' one key, the shared prefix, each
    # capped at --max-output, for the machine's lifetime.
    (host,) = loopback_ec2.values()
    spec = json.loads((host.home / "jobs" / job / "command.json").read_text())
    for part, where in (("outputs", {"key": f"jobs/{job}/outputs.tar.gz"}),
                        ("shared", ["starts-with", "$key", "shared/s3c/"])):
        policy = json.loads(base64.b64decode(spec["s3"][part]["post"]["fields"]["policy"]))
        assert where in policy["conditions"]
        assert ["content-length-range", 0, 100 * 2**20] in policy["conditions"]
        expires = datetime.datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00"))
        left = expires - datetime.datetime.now(datetime.timezone.utc)
        assert 11.5 * 3600 < left.total_seconds() <= 12 * 3600  # max_lifetime's default
    assert not any("AWS_SECRET" in line or "aws_secret" in line
                   for line in (host.home / "jobs" / job / "command.json").read_text().split(","))

    host.kill()  # the machine is gone
    registry.close_all()
    assert cli.main(["pull", job]) == 0
    _, err = capfd.readouterr()
    assert "come from S3" in err
    runs = project / "joblib-cloud-runs" / job
    assert (runs / "results" / "model.txt").read_text() == "weights\n"


def test_shared_prefix_moves_only_changed_files(s3, loopback_ec2, project, tmp_path, capfd):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    assert cli.main(["shared", "put", str(data), "inputs"]) == 0
    assert cli.main(["run", "--", "python", "job.py", "write"]) == 0
    capfd.readouterr()
    before = len(s3.requests)
    assert cli.main(["run", "--", "python", "job.py", "read"]) == 0
    out, _ = capfd.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["seen"] == ["inputs", "result.txt"]
    second = s3.requests[before:]
    # Nothing of the shared prefix was downloaded or uploaded again: nothing changed.
    assert [r for r in second if r.key.startswith("shared/") or
            (r.method == "POST" and "shared" in r.key)] == [], second

    # From the laptop: ls, get, rm on the prefix, no machine involved.
    assert cli.main(["shared", "ls"]) == 0
    out, _ = capfd.readouterr()
    assert [row.split()[0] for row in out.splitlines()[1:]] == ["inputs/data.csv",
                                                                 "result.txt"]
    assert cli.main(["shared", "get", "result.txt", str(tmp_path / "got")]) == 0
    assert (tmp_path / "got" / "result.txt").read_text() == "from job one"
    assert cli.main(["shared", "rm", "inputs"]) == 0
    assert list(bucket().keys("shared/s3c/")) == ["shared/s3c/result.txt"]
