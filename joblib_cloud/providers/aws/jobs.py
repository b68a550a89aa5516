"""``run -n N`` on aws: how the job's machine reaches the cluster's other machines.

Where :func:`addresses.sibling_address` says (private addresses by default), verified by
their injected host keys, logged in with a key of the job's own (never the user's, nor the
cluster's long-lived one) with a certificate the cluster's key signed for the machines'
user, valid for a machine's lifetime at most (their sshd trusts the cluster's key as a
user CA), written into the job's ``cloud/`` directory and removed when the job ends; the
cluster's security group lets its machines reach each other on port 22 only.
"""

from __future__ import annotations

from pathlib import Path

from ...config import CloudConfig
from ...jobs.siblings import JobCluster, keepalive
from ..ssh import bracket, job_env
from . import addresses, ec2api, sshkeys
from .machines import ClusterHandle


def job_cluster(config: CloudConfig, handle: ClusterHandle, common: dict[str, str]
                ) -> JobCluster:
    found = {i["InstanceId"]: i for i in ec2api.instances(
        handle.ec2, "find the cluster's machines",
        [{"Name": "instance-id", "Values": handle.instance_ids}])}
    hosts, lines = [], []
    for spec in handle.specs:
        instance = found.get(spec.label)
        if instance is None:
            raise ec2api.AWSError(f"machine {spec.label} of cluster {config.cluster!r} is "
                                  "gone; run again to replace it")
        address, port = addresses.sibling_address(instance)
        name = address if port == 22 else f"[{address}]:{port}"
        lines.append(f"{name} {spec.host_key}\n")
        hosts.append(f"{spec.user}@{bracket(address)}:{port}")
    env = job_env(hosts, handle.python, config, common)
    env.setdefault("JOBLIB_CLOUD_WORKERS_PER_HOST", str(handle.vcpus or ""))
    if not env["JOBLIB_CLOUD_WORKERS_PER_HOST"]:
        del env["JOBLIB_CLOUD_WORKERS_PER_HOST"]
    env["JOBLIB_CLOUD_SSH_KEY"] = "{cloud}/id_job"
    # The job's own key, certified for the machines' user until they stop at the latest.
    private, public = sshkeys.generate_ed25519()
    cert = sshkeys.user_certificate(Path(handle.ssh_key).read_text(), public,
                                    handle.specs[0].user, f"joblib-cloud-job@{config.cluster}",
                                    config.max_lifetime)
    return JobCluster(env, {"known_hosts": "".join(lines), "id_job": private,
                            "id_job-cert.pub": cert + "\n"},
                      probe=True, hosts=hosts, keepalive=keepalive(config))
