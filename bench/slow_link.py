"""A client on a slow link: bytes on the client's link and seconds to the first result,
with large arguments staged in S3 (``staging='auto'``) and sent to each host directly
(``staging='never'``, the previous design), side by side in one run.

The client runs in a network namespace of its own, its uplink shaped with ``tc tbf``
(``tests/slowlink.py``); on the far side, at full speed, three sshd hosts playing EC2
machines (moto) and moto's S3 server.  The job: GridSearchCV(Ridge) over ``--candidates``
alphas x 3 folds on an ``--mb`` MB ``X``.  Needs root (namespaces).

    python bench/slow_link.py [--mb 100] [--candidates 20] [--rates 100mbit,1gbit]
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
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rates", default="100mbit",
                        help="comma-separated tc rates of the client's uplink")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the hosts' boots; the fit starts on the first")
    args = parser.parse_args()
    os.environ.setdefault("JOBLIB_CLOUD_HOME", tempfile.mkdtemp(prefix="jlc-bench-"))
    print(f"GridSearchCV(Ridge), {args.candidates} candidates x 3 folds, X {args.mb:.0f} MB, "
          f"{args.hosts} hosts; client link shaped with tc tbf\n")
    print(f"{'link':>9} {'large arguments':>22} {'link bytes / size(X)':>21} "
          f"{'first result':>13} {'whole fit':>10}")
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
                                              stagger=args.stagger)
                    print(f"{rate:>9} {label:>22} {got['ratio']:>21.3f} "
                          f"{got['first_result']:>12.1f}s {got['fit']:>9.1f}s", flush=True)
        finally:
            link.stop()


if __name__ == "__main__":
    main()
