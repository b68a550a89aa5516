"""The ``aws`` provider: EC2 machines for a cluster, found again by tag, never leaked.

``launch.py`` starts or re-attaches the machines, ``machines.py`` waits on them and
undoes a failed launch, ``userdata.py`` is what each machine boots, ``network.py`` the
VPC, subnets, security group and the client's address, ``sshkeys.py`` the cluster's
keys on this computer, ``bucket.py`` and ``staging.py`` the S3 bucket large arguments are
staged in, ``teardown.py`` and ``commands.py`` ``down`` and ``status``.
"""

from __future__ import annotations

import argparse

from ...client.cluster import Cluster
from ...client.progress import Progress
from ...config import CloudConfig
from ...provisioner import Fleet, HostTarget, Out
from .machines import ClusterHandle
from .staging import S3Objects


class AWSFleet(Fleet):
    """The machines of one ``ensure``: SSH waits for their boot (and stops early when one
    died), their metadata endpoint closes once they answered, and a failed connect
    terminates what this call launched."""

    boot_installs_packages = True  # the user-data installs them (userdata.py)

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
        self.handle.close_metadata([host.spec.label])

    def drop(self, host: HostTarget) -> None:
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


class AWSProvider:
    name = "aws"

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
