"""The same benchmark on two versions of joblib-cloud, in turns, in one run.

Checks out ``--old`` (a git revision) into a temporary worktree and runs ``bench/NAME.py``
alternately from that tree and from this one (``--rounds`` times each), each run against
its own package (``PYTHONPATH``), then prints every ratio line of both, side by side.
Usage::

    python bench/versions.py --old d50a35c --rounds 3 tiny_tasks --no-dask --repeat 1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: "  cloud ssh fleet      batched  1.02x loky   batch_size=1  1.26x loky's µs/task"
RATIO = re.compile(r"^\s+(\S+(?: \S+)*?)\s+batched\s+([0-9.]+)x loky\s+batch_size=1\s+"
                   r"([0-9.]+)x loky")


def run(tree: Path, name: str, args: list[str]) -> dict[str, tuple[float, float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(tree / "bench" / f"{name}.py"), *args],
                         cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        match = RATIO.match(line)
        if match:
            found[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("name", help="benchmark in bench/, e.g. tiny_tasks")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        options.old], check=True, capture_output=True)
        try:
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(options.rounds):
                results["old"].append(run(old, options.name, options.args))
                results["new"].append(run(ROOT, options.name, options.args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(old)], check=False, capture_output=True)
    print(f"{options.name}: old = {options.old}, new = this tree; median of "
          f"{options.rounds} runs each, in turns (ratios to loky in the same run)")
    for backend in results["new"][0]:
        cells = []
        for which in ("old", "new"):
            rows = [r[backend] for r in results[which] if backend in r]
            batched = statistics.median(r[0] for r in rows)
            single = statistics.median(r[1] for r in rows)
            cells.append(f"{which}: batched {batched:.2f}x, batch_size=1 {single:.2f}x")
        print(f"  {backend:<20} " + "   ".join(cells))


if __name__ == "__main__":
    main()
