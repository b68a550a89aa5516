"""The ``local`` provider: agents as subprocesses of this program, no SSH, no cloud."""

from __future__ import annotations

import argparse
import os
import sys

from ..client.progress import Progress
from ..config import CloudConfig
from ..provisioner import Fleet, HostTarget, Out


class LocalProvider:
    name = "local"

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        return Fleet([HostTarget(f"local-{i}") for i in range(config.n)], python=sys.executable,
                     workers_per_host=config.workers_per_host or os.cpu_count())

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'local' runs its agents as subprocesses of the program that uses "
            "them: nothing runs between programs, so there is nothing to show")
        return 0

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'local' leaves nothing behind: its agents stop with their program")
        return 0
