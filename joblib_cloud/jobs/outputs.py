"""Outputs come back: the files a job created or changed in its workspace.

When an attached ``run`` ends (and on ``joblib-cloud pull JOB [PATH]``), the host packs
what differs from the workspace it unpacked (``host/jobfiles.py``), under the job's
``--output`` directory if one was given, and the client unpacks it into
``./joblib-cloud-runs/<job>/`` (or ``--into DIR``).  A size cap like the upload's stops a
job that wrote a dataset from filling this disk: over it nothing is copied and the
message lists the largest files.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from ..errors import JobError
from ..host.jobfiles import human
from ..wire.archive import extract
from .targets import Target

DEFAULT_MAX_OUTPUT = 100 * 2**20
RUNS_DIR = "joblib-cloud-runs"


def default_into(job_id: str) -> Path:
    return Path.cwd() / RUNS_DIR / job_id


def unpack(archive: bytes, into: Path, max_bytes: int | None = None) -> list[str]:
    """Regular files and directories only, nothing outside ``into``, at most
    ``max_bytes`` in all (whatever the machine that sent it says): the names."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return sorted(extract(tar, str(into), max_bytes))


def fetch(target: Target, job_id: str, into: Path | None = None, path: str = "",
          max_bytes: int = DEFAULT_MAX_OUTPUT) -> tuple[Path, list[str], int]:
    """Copy the job's outputs (below ``path``) here: (directory, names, bytes)."""
    result = target.call(["outputs", job_id, str(max_bytes), path])
    if result.code != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.code}"
        raise JobError(f"copying job {job_id}'s outputs from {target.name} failed: "
                           f"{detail.removeprefix('joblib-cloud (on host): ')}")
    into = into or default_into(job_id)
    names = unpack(result.stdout, into, max_bytes)
    return into, names, sum((into / n).stat().st_size for n in names)


def report(job_id: str, into: Path, names: list[str], nbytes: int,
           say_none: bool = True) -> None:
    """One line on stderr: where the outputs are (``say_none``: also when there are none)."""
    try:
        shown = into.relative_to(Path.cwd())
    except ValueError:
        shown = into
    if names:
        print(f"joblib-cloud: job {job_id}: {len(names)} output file(s) ({human(nbytes)}) "
              f"in {shown}/", file=sys.stderr, flush=True)
    elif say_none:
        print(f"joblib-cloud: job {job_id} created or changed no files", file=sys.stderr,
              flush=True)
