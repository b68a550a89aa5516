"""The kinds of machines joblib-cloud runs on, one module or package each.

This package is the only place that names a provider: everything else asks the
:class:`~joblib_cloud.provisioner.Provider` interface.
"""

#: name -> "module:class", imported on first use (hosts have no boto3, for one).
BUILTIN: dict[str, str] = {
    "aws": "joblib_cloud.providers.aws:AWSProvider",
    "ssh": "joblib_cloud.providers.ssh:SSHProvider",
    "local": "joblib_cloud.providers.local:LocalProvider",
}
#: The provider used when none is configured.
DEFAULT = "aws"
#: The provider whose hosts are agents on this very machine: what a job's own backend
#: uses when it runs on one machine (its cores).
THIS_MACHINE = "local"
#: The provider that logs in to hosts named by address: what a job's backend uses to
#: reach its siblings.
BY_ADDRESS = "ssh"
