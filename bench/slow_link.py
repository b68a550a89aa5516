"""A client on a slow link: bytes on the client's link and seconds to the first result,
with large arguments staged in S3 (``staging='auto'``) and sent to each host directly
(``staging='never'``, the previous design), side by side in one run.

The client runs in a network namespace of its own, its uplink shaped with ``tc tbf``
(``tests/support/slowlink.py``); on the far side, at full speed, three sshd hosts playing EC2
machines (moto) and moto's S3 server.  The job: GridSearchCV(Ridge) over ``--candidates``
alphas x 3 folds on an ``--mb`` MB ``X``.  Needs root (namespaces).

With ``--stagger S`` the hosts boot ``S`` seconds apart (the ``i``-th host's sshd starts
``i * S`` s after the launch) and the fit starts on the first: the hosts still booting
must find ``X`` staged.  ``--first-reading`` puts a given kernel link reading on the
first host's connection (a burst that read high).  Columns: bytes on the client's link,
bytes the client uploaded to the store and sent over SSH as cached arguments, all
divided by size(X); ``y`` and the folds' indices cost 4 x 8 bytes per row of ``X`` (twice
for the indices under 1 MiB: inline in their first batch, then cached), so ``--columns``
sets their share.

    python bench/slow_link.py [--mb 100] [--candidates 20] [--rates 100mbit,1gbit]
    python bench/slow_link.py --mb 48 --columns 256 --stagger 5
"""

from __future__ import annotations

import argparse
import os
import tempfile

import _fleet  # noqa: F401  (puts tests/ on sys.path)
import slowlink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--columns", type=int, default=64,
                        help="of X: y and the folds' indices cost 4 x 8 bytes a row of X")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rates", default="100mbit",
                        help="comma-separated tc rates of the client's uplink")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the hosts' boots; the fit starts on the first")
    parser.add_argument("--first-reading", type=float, default=0.0,
                        help="the first host's kernel link reading, bytes/s (a burst that "
                             "read high); default: the kernel's own")
    args = parser.parse_args()
    os.environ.setdefault("JOBLIB_CLOUD_HOME", tempfile.mkdtemp(prefix="jlc-bench-"))
    print(f"GridSearchCV(Ridge), {args.candidates} candidates x 3 folds, X {args.mb:.0f} MB "
          f"({args.columns} columns), {args.hosts} hosts"
          + (f" booting {args.stagger:g} s apart" if args.stagger else "")
          + "; client link shaped with tc tbf\n")
    print(f"{'link':>9} {'large arguments':>22} {'link bytes / size(X)':>21} "
          f"{'staged':>7} {'SSH':>7} {'first result':>13} {'whole fit':>10}  hosts joined at (s)")
    seed = 0
    for rate in args.rates.split(","):
        link = slowlink.SlowLink(rate).start()
        try:
            endpoint = slowlink.start_object_store(link)
            for repeat in range(args.repeats):
                for mode, label in (("auto", "staged in S3 (auto)"),
                                    ("never", "to each host (before)")):
                    got = slowlink.run_client(link, endpoint, staging=mode, mb=args.mb,
                                              candidates=args.candidates, hosts=args.hosts,
                                              cluster=f"bench-{mode}-{repeat}",
                                              stagger=args.stagger, columns=args.columns,
                                              first_reading=args.first_reading,
                                              seed=seed)
                    seed += 1  # a fresh X: the store must not hold it already
                    staged = got["staged_bytes"] / got["size"]
                    direct = got["direct_bytes"] / got["size"]
                    joined = " ".join(f"{t:.1f}" for t in got["joined"])
                    print(f"{rate:>9} {label:>22} {got['ratio']:>21.3f} {staged:>7.3f} "
                          f"{direct:>7.3f} {got['first_result']:>12.1f}s "
                          f"{got['fit']:>9.1f}s  {joined}",
                          flush=True)
        finally:
            link.stop()


if __name__ == "__main__":
    main()
