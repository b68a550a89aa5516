"""The client side of a slow-link run, started inside the client's namespace of a
:class:`slowlink.SlowLink`: a GridSearchCV on ``provider='aws'`` (EC2: moto in this process;
S3: the moto server on the far side, reached over the shaped link; machines: far sshd
hosts), printing one JSON line of what it measured.

    ip netns exec CLIENT_NS python tests/support/slowlink_client.py --client-ns C --far-ns F \
        --staging auto --mb 100 --candidates 20

The object store's address comes from ``AWS_ENDPOINT_URL_S3``.  The network guard allows
loopback and the link's own subnet only.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import netguard  # noqa: E402
import slowlink  # noqa: E402

netguard.install()
netguard.allow(slowlink.SUBNET)


def _scores(estimator, X, y):
    """The score, and when this fit finished (hosts share this machine's clock)."""
    return {"r2": estimator.score(X, y), "finished": time.time()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client-ns", required=True)
    parser.add_argument("--far-ns", required=True)
    parser.add_argument("--staging", default="auto")
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--columns", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="of X's values")
    parser.add_argument("--first-reading", type=float, default=0.0,
                        help="the kernel's link reading on the first host's connection "
                             "(bytes/s) in place of its own, e.g. a burst that read high")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--cluster", default="slow")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the hosts' boots; the fit starts on the first")
    args = parser.parse_args()

    import boto3
    import botocore.client
    import numpy as np
    from awsmock import REGION, Ec2Fidelity
    from joblib import parallel_backend
    from moto import mock_aws
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    from joblib_cloud import provisioner
    from joblib_cloud.client import registry
    from joblib_cloud.config import resolve_config
    from joblib_cloud.wire.serialization import StoredObject

    link = slowlink.SlowLink.existing(args.client_ns, args.far_ns)
    real = botocore.client.BaseClient._make_api_call
    fidelity = Ec2Fidelity()

    def call(client, operation, params):
        # moto's server evaluates a bucket policy's Deny without its condition, so the
        # TLS-only policy would refuse every request (plain HTTP on the link): the policy
        # itself is tested against tests/support/s3double.py, which holds it as S3 does.
        if operation == "PutBucketPolicy":
            return {}
        return fidelity(real, client, operation, params)

    botocore.client.BaseClient._make_api_call = call
    if args.first_reading:
        kernel = registry.delivery_rate
        readings = iter([args.first_reading])
        registry.delivery_rate = lambda sock: next(readings, None) or kernel(sock)
    rng = np.random.default_rng(args.seed)
    X = rng.random((int(args.mb * 2**20 / 8 / args.columns), args.columns))
    y = X @ rng.random(args.columns) + rng.normal(size=len(X))
    size = StoredObject(X).nbytes
    settings = {"provider": "aws", "n": args.hosts, "instance": "C2", "cluster": args.cluster,
                "region": REGION, "ingress_cidr": "198.51.100.7/32",
                "user": getpass.getuser(), "python": sys.executable, "workers_per_host": 1,
                "staging": args.staging}
    with mock_aws(), tempfile.TemporaryDirectory() as root:
        ec2 = boto3.client("ec2", region_name=REGION)
        hook = slowlink.far_ec2_hook(link, ec2, Path(root), args.stagger)
        provisioner.set_address_hook(hook)
        try:
            start = time.time()
            cluster = registry.get_cluster(resolve_config(**settings))
            if not args.stagger:
                cluster.wait_until_settled(120)
            connected = time.time()
            hosts_at_start = len(cluster.alive_hosts)
            sent0, packets0 = link.sent_bytes(), link.sent_packets()
            search = GridSearchCV(Ridge(), {"alpha": np.logspace(-3, 3, args.candidates)},
                                  cv=3, scoring=_scores, refit=False, n_jobs=-1)
            begin = time.time()
            with parallel_backend("cloud", **settings):
                search.fit(X, y)
            end = time.time()
            sent, packets = link.sent_bytes() - sent0, link.sent_packets() - packets0
            finished = min(min(search.cv_results_[f"split{k}_test_finished"])
                           for k in range(3))
            hosts = cluster.hosts
            print(json.dumps({
                "staging": args.staging, "size": size, "sent": sent, "ratio": sent / size,
                "connect": connected - start, "first_result": finished - begin,
                "fit": end - begin, "fits": 3 * args.candidates,
                "packets": packets, "hosts_at_start": hosts_at_start,
                "link_readings": cluster.staging.link.readings if cluster.staging else [],
                "joined": sorted(h.joined_at - begin for h in hosts),
                # per host: when it joined (s after the fit began), bytes PUT, bytes fetched
                "per_host": sorted((h.joined_at - begin, h.uploads.bytes_sent,
                                    h.uploads.bytes_fetched) for h in hosts),
                "staged_bytes": cluster.staging.bytes_staged if cluster.staging else 0,
                "direct_bytes": sum(h.uploads.bytes_sent for h in hosts),
                "hosts_fetched": sum(bool(h.uploads.bytes_fetched) for h in hosts),
                "warnings": cluster.staging.failed if cluster.staging else None}), flush=True)
        finally:
            registry.close_all()
            for host in hook.hosts.values():
                host.kill()


if __name__ == "__main__":
    main()
