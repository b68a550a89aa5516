"""What tasks print reaches the client before their results: when the call returns, the
output is there, each line prefixed by its host, as loky shows a worker's output."""

from __future__ import annotations

import sys

from joblib import Parallel, delayed, parallel_backend


def _talk(i):
    print("\n".join(f"bulk {i} " + "x" * 200 for _ in range(400)))  # 80 kB: several reads
    print(f"line {i} of task {i}")
    sys.stdout.write(f"tail {i}")  # no newline: shown as a line when the call ends
    sys.stdout.flush()
    return i


def test_output_is_shown_before_the_call_returns(fleet, capsys):
    kwargs = fleet.kwargs(workers_per_host=1, cluster="output-order")
    for round_ in range(3):
        with parallel_backend("cloud", **kwargs):
            assert Parallel(n_jobs=-1, batch_size=1)(
                delayed(_talk)(i) for i in range(40)) == list(range(40))
        out = capsys.readouterr().out  # no waiting: it must be there already
        lines = out.splitlines()
        told = [line for line in lines if "line " in line]
        assert len(told) == 40, f"round {round_}: {len(told)} of 40 lines: {out[-400:]}"
        assert all(line.startswith("[") and "@127.0.0." in line.split("]")[0]
                   for line in told), told[:3]
        assert {int(line.split("line ")[1].split()[0]) for line in told} == set(range(40))
        assert sum(line.count("tail ") for line in lines) == 40
        assert sum(1 for line in lines if "bulk " in line) == 40 * 400
