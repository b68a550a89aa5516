"""The ``aws`` provider: EC2 machines for a cluster, found again by tag, never leaked.

``launch.py`` starts or re-attaches the machines, ``machines.py`` waits on them and
undoes a failed launch, ``userdata.py`` is what each machine boots, ``network.py`` the
VPC, subnets, security group and the client's address, ``sshkeys.py`` the cluster's
keys on this computer, ``bucket.py`` and ``staging.py`` the S3 bucket large arguments are
staged in, ``teardown.py`` and ``commands.py`` ``down`` and ``status``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...client.cluster import Cluster
from ...client.progress import Progress
from ...config import CloudConfig
from ...provisioner import Fleet, HostTarget, Out, Provider
from .machines import ClusterHandle
from .staging import S3Objects

if TYPE_CHECKING:
    from ...jobs.records import JobRecord
    from ...jobs.siblings import JobCluster


class AWSFleet(Fleet):
    """The machines of one ``ensure``: SSH waits for their boot (and stops early when one
    died), their metadata endpoint closes once they answered, and a failed connect
    terminates what this call launched."""

    boot_installs_packages = True  # the user-data installs them (userdata.py)
    siblings_boot = True

    def __init__(self, handle: ClusterHandle, python: str | None,
                 workers_per_host: int | None) -> None:
        advice = handle.timeout_advice()
        super().__init__([HostTarget(s.name, s, handle.ssh_key, handle.known_hosts,
                                     retry_auth=True, check=handle.boot_check(s),
                                     timeout_advice=advice) for s in handle.specs],
                         python=python, connect_timeout=handle.connect_timeout,
                         workers_per_host=workers_per_host)
        self.handle = handle

    def ready(self, host: HostTarget) -> None:
        if host.spec is not None:
            self.handle.close_metadata([host.spec.label])

    def drop(self, host: HostTarget) -> None:
        if host.spec is not None:
            self.handle.drop(host.spec.label)

    def spent(self) -> float | None:
        if not self.handle.usd_per_hour:
            return None
        from .budget import spend

        return spend(self.handle.usd_per_hour, self.handle.launch_times)

    def watch(self, cluster: Cluster, config: CloudConfig) -> None:
        if config.budget is not None and self.handle.usd_per_hour:
            from .budget import Watch

            Watch(cluster, self.handle.ec2, config.budget, self.handle.usd_per_hour,
                  self.handle.launch_times)

    def abort(self) -> None:
        self.handle.abort()

    def object_store(self) -> S3Objects:
        return S3Objects(self.handle.region, self.handle.cluster)

    def job_cluster(self, config: CloudConfig, python: str, detach: bool,
                    common: dict[str, str]) -> JobCluster:
        from .jobs import job_cluster

        return job_cluster(config, self.handle, common)

    def job_storage(self, config: CloudConfig, record: JobRecord,
                    max_output: int) -> dict[str, Any]:
        from .s3store import start_options

        record.region = self.handle.region  # outputs and the shared directory: the bucket
        return {"s3": start_options(record.region, record.id, config.cluster,
                                    config.max_lifetime, max_output)}


class AWSProvider(Provider):
    name = "aws"
    manages_environment = True  # the boot script built the hosts' venv
    default_connect_timeout = None  # the fleet waits boot_timeout for a VM's boot
    reattach_timeout = 5.0  # a gone machine's outputs are in the bucket
    saved_where = "S3"

    def validate(self, values: dict[str, Any], origin: Callable[[str], str]) -> None:
        from .instance_types import resolve_name

        try:
            resolve_name(values["instance"])
        except ValueError as exc:
            raise ValueError(f"invalid value for {origin('instance')}: {exc}") from None

    def describe(self, config: CloudConfig) -> str:
        where = f" in {config.region}" if config.region else ""
        return (f"cluster {config.cluster!r} ({config.provider}{where}): "
                f"{config.n} x {config.instance}")

    def clock_lines(self, config: CloudConfig, rows: list[dict[str, str]]) -> list[str]:
        from datetime import datetime, timedelta

        lines = [f"each machine stops after {config.idle_timeout:.0f}s without work and "
                 f"{config.max_lifetime / 3600:g}h after it launched at the latest"]
        launched = [datetime.fromisoformat(r["launched"]) for r in rows
                    if r.get("launched") and r["state"] in ("pending", "running")]
        if launched:
            last = max(launched) + timedelta(seconds=config.max_lifetime)
            lines.append(f"the last one stops by {last:%Y-%m-%d %H:%M} UTC at the latest")
        if config.budget is not None:
            from ...client.board import usd
            from .commands import spent_on

            lines.append(f"budget {usd(config.budget)}: {usd(spent_on(rows))} spent so far")
        return lines

    def machine_rows(self, config: CloudConfig) -> list[dict[str, str]]:
        from . import commands, teardown

        sess, regions = commands.regions(config, argparse.Namespace())
        return [row for region in regions
                for row in teardown.status_rows(sess, region, config.cluster)]

    def scale(self, config: CloudConfig) -> None:
        from .scaling import terminate_beyond

        terminate_beyond(config)

    def up_message(self, config: CloudConfig) -> str:
        return (f"cluster {config.cluster!r} is up; it stops after "
                f"{config.no_client_timeout:.0f}s without work and without a client "
                f"(no_client_timeout). Remove it now with `joblib-cloud down --cluster "
                f"{config.cluster}`.")

    def job_config(self, config: CloudConfig) -> CloudConfig:
        if config.n <= 1:
            return config
        from ...jobs.siblings import paramiko_pin  # the job's backend reaches the others

        return config.replace(packages=(*config.packages, paramiko_pin()))

    def shared_directory(self, config: CloudConfig) -> Any:
        from .s3store import S3Shared

        return S3Shared(config)

    def saved_outputs(self, record: JobRecord, path: str, into: Path,
                      max_bytes: int) -> tuple[Path, list[str], int]:
        from .s3store import fetch_outputs

        return fetch_outputs(record.region, record.id, path, into, max_bytes)

    def ensure(self, config: CloudConfig, progress: Progress) -> AWSFleet:
        from .launch import ensure_cluster

        handle = ensure_cluster(config, progress)
        # The venv the boot script built, unless the agent runs in a Docker image; a
        # worker per vCPU unless told otherwise.
        return AWSFleet(handle, None if config.image else handle.python,
                        config.workers_per_host or handle.vcpus)

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        from . import commands

        return commands.status(config, args, out)

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        from . import commands

        return commands.down(config, args, out)
