"""Cold start: seconds from entering ``with parallel_backend('cloud', ...)`` to the first
result, on guests that really boot the EC2 user-data (tests/support/guests.py,
tests/support/guest_ec2.py: moto for the API, a Debian 12 machine per instance), split into stages:

  launch call    RunInstances returned (the client's launch, one call per machine)
  cloud-init     the guest's cloud-init started (its boot up to there)
  boot script    joblib-cloud's boot script started
  packages       uv installed the client's packages (Python ready before that)
  ssh allowed    the boot authorised the client's key (logins refused until then)
  agent ready    the host's agent answered the handshake
  first result   the first task's result reached the client

The same run measures the previous design's boot (pip into a venv made with the
distribution's venv module, which Debian images must install first), and a fleet of two
with one machine held back (its boot starts ``--held-back`` seconds late), to show that
the first results do not wait for it.  Needs root, mmdebstrap and systemd-nspawn.

    python bench/cold_start.py [--rounds 1] [--held-back 120]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT))
os.environ.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})

import botocore.client  # noqa: E402
from guest_ec2 import GuestEC2  # noqa: E402
from guests import base_image, tools_missing  # noqa: E402
from joblib import Parallel, delayed, parallel_backend  # noqa: E402
from moto import mock_aws  # noqa: E402

import joblib_cloud  # noqa: E402,F401  (registers the backend)
from joblib_cloud import provisioner  # noqa: E402
from joblib_cloud.client import registry  # noqa: E402
from joblib_cloud.providers.aws import userdata  # noqa: E402

REGION = "us-east-1"
#: "[   3.13] cloud-init[113]: ..." (a login prompt may stand before it on the line)
CONSOLE_LINE = re.compile(r"\[\s*([0-9.]+)\]\s+(.*)$")
MARKS = {"cloud-init": "running 'init-local'", "boot script": "joblib-cloud: boot started",
         "packages": "joblib-cloud: packages installed", "ssh allowed": "joblib-cloud: host ready"}
STAGES = ["launch call", *MARKS, "agent ready", "first result"]


def pip_steps(python_minor: str, pins: str, count: int) -> str:
    """The previous design's boot: the distribution's venv module, then pip."""
    return f"""PY=python{python_minor}
if command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PY-venv
fi
$PY -m venv {userdata.VENV}
echo "joblib-cloud: installing {count} packages"
{userdata.HOST_PYTHON} -m pip install --quiet --no-cache-dir {pins}
echo "joblib-cloud: packages installed"
"""


def console_marks(guest) -> dict[str, float]:
    """Wall-clock times of the boot's marks, from the console's uptime stamps."""
    found: dict[str, float] = {}
    for line in guest.console().splitlines():
        match = CONSOLE_LINE.search(line.strip())
        if not match:
            continue
        for stage, text in MARKS.items():
            if stage not in found and text in match.group(2):
                found[stage] = guest.started_at + float(match.group(1))
    return found


def one_run(workdir: Path, hosts: int, held_back: float = 0.0) -> dict:
    """Seconds from the ``with`` block to each stage (the earliest host), and when the
    held-back guest started booting."""
    fake = GuestEC2(workdir, REGION)
    if held_back:
        fake.boot_delays = [0.0] * (hosts - 1) + [held_back]
    real = botocore.client.BaseClient._make_api_call
    launch_done: list[float] = []

    def wrapped(client, operation, params):
        result = fake.api_call(real, client, operation, params)
        if operation == "RunInstances":
            launch_done.append(time.time())
        return result

    settings = {"provider": "aws", "instance": "C2", "n": hosts, "region": REGION,
                "ingress_cidr": "198.51.100.7/32", "cluster": f"cold{hosts}{int(held_back)}",
                "workers_per_host": 2}
    joined: dict[str, float] = {}
    with mock_aws():
        botocore.client.BaseClient._make_api_call = wrapped
        provisioner.set_address_hook(fake.address)
        try:
            start = time.time()
            with parallel_backend("cloud", **settings):
                results = Parallel(return_as="generator")(
                    delayed(os.getpid)() for _ in range(8))
                next(iter(results))
                first = time.time()
                list(results)
            cluster = registry.get_cluster(joblib_cloud.config.resolve_config(**settings))
            for host in cluster.hosts:
                joined[host.name] = host.joined_at
        finally:
            registry.close_all()
            fake.stop_all()
            botocore.client.BaseClient._make_api_call = real
            provisioner.set_address_hook(None)
    guests = sorted(fake.guests.values(), key=lambda g: g.started_at or float("inf"))
    marks = [console_marks(g) for g in guests]
    stages = {"launch call": launch_done[0] - start}
    for stage in MARKS:
        times = [m[stage] for m in marks if stage in m]
        stages[stage] = min(times) - start if times else float("nan")
    stages["agent ready"] = min(joined.values(), default=first) - start
    stages["first result"] = first - start
    late = [g for g in fake.guests.values() if g.delay]
    # When its boot starts (or was to start: the call may be over before it does).
    stages["held-back guest boots"] = (
        (late[0].started_at or late[0].created_at + late[0].delay) - start if late else None)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--held-back", type=float, default=120.0)
    args = parser.parse_args()
    reason = tools_missing()
    if reason:
        raise SystemExit(f"cold_start needs guests: {reason}")
    base_image()
    print(f"cold start on guests (Debian 12, cloud-init, systemd, sshd), {os.cpu_count()} "
          f"cores; median of {args.rounds}; seconds from entering the with block")
    scenarios = {"uv, 1 host": (1, 0.0, False), "uv, 2 hosts": (2, 0.0, False),
                 "pip (previous), 1 host": (1, 0.0, True),
                 f"uv, 2 hosts, one {args.held_back:.0f}s late": (2, args.held_back, False)}
    rows = {}
    original = userdata._python_steps
    for name, (hosts, held_back, pip) in scenarios.items():
        runs = []
        for _ in range(args.rounds):
            userdata._python_steps = pip_steps if pip else original
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one_run(Path(tmp), hosts, held_back))
        userdata._python_steps = original
        rows[name] = {k: statistics.median(r[k] for r in runs) if runs[0][k] is not None
                      else None for k in runs[0]}
    width = max(len(n) for n in rows)
    print(" " * width + "  " + "  ".join(f"{s:>12}" for s in STAGES))
    for name, row in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row[s]:12.1f}" for s in STAGES))
        if row["held-back guest boots"] is not None:
            print(f"{'':<{width}}  first result at {row['first result']:.1f}s; the "
                  f"held-back guest's boot starts at {row['held-back guest boots']:.1f}s")


if __name__ == "__main__":
    main()
