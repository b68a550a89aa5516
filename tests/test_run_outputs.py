"""Outputs come back: files a job creates or changes in its workspace are copied into
``./joblib-cloud-runs/<job>/`` when an attached ``run`` ends, and with ``pull`` for a
detached job; ``--output``, ``--into`` and the size cap."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from runjobs import cli, wait_for

WRITER = """
import os, sys
import helper                                   # leaves a __pycache__ behind: no output
os.makedirs("results", exist_ok=True)
with open("results/model.txt", "w") as fh:
    fh.write("weights\\n")
with open("notes.txt", "a") as fh:              # changed: an output
    fh.write("the job was here\\n")
with open("big.bin", "wb") as fh:
    fh.write(os.urandom(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
print("done")
"""


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "writer.py").write_text(textwrap.dedent(WRITER))
    (root / "helper.py").write_text("X = 1\n")
    (root / "notes.txt").write_text("notes\n")
    (root / "untouched.txt").write_text("same\n")
    return root


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def record_ids(target: dict) -> list[str]:
    return [p.stem for p in (Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records")
            .iterdir()]


def test_files_a_job_writes_come_back_after_run(target, project):
    done = cli(target, project, "run", "--", "python", "writer.py")
    assert done.returncode == 0, done.stderr
    (job,) = record_ids(target)
    runs = project / "joblib-cloud-runs" / job
    assert files_under(runs) == ["big.bin", "notes.txt", "results/model.txt"]
    assert (runs / "results" / "model.txt").read_text() == "weights\n"
    assert (runs / "notes.txt").read_text() == "notes\nthe job was here\n"
    assert "3 output file(s)" in done.stderr and f"joblib-cloud-runs/{job}/" in done.stderr
    # The local directory itself is left as it was.
    assert (project / "notes.txt").read_text() == "notes\n"


def test_output_dir_and_into(target, project, tmp_path):
    into = tmp_path / "elsewhere"
    done = cli(target, project, "run", "--output", "results", "--into", str(into), "--",
               "python", "writer.py")
    assert done.returncode == 0, done.stderr
    assert files_under(into) == ["results/model.txt"]
    assert not (project / "joblib-cloud-runs").exists()


def test_outputs_over_the_cap_are_not_copied_and_say_what_to_do(target, project):
    done = cli(target, project, "run", "--max-output", "2k", "--", "python", "writer.py",
               "5000")
    assert done.returncode == 0  # the job's own exit code
    assert "over the 2.0 kB cap" in done.stderr and "big.bin (5.0 kB)" in done.stderr
    assert "joblib-cloud pull JOB PATH" in done.stderr
    assert not (project / "joblib-cloud-runs").exists()


def test_a_detached_jobs_outputs_come_back_with_pull(target, project):
    started = cli(target, project, "run", "--detach", "--", "python", "writer.py")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    wait_for(lambda: "succeeded" in cli(target, project, "jobs").stdout, 60,
             "the detached job to end")
    assert not (project / "joblib-cloud-runs").exists()  # nothing until asked
    part = cli(target, project, "pull", job[:6], "results")
    assert part.returncode == 0, part.stderr
    assert files_under(project / "joblib-cloud-runs" / job) == ["results/model.txt"]
    whole = cli(target, project, "pull", job)
    assert whole.returncode == 0, whole.stderr
    assert files_under(project / "joblib-cloud-runs" / job) == [
        "big.bin", "notes.txt", "results/model.txt"]
    nothing = cli(target, project, "pull", job, "no/such/dir")
    assert nothing.returncode == 1 and "created or changed no files" in nothing.stderr
