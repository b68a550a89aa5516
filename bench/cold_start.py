"""Cold start: seconds from entering ``with parallel_backend('cloud', ...)`` to the first
result, on one guest that really boots the EC2 user-data (tests/support/guests.py,
tests/support/guest_ec2.py: moto for the API, a Debian 12 machine per instance), split into
stages:

  launch call      RunInstances returned
  cloud-init       the guest's cloud-init started (its boot up to there)
  boot script      joblib-cloud's boot script started
  agent packages   uv installed joblib and cloudpickle (background install only)
  ssh allowed      the boot authorised the client's key ("host ready")
  agent ready      the host's agent answered the handshake
  stdlib result    the first result of a task that needs only the standard library
  all packages     uv installed the rest of the client's pins (numpy, scipy, ...)
  sklearn result   the result of a scikit-learn task (a LogisticRegression fit) sent first

Both designs in one run: the heavy packages in the background while tasks run
(``userdata.BACKGROUND_INSTALL``, the default), and everything installed before the host
lets the client in (the previous design).  Needs root, mmdebstrap and systemd-nspawn.

    python bench/cold_start.py [--rounds 1]
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
         "agent packages": "joblib-cloud: the agent's packages installed",
         "ssh allowed": "joblib-cloud: host ready",
         "all packages": "joblib-cloud: packages installed"}
STAGES = ["launch call", "cloud-init", "boot script", "agent packages", "ssh allowed",
          "agent ready", "stdlib result", "all packages", "sklearn result"]


def fit_score(X, y) -> float:
    from sklearn.linear_model import LogisticRegression

    return float(LogisticRegression(max_iter=300).fit(X, y).score(X, y))


def stdlib_task(i: int) -> int:
    return i * i


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


def one_run(workdir: Path, background: bool) -> dict[str, float]:
    """Seconds from the ``with`` block to each stage."""
    userdata.BACKGROUND_INSTALL = background
    fake = GuestEC2(workdir, REGION)
    real = botocore.client.BaseClient._make_api_call
    launch_done: list[float] = []

    def wrapped(client, operation, params):
        result = fake.api_call(real, client, operation, params)
        if operation == "RunInstances":
            launch_done.append(time.time())
        return result

    settings = {"provider": "aws", "instance": "C2", "n": 1, "region": REGION,
                "ingress_cidr": "198.51.100.7/32", "workers_per_host": 2,
                "cluster": f"cold{'bg' if background else 'fg'}{int(time.time()) % 100000}"}
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    stages: dict[str, float] = {}
    with mock_aws():
        botocore.client.BaseClient._make_api_call = wrapped
        provisioner.set_address_hook(fake.address)
        try:
            start = time.time()
            with parallel_backend("cloud", **settings):
                results = Parallel(return_as="generator_unordered", batch_size=1)(
                    [delayed(fit_score)(X, y)] + [delayed(stdlib_task)(i) for i in range(8)])
                for result in results:
                    kind = "sklearn result" if isinstance(result, float) else "stdlib result"
                    stages.setdefault(kind, time.time() - start)
            cluster = registry.get_cluster(joblib_cloud.config.resolve_config(**settings))
            stages["agent ready"] = min(h.joined_at for h in cluster.hosts) - start
        finally:
            registry.close_all()
            fake.stop_all()
            botocore.client.BaseClient._make_api_call = real
            provisioner.set_address_hook(None)
            userdata.BACKGROUND_INSTALL = True
    (guest,) = fake.guests.values()
    marks = console_marks(guest)
    stages["launch call"] = launch_done[0] - start
    for stage in MARKS:
        stages[stage] = marks[stage] - start if stage in marks else float("nan")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    reason = tools_missing()
    if reason:
        raise SystemExit(f"cold_start needs guests: {reason}")
    base_image()
    print(f"cold start on one guest (Debian 12, cloud-init, systemd, sshd), {os.cpu_count()} "
          f"cores; median of {args.rounds}; seconds from entering the with block")
    scenarios = {"heavy packages in the background": True,
                 "everything before ready (previous)": False}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in scenarios}
    for _ in range(args.rounds):  # the designs in turns, so the machine's load hits both
        for name, background in scenarios.items():
            with tempfile.TemporaryDirectory() as tmp:
                runs[name].append(one_run(Path(tmp), background))
            print(f"  {name}: " + ", ".join(f"{s} {runs[name][-1][s]:.1f}" for s in STAGES)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in STAGES}
            for name, rs in runs.items()}
    width = max(len(n) for n in rows)
    print(" " * width + "  " + "  ".join(f"{s:>14}" for s in STAGES))
    for name, row in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row[s]:14.1f}" for s in STAGES))


if __name__ == "__main__":
    main()
