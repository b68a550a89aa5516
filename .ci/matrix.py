"""The Python matrix: the compatibility set (tests marked ``compat``) under every supported
Python on this machine, each as a client in a venv of its own, against hosts of its minor
that hold only joblib and cloudpickle (tests/test_compat.py, tests/support/pythons.py).

    python3 .ci/matrix.py [--main-junit MAIN.xml] [--out DIR] [--write docs/compatibility.md]
    python3 .ci/matrix.py --from DIR --write docs/compatibility.md   # a past run's results

The main interpreter's row comes from the main suite's JUnit file (it already ran the
set); every other interpreter runs it here.  Prints the matrix (Python x provider x host:
pass counts) and exits non-zero if anything failed; ``--write`` also writes it as
``docs/compatibility.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
import pythons  # noqa: E402

Counts = dict[tuple[str, str, str], collections.Counter]


def client_venv(python: str) -> Path:
    """A venv of ``python`` with this checkout installed (editable) and its test extras."""
    info = pythons.describe(python)
    key = hashlib.sha256(f"{REPO}{info['executable']}{info['version']}".encode()
                         + (REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    root = pythons.CACHE / f"client-{info['version']}-{key}"
    exe = root / "bin" / "python"
    if not (root / ".complete").exists():
        subprocess.run([python, "-m", "venv", "--clear", str(root)], check=True)
        install = subprocess.run([str(exe), "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check", "-e", f"{REPO}[test]"],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            sys.exit(f"installing the client into {root} failed:\n{install.stderr[-4000:]}")
        (root / ".complete").write_text(info["version"])
    return exe


def read_junit(path: Path, python_label: str, counts: Counts) -> None:
    for case in ET.parse(path).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props.get("compat") != "1":
            continue
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        key = (python_label, props.get("provider", "none"), props.get("host", "-"))
        counts.setdefault(key, collections.Counter())[outcome] += 1


def table(counts: Counts) -> str:
    lines = ["| client Python | provider | host | passed | failed | skipped |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (python, provider, host), c in sorted(counts.items()):
        lines.append(f"| {python} | {provider} | {host} | {c['passed']} | {c['failed']} "
                     f"| {c['skipped']} |")
    return "\n".join(lines)


def write_doc(path: Path, counts: Counts, seconds: dict[str, float]) -> None:
    took = ", ".join(f"{label} {s:.0f} s" for label, s in seconds.items()) or "see CI's log"
    path.write_text(f"""# Compatibility, as measured

Written by `python3 .ci/matrix.py --write docs/compatibility.md` after the main suite
(`.ci/run` runs the same matrix on every CI run, without writing this file).  Each row
counts the tests of the compatibility set (`pytest -m compat`: `tests/test_compat.py`,
`tests/test_archive.py` and the guest tests marked `compat`) that ran with that client
Python against that provider and host.

- **client Python**: the interpreter that ran the client, in a venv of its own holding
  this checkout and its test dependencies (pyenv's builds, and Debian's own
  `/usr/bin/python3.11`, marked "Debian").
- **host**: what the machine's Python held.  "venv 3.11.2 (Debian): joblib, cloudpickle"
  is a venv made from Debian's 3.11.2 holding only joblib and cloudpickle at the client's
  versions: what the README asks of a host.  "+ numpy, scipy, scikit-learn" adds what an
  `aws` boot installs.  A guest is a Debian machine that really boots (tests/support/guests.py).
- **provider** `none`: the client alone (settings, the command line, archives).

{table(counts)}

Measured on {datetime.date.today().isoformat()}, {platform.machine()}, Linux
{platform.release().split('-')[0]}; time per client Python: {took}.
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main-junit", type=Path, help="the main suite's JUnit XML")
    parser.add_argument("--write", type=Path, help="write the matrix here (markdown)")
    parser.add_argument("--only", action="append", help="only interpreters whose "
                        "version starts with this (repeatable)")
    parser.add_argument("--out", type=Path, help="keep each interpreter's JUnit XML here")
    parser.add_argument("--from", dest="past", type=Path, help="run nothing: read the "
                        "JUnit files a past run kept (main.xml and VERSION.xml)")
    args = parser.parse_args()
    counts: Counts = {}
    seconds: dict[str, float] = {}
    own = os.path.realpath(sys.executable)
    labels = {pythons.describe(p)["version"]: pythons.describe(p)["label"]
              for p in pythons.interpreters()}
    if args.past:
        for junit in sorted(args.past.glob("*.xml")):
            label = pythons.describe(own)["label"] if junit.stem == "main" else \
                labels.get(junit.stem, junit.stem)
            read_junit(junit, label, counts)
    if args.main_junit:
        read_junit(args.main_junit, pythons.describe(own)["label"], counts)
    out = args.out or Path(tempfile.mkdtemp(prefix="joblib-cloud-matrix-"))
    out.mkdir(parents=True, exist_ok=True)
    failed_runs = []
    for python in [] if args.past else pythons.interpreters():
        info = pythons.describe(python)
        if os.path.realpath(python) == own or (
                args.only and not any(info["version"].startswith(o) for o in args.only)):
            continue
        start = time.monotonic()
        print(f"+ compatibility set on Python {info['label']} ({python})", flush=True)
        exe = client_venv(python)
        junit = out / f"{info['version']}.xml"
        run = subprocess.run([str(exe), "-m", "pytest", "-m", "compat", "-q", "-ra",
                              "-p", "no:cacheprovider", f"--junitxml={junit}"], cwd=REPO)
        seconds[info["label"]] = time.monotonic() - start
        if run.returncode != 0:
            failed_runs.append(info["label"])
        if junit.exists():
            read_junit(junit, info["label"], counts)
    print(table(counts))
    if args.write:
        write_doc(args.write, counts, seconds)
    failures = sum(c["failed"] for c in counts.values())
    print(f"matrix: {sum(c['passed'] for c in counts.values())} passed, {failures} failed, "
          f"{sum(c['skipped'] for c in counts.values())} skipped")
    if failed_runs or failures:
        print(f"matrix: {failures} failed test(s); runs that failed: "
              f"{', '.join(failed_runs) or 'none'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
