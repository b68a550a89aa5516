"""Turn a config into a connected :class:`Cluster`, and keep it for the next call.

Whatever the provider, it ends the same way: an agent stream per host, handed to a
:class:`Cluster`.
Clusters are kept in a registry keyed by what defines the fleet, so consecutive ``with
parallel_backend('cloud')`` blocks and GridSearchCV's several ``Parallel`` calls reuse the
same connections and agents.  Lifetime: until the interpreter exits (``atexit``); the VMs
themselves stop on their own idle timer or with ``joblib-cloud down``.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from .. import provisioner
from ..config import CloudConfig
from ..errors import GaveUpWaitingError, HostConnectError
from ..jobs.docker import docker_python
from ..provisioner import HostTarget
from .cluster import Cluster
from .packages import install_configured_everywhere
from .progress import Progress
from .session import HostSession
from .streams import LocalAgent

_registry: dict[tuple, Cluster] = {}
_registry_lock = threading.Lock()
_connect_locks: dict[tuple, threading.Lock] = {}

#: Settings that define a fleet and how the client talks to it: any difference means
#: another cluster (a changed heartbeat or cache size must not be silently ignored).
#: ``sync_packages`` is not one: it changes neither the hosts nor how they are reached and
#: spoken to, only what the client does when a batch misses a module (each batch carries
#: its own setting) and whether packages= get installed, which ``get_cluster`` also does
#: on a cluster it reuses.  So turning it on does not start a second set of agents.
FLEET_FIELDS = ("provider", "cluster", "hosts", "n", "instance", "region", "python",
                "workers_per_host", "image_id", "image", "user", "ssh_key", "known_hosts",
                "spot", "heartbeat_timeout", "max_result_size", "cache_threshold",
                "cache_size", "subnet_id", "security_group_id")


def fleet_key(config: CloudConfig) -> tuple:
    return tuple(getattr(config, name) for name in FLEET_FIELDS)


def get_cluster(config: CloudConfig) -> Cluster:
    """The connected cluster for ``config``: reused when alive, connected otherwise.

    One lock per fleet: a slow EC2 launch for one cluster never blocks another.
    """
    key = fleet_key(config)
    with _registry_lock:
        lock = _connect_locks.setdefault(key, threading.Lock())
    with lock:
        with _registry_lock:
            cluster = _registry.get(key)
        if cluster is not None and cluster.alive_hosts and not cluster.closed:
            if _installs_configured(config, cluster.boot_installs_packages):
                install_configured_everywhere(cluster.alive_hosts, config)
            return cluster
        cluster = connect(config)
        with _registry_lock:
            _registry[key] = cluster
        return cluster


def close_all() -> None:
    with _registry_lock:
        clusters = list(_registry.values())
        _registry.clear()
    for cluster in clusters:
        cluster.close()


atexit.register(close_all)


def connect(config: CloudConfig, progress: Progress | None = None) -> Cluster:
    """Ask the configured provider for its hosts, then connect and start an agent on each
    (in parallel, all or nothing: a failure undoes what the provider made for this)."""
    progress = progress or Progress(config.verbose)
    fleet = provisioner.provider(config.provider).ensure(config, progress)
    config = config.replace(python=config.python or fleet.python,
                            connect_timeout=fleet.connect_timeout or config.connect_timeout)
    cluster = Cluster(config)
    cluster.boot_installs_packages = fleet.boot_installs_packages
    openers = [(target.name, _opener(cluster, target)) for target in fleet.hosts]
    install = _installs_configured(config, fleet.boot_installs_packages)
    try:
        hosts = _open_all(openers, config, progress, install)
    except BaseException:
        fleet.abort()  # never leave a VM we just launched
        raise
    fleet.ready()
    cluster.attach(hosts)
    progress.done(f"{len(hosts)}/{len(openers)} hosts connected, {cluster.n_workers} workers")
    return cluster


def _installs_configured(config: CloudConfig, boot_installs: bool) -> bool:
    """Whether the client installs packages= and requirements= on connected hosts: with
    sync_packages, where the hosts' boot did not (ssh, local)."""
    return (config.sync_packages and not boot_installs
            and bool(config.packages or config.requirements))


Opener = Callable[[CloudConfig], HostSession]


def _opener(cluster: Cluster, target: HostTarget) -> Opener:
    """How to start one host's agent: a subprocess here, or over a verified SSH login."""
    def local(config: CloudConfig) -> HostSession:
        python = config.python or sys.executable
        return HostSession(cluster, target.name,
                           lambda on_stderr: LocalAgent(target.name, python, on_stderr))

    def ssh(config: CloudConfig) -> HostSession:
        from .ssh import SSHAgent, SSHConnection

        connection = SSHConnection(target.spec, key_path=target.ssh_key,
                                   known_hosts=target.known_hosts,
                                   connect_timeout=config.connect_timeout,
                                   retry_auth=target.retry_auth, check=target.check,
                                   timeout_advice=target.timeout_advice)
        python = config.python or "python3"
        if config.image:  # the agent runs inside that Docker image on the VM
            python = docker_python(config.image, python)
        try:
            return HostSession(cluster, target.name,
                               lambda on_stderr: SSHAgent(connection, python, on_stderr),
                               connection)
        except BaseException:
            connection.close()
            raise

    return local if target.spec is None else ssh


def _open_all(openers: list[tuple[str, Opener]], config: CloudConfig, progress: Progress,
              install: bool = False) -> list[HostSession]:
    """Connect and handshake every host in parallel (then, with ``install``, install
    packages= and requirements= there before any batch); all or nothing."""
    done: list[HostSession] = []
    errors: list[tuple[str, BaseException]] = []
    lock = threading.Lock()
    abandoned = threading.Event()

    def one(name: str, opener: Opener) -> None:
        try:
            session = opener(config)
            try:
                session.handshake(config)
                if install:
                    session.packages.install_configured(config)
            except BaseException:
                session.close()
                raise
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            with lock:
                errors.append((name, exc))
            return
        with lock:
            if abandoned.is_set():  # the caller gave up (Ctrl-C): don't leak the session
                session.close()
                return
            done.append(session)
            progress.update(f"{len(done)}/{len(openers)} hosts connected")

    pool = ThreadPoolExecutor(max_workers=min(len(openers), 32))
    try:
        futures_wait([pool.submit(one, name, opener) for name, opener in openers])
    except BaseException:
        # Ctrl-C must not wait for every connect to time out (10 min on a booting VM).
        with lock:
            abandoned.set()
            for session in done:
                session.close()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if errors:
        for session in done:
            session.close()
        # Hosts that only stopped waiting because another failed: report the cause.
        errors = [e for e in errors if not isinstance(e[1], GaveUpWaitingError)] or errors
        first = errors[0][1]
        if len(errors) == 1:
            raise first
        message = "; ".join(f"{name}: {exc}" for name, exc in errors)
        raise HostConnectError(f"{len(errors)} hosts failed to connect: {message}") from first
    order = {name: i for i, (name, _) in enumerate(openers)}
    return sorted(done, key=lambda s: order[s.name])
