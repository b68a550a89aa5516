"""Providers: what turns a configuration into hosts that an agent can run on.

Every kind of machine (``local`` subprocesses, your own ``ssh`` hosts, ``aws`` VMs) is a
:class:`Provider` registered in :data:`PROVIDERS`, and everything else speaks only this
interface: the client's registry connects the :class:`Fleet` that :meth:`Provider.ensure`
returns, ``joblib-cloud run`` starts its job on that fleet's first host and asks the fleet
how the job reaches the others, and the CLI's ``up``, ``status`` and ``down``, the
settings' checks and the cluster handle ask the provider named in the configuration.  No
code outside ``providers/`` compares provider names.  A new kind of machine is a class
that implements :class:`Provider` (and usually a :class:`Fleet`), made known with
:func:`register_provider` (docs/architecture.md walks through one).

Address hooks
-------------
Where SSH reaches a cloud machine is decided by one function per provider,
``fn(instance) -> (address, port)``, given the instance as the provider's API describes
it (``DescribeInstances`` on EC2).  Change it with :func:`set_address_hook`, e.g. for a
bastion or port forwarding; the test-suite uses it to map moto's instances onto loopback
sshd servers and guests.  A second hook, :func:`set_sibling_hook`, decides where a
``joblib-cloud run -n N`` job's machine reaches the cluster's other machines.  What
applies when no hook is set is the provider's own fact (aws: the public address, and
private addresses between machines, ``providers/aws/addresses.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import providers as _builtin
from .errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from .client.hosts import HostSpec
    from .client.progress import Progress
    from .client.ssh import SSHConnection
    from .config import CloudConfig
    from .jobs.records import JobRecord
    from .jobs.siblings import JobCluster

Out = Callable[[str], None]
#: Seconds to keep retrying a host that does not accept SSH yet, unless told otherwise.
DEFAULT_CONNECT_TIMEOUT = 60.0


@dataclasses.dataclass
class HostTarget:
    """One host to reach: an agent subprocess on this machine (``spec`` None), or an SSH
    host with what it takes to log in and to know it is the right one."""

    name: str
    spec: HostSpec | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None
    #: A booting VM refuses logins until its boot script is done: keep trying.
    retry_auth: bool = False
    #: Runs while SSH is retried, with (logins refused so far: the machine is still
    #: booting; the wait ran out); raises when the machine died or its boot is stuck.
    check: Callable[[bool, bool], None] | None = None
    #: What a connect timeout tells the user to check.
    timeout_advice: str | None = None

    def connect(self, connect_timeout: float) -> SSHConnection:
        """A verified SSH login to this host: the one way every part of joblib-cloud
        (agents, jobs, probes, ``status``) opens one."""
        from .client.ssh import SSHConnection

        if self.spec is None:
            raise ValueError(f"{self.name} is an agent on this machine: no SSH to it")
        return SSHConnection(self.spec, key_path=self.ssh_key, known_hosts=self.known_hosts,
                             connect_timeout=connect_timeout, retry_auth=self.retry_auth,
                             check=self.check, timeout_advice=self.timeout_advice)


class Fleet:
    """What :meth:`Provider.ensure` gives the client: the hosts, the interpreter on them,
    how long to wait for them, how many workers each will have (if known before it
    answers), and what to do as each answers, or does not."""

    #: The hosts' boot installed ``packages=`` and ``requirements=`` already (aws); else,
    #: with ``sync_packages`` on, the client installs them once connected.
    boot_installs_packages = False
    #: The hosts after the first may still be booting when a job starts on the first:
    #: ``run -n N`` waits for them (and keeps the first from idling out meanwhile).
    siblings_boot = False

    def __init__(self, hosts: list[HostTarget], python: str | None = None,
                 connect_timeout: float | None = None,
                 workers_per_host: int | None = None) -> None:
        self.hosts = hosts
        self.python = python
        self.connect_timeout = connect_timeout
        self.workers_per_host = workers_per_host

    def ready(self, host: HostTarget) -> None:
        """``host`` answered, before it gets work: drop what only its boot needed."""

    def drop(self, host: HostTarget) -> None:
        """``host`` never came up while others did: release it."""

    def spent(self) -> float | None:
        """Dollars the hosts have cost so far, where the provider knows (else None)."""
        return None

    def watch(self, cluster: Any, config: CloudConfig) -> None:
        """The cluster is connected: keep an eye on what only the provider knows (aws:
        the spend against ``budget=``)."""

    def abort(self) -> None:
        """No host came up: undo what :meth:`Provider.ensure` created for this call."""

    def object_store(self) -> ObjectStoreAccess | None:
        """Where large arguments can be staged once for every host (aws: S3 in the
        cluster's region), or None: each host gets them over SSH."""
        return None

    def connect(self, host: HostTarget, config: CloudConfig) -> SSHConnection:
        """A verified login to ``host``, waiting as long as this fleet's hosts need."""
        return host.connect(self.connect_timeout or config.connect_timeout
                            or DEFAULT_CONNECT_TIMEOUT)

    def job_cluster(self, config: CloudConfig, python: str, detach: bool,
                    common: dict[str, str]) -> JobCluster:
        """How a ``run -n N`` job on the first host reaches all N hosts (itself
        included): the job backend's settings and files (``jobs/siblings.py``).
        ``common``: settings every job backend gets."""
        raise ProviderError(f"provider {config.provider!r} cannot run one job across "
                            f"{len(self.hosts)} machines: run it with -n 1")

    def job_storage(self, config: CloudConfig, record: JobRecord,
                    max_output: int) -> dict[str, Any]:
        """Start options that keep a job's outputs and the shared directory beyond its
        machine (aws: in the bucket; may note where in ``record``); {} keeps both on the
        job's first host."""
        return {}


class ObjectStoreAccess(Protocol):
    """A store the client uploads objects to once and the hosts download from by URL,
    with no credentials of their own (``client/staging.py``)."""

    #: Where, for messages ("s3://bucket (eu-west-1)").
    where: str

    def ensure(self, digest: str, segments: list[bytes | memoryview], nbytes: int) -> bool:
        """The object named ``digest`` (its bytes: ``segments``) is in the store, kept
        for this cluster; True when this call uploaded it."""

    def url(self, digest: str, expires: float) -> str:
        """A GET URL for the object, good for ``expires`` seconds."""


class ProviderError(ConfigError):
    """A provider cannot do what the configuration asks of it."""


class Provider:
    """The interface every kind of machine implements: :meth:`ensure`, :meth:`status`
    and :meth:`down` always; the rest where the defaults (your own machines, kept as they
    are, reached by SSH) do not fit."""

    name: str = ""
    #: joblib-cloud made the hosts' Python environment, so it may add to it:
    #: ``sync_packages`` is on by default (elsewhere the environment is the user's own).
    manages_environment = False
    #: ``connect_timeout`` when none is set (None: the fleet decides, e.g. aws waits
    #: ``boot_timeout`` for a VM's boot).
    default_connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT
    #: ``image=`` runs the agent and jobs in that Docker image on the hosts.
    runs_images = True
    #: Seconds to try a job's machine again (``pull``, ``logs``, ``forward``): short where
    #: a gone machine's outputs are kept elsewhere (:meth:`saved_outputs`).
    reattach_timeout = 20.0
    #: Where :meth:`saved_outputs` finds them, for messages.
    saved_where = "the provider's store"

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        """Hosts for ``config``: found again, or made (launched) when missing."""
        raise NotImplementedError

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """``joblib-cloud status``: what exists and whether it answers; an exit code."""
        raise NotImplementedError

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """``joblib-cloud down``: remove what this provider created; an exit code."""
        raise NotImplementedError

    def validate(self, values: dict[str, Any], origin: Callable[[str], str]) -> None:
        """Check the settings this provider reads (``values``: every setting, parsed;
        ``origin(name)`` says where one came from); raise ValueError saying the fix."""

    def describe(self, config: CloudConfig) -> str:
        """The cluster in one line, as its handle and ``status`` title it."""
        return f"cluster {config.cluster!r} ({config.provider})"

    def clock_lines(self, config: CloudConfig, rows: list[dict[str, str]]) -> list[str]:
        """What stops the machines (and what they cost), for the cluster's handle."""
        return ["its agents stop when this program leaves (the machines are yours)"]

    def machine_rows(self, config: CloudConfig) -> list[dict[str, str]] | None:
        """The machines as ``status`` lists them, or None: the connected hosts are all
        there is to show."""
        return None

    def scale(self, config: CloudConfig) -> None:
        """Before the cluster is connected again with ``config.n`` machines: remove those
        beyond it (or refuse: raise saying why)."""

    def up_message(self, config: CloudConfig) -> str:
        """What ``joblib-cloud up`` says once every host answered."""
        return f"cluster {config.cluster!r} is up ({config.provider}): every host answered"

    def run_note(self, config: CloudConfig, n: int | None) -> str | None:
        """A note for ``run -n N`` when this provider does not take N as asked."""
        return None

    def job_config(self, config: CloudConfig) -> CloudConfig:
        """The configuration a ``run`` job's cluster is made with (aws, -n N: the
        machines' boot installs what the job's backend needs to reach its siblings)."""
        return config

    def shared_directory(self, config: CloudConfig) -> Any | None:
        """The cluster's shared directory as ``joblib-cloud shared`` sees it, or None: a
        directory on the cluster's first host (``jobs/shared.HostShared``)."""
        return None

    def saved_outputs(self, record: JobRecord, path: str, into: Path,
                      max_bytes: int) -> tuple[Path, list[str], int] | None:
        """A job's outputs kept beyond its machine, copied to ``into`` (where, names,
        bytes), or None when this provider keeps none."""
        return None


#: name -> the provider's class, or "module:class" imported on first use (hosts have no
#: boto3, for one).
PROVIDERS: dict[str, str | type[Provider]] = dict(_builtin.BUILTIN)
DEFAULT_PROVIDER = _builtin.DEFAULT
_loaded: dict[str, Provider] = {}


def register_provider(name: str, cls: type[Provider] | str) -> None:
    """Make ``provider=name`` mean ``cls`` (a :class:`Provider` subclass, or
    ``"module:Class"``), for the backend, ``run`` and the CLI alike."""
    if not name or name != name.strip().lower():
        raise ValueError(f"provider name {name!r}: use lower-case letters, no spaces")
    PROVIDERS[name] = cls
    _loaded.pop(name, None)


def provider(name: str) -> Provider:
    if name not in _loaded:
        if name not in PROVIDERS:
            raise ConfigError(f"unknown provider {name!r}; choose one of "
                              f"{', '.join(PROVIDERS)}")
        entry = PROVIDERS[name]
        if isinstance(entry, str):
            module, _, cls = entry.partition(":")
            entry = getattr(importlib.import_module(module), cls)
        instance = entry()
        instance.name = name
        _loaded[name] = instance
    return _loaded[name]


# ------------------------------------------------------------------- address hooks

AddressHook = Callable[[Any], tuple[str, int]]
_hooks: dict[tuple[str, str], AddressHook] = {}


def set_address_hook(fn: AddressHook | None, provider: str | None = None) -> None:
    """Decide where SSH reaches each machine of ``provider`` (default: the default
    provider); ``None`` restores the provider's own rule."""
    _set("address", fn, provider)


def set_sibling_hook(fn: AddressHook | None, provider: str | None = None) -> None:
    """Decide where a job's machine reaches its siblings (``None`` restores the
    provider's own rule)."""
    _set("sibling", fn, provider)


def _set(kind: str, fn: AddressHook | None, provider: str | None) -> None:
    key = (provider or DEFAULT_PROVIDER, kind)
    if fn is None:
        _hooks.pop(key, None)
    else:
        _hooks[key] = fn


def hook(provider: str, kind: str) -> AddressHook | None:
    """The hook set for ``provider`` (``kind``: "address" or "sibling"), if any."""
    return _hooks.get((provider, kind))
