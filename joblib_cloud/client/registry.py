"""Turn a config into a connected :class:`Cluster`, and keep it for the next call.

Whatever the provider, it ends the same way: an agent stream per host, handed to a
:class:`Cluster`.
Clusters are kept in a registry keyed by what defines the fleet, so consecutive ``with
parallel_backend('cloud')`` blocks and GridSearchCV's several ``Parallel`` calls reuse the
same connections and agents.  Lifetime: until the interpreter exits (``atexit``), or until
the hosts stop after ``idle_timeout`` without work (the agents exit, the VMs power off):
then the next call connects again, launching what no longer runs, and says so.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import provisioner
from ..config import FLEET_FIELDS, CloudConfig  # FLEET_FIELDS: Setting.fleet
from ..jobs.docker import docker_python
from ..provisioner import Fleet, HostTarget
from .board import installing
from .cluster import Cluster
from .link_rates import delivery_rate
from .progress import Progress
from .session import HostSession
from .staging import Staging
from .streams import LocalAgent

log = logging.getLogger("joblib_cloud")

#: A fleet's settings: what makes two configurations the same cluster.
FleetKey = tuple[Any, ...]

_registry: dict[FleetKey, Cluster] = {}
_registry_lock = threading.Lock()
_connect_locks: dict[FleetKey, threading.Lock] = {}


def fleet_key(config: CloudConfig) -> FleetKey:
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
        stopped = cluster.expired() if cluster is not None else ""
        if cluster is not None and stopped:
            log.warning("cluster %r %s: connecting again", config.cluster, stopped)
            cluster.close()
        elif cluster is not None and cluster.usable:
            if cluster.staging is not None:
                cluster.staging.mode = config.staging
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
    """Ask the configured provider for its hosts, start an agent on each in parallel, and
    return the cluster as soon as the first host is ready: the others join as they come
    up, and one that never does is dropped with a warning (``Cluster.give_up_on``).  Only
    when no host comes up does this fail, with every host's reason, after undoing what
    the provider made for it."""
    progress = progress or Progress(config.verbose,
                                    title=f"cluster {config.cluster!r} ({config.provider})")
    try:
        fleet = provisioner.provider(config.provider).ensure(config, progress)
    except BaseException:
        progress.abandon()
        raise
    progress.board.spent = fleet.spent
    config = config.replace(python=config.python or fleet.python,
                            connect_timeout=fleet.connect_timeout or config.connect_timeout)
    cluster = Cluster(config, fleet.workers_per_host)
    cluster.progress = progress
    cluster.announce_first_result = len(fleet.hosts) > 1
    cluster.boot_installs_packages = fleet.boot_installs_packages
    store = fleet.object_store()
    if store is not None:
        cluster.staging = Staging(store, config.staging)
    install = _installs_configured(config, fleet.boot_installs_packages)
    total = len(fleet.hosts)
    cluster.expect(total)
    for target in fleet.hosts:
        threading.Thread(target=_join, args=(cluster, fleet, target, config, progress, total,
                                             install),
                         daemon=True, name=f"joblib-cloud-connect-{target.name}").start()
    try:
        cluster.wait_for_first_host()
    except BaseException:
        cluster.close()
        fleet.abort()  # never leave a VM we just launched
        progress.abandon()
        raise
    fleet.watch(cluster, config)
    return cluster


def _join(cluster: Cluster, fleet: Fleet, target: HostTarget, config: CloudConfig,
          progress: Progress, total: int, install: bool) -> None:
    """Connect one host (with ``install``, install packages= and requirements= there
    before any batch) and hand it to the cluster, or tell the cluster it never came."""
    progress.host(target.name, "booting" if target.check is not None else "connecting")
    try:
        session = _opener(cluster, target)(config)
        try:
            progress.host(target.name, "starting agent")
            session.handshake(config)
            if cluster.staging is not None and session.connection is not None:
                # the agent just went over this connection: the kernel knows how fast
                cluster.staging.link.estimated(
                    delivery_rate(session.connection.transport.sock))
            if install:
                progress.host(target.name, "installing")
                session.packages.install_configured(config)
            fleet.ready(target)
        except BaseException:
            session.close()
            raise
    except BaseException as exc:  # noqa: BLE001 - the cluster reports it
        closed = cluster.closed  # then the failure is only the close, not the host's
        cluster.give_up_on(target.name, exc)
        if not closed and (cluster.alive_hosts or cluster.joining):
            try:
                fleet.drop(target)
            except Exception as error:  # noqa: BLE001 - the call goes on; say what is left
                log.warning("could not release host %s (%s): if it is a cloud machine, "
                            "`joblib-cloud down` removes it", target.name, error)
        return
    cluster.join(session)
    progress.host(target.name, "ready", session.workers, installing(session.hello))
    ready = len(cluster.alive_hosts)
    spent = fleet.spent()
    message = (f"{ready} of {total} hosts ready, {cluster.n_workers} workers"
               + ("" if spent is None else f", ${spent:.2f} so far"))
    (progress.done if ready + len(cluster.failures) == total else progress.update)(message)


def _installs_configured(config: CloudConfig, boot_installs: bool) -> bool:
    """Whether the client installs packages= and requirements= on connected hosts: with
    sync_packages, where the hosts' boot did not (ssh, local)."""
    return (config.sync_packages and not boot_installs
            and bool(config.packages or config.requirements))


def install_configured_everywhere(sessions: list[HostSession], config: CloudConfig) -> None:
    """``HostPackages.install_configured`` on every host at once."""
    if not sessions:
        return
    with ThreadPoolExecutor(max_workers=min(len(sessions), 32)) as pool:
        futures = [pool.submit(s.packages.install_configured, config) for s in sessions]
    for future in futures:
        future.result()


Opener = Callable[[CloudConfig], HostSession]


def _opener(cluster: Cluster, target: HostTarget) -> Opener:
    """How to start one host's agent: a subprocess here, or over a verified SSH login."""
    def local(config: CloudConfig) -> HostSession:
        python = config.python or sys.executable
        return HostSession(cluster, target.name,
                           lambda on_stderr: LocalAgent(target.name, python, on_stderr))

    def ssh(config: CloudConfig) -> HostSession:
        from .ssh import SSHAgent

        connection = target.connect(config.connect_timeout
                                    or provisioner.DEFAULT_CONNECT_TIMEOUT)
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
