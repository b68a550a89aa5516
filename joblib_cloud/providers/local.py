"""The ``local`` provider: agents as subprocesses of this program, no SSH, no cloud."""

from __future__ import annotations

import argparse
import os
import sys

from ..client.progress import Progress
from ..config import CloudConfig
from ..jobs.siblings import JobCluster
from ..provisioner import Fleet, HostTarget, Out, Provider


class LocalFleet(Fleet):
    def job_cluster(self, config: CloudConfig, python: str, detach: bool,
                    common: dict[str, str]) -> JobCluster:
        """``run -n N``: the job's backend starts N agents on this same machine."""
        return JobCluster({"JOBLIB_CLOUD_PROVIDER": LocalProvider.name,
                           "JOBLIB_CLOUD_N": str(len(self.hosts)), **common},
                          hosts=[h.name for h in self.hosts])


class LocalProvider(Provider):
    name = "local"
    runs_images = False  # the agents are this program's subprocesses

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        return LocalFleet([HostTarget(f"local-{i}") for i in range(config.n)],
                          python=sys.executable,
                          workers_per_host=config.workers_per_host or os.cpu_count())

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'local' runs its agents as subprocesses of the program that uses "
            "them: nothing runs between programs, so there is nothing to show")
        return 0

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'local' leaves nothing behind: its agents stop with their program")
        return 0
