"""A cluster as an object, for notebooks: ``joblib_cloud.status(**settings)``.

Its ``_repr_html_`` (and its text ``repr``) shows the machines as ``joblib-cloud status``
lists them (the same rows and columns: ``Provider.machine_rows``), what this
program runs on them (workers, batches running and queued), the idle and lifetime clocks
and the budget.  Its methods act on the cluster: :meth:`CloudCluster.scale`,
:meth:`CloudCluster.down`, and :meth:`CloudCluster.forward` to reach a job's port.
"""

from __future__ import annotations

import argparse
import html
from typing import Any

from .client import registry
from .config import CloudConfig, resolve_config
from .errors import ConfigError
from .provisioner import Provider, provider

#: Columns of the machines table: those of ``joblib-cloud status`` that matter in one
#: cluster's view (its name and region are in the title), then what this program runs.
MACHINE_COLUMNS = ["instance", "state", "type", "market", "age", "usd_per_hour",
                   "usd_so_far"]
WORK_COLUMNS = ["workers", "running"]
#: What a person reads above a column (the rows keep the CLI's field names).
HEADINGS = {"usd_per_hour": "$/h", "usd_so_far": "spent"}


def status(**settings: Any) -> CloudCluster:
    """The configured cluster (keywords as for the backend), to look at and act on."""
    return CloudCluster(**settings)


class CloudCluster:
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: CloudConfig = resolve_config(**settings)

    @property
    def provider(self) -> Provider:
        return provider(self.config.provider)

    # -- what it is --------------------------------------------------------------------
    def connected(self) -> Any:
        """This program's connection to the cluster (a ``client.cluster.Cluster``), if any;
        never connects."""
        with registry._registry_lock:
            cluster = registry._registry.get(registry.fleet_key(self.config))
        return cluster if cluster is not None and cluster.usable else None

    def machines(self) -> list[dict[str, str]]:
        """One row per machine: the rows of ``joblib-cloud status --cluster`` where the
        provider lists its machines (aws), else the hosts this program is connected to."""
        rows = self.provider.machine_rows(self.config)
        cluster = self.connected()
        if rows is None:
            rows = [{"instance": h.name, "state": "connected" if h.alive else "lost",
                     "type": self.config.provider, "market": "-", "age": "-",
                     "usd_per_hour": "-", "usd_so_far": "-", "launched": ""}
                    for h in (cluster.hosts if cluster is not None else [])]
        hosts = {h.name: h for h in cluster.alive_hosts} if cluster is not None else {}
        for row in rows:
            host = hosts.get(row["instance"])
            row["workers"] = str(host.workers) if host is not None else "-"
            row["running"] = str(len(host.inflight)) if host is not None else "-"
        return rows

    def clocks(self, rows: list[dict[str, str]]) -> list[str]:
        """What stops the machines (idle and lifetime rules, the budget), and what this
        program runs on them."""
        lines = self.provider.clock_lines(self.config, rows)
        cluster = self.connected()
        if cluster is None:
            lines.append("this program is not connected to it")
        else:
            with cluster.lock:
                running = sum(len(h.inflight) for h in cluster.alive_hosts)
                queued = len(cluster.pending)
            lines.append(f"this program: {cluster.n_workers} workers on "
                         f"{len(cluster.alive_hosts)} hosts, {running} batches running, "
                         f"{queued} queued")
        return lines

    def _title(self) -> str:
        return self.provider.describe(self.config)

    def text(self) -> str:
        from .cli.table import table

        rows = self.machines()
        columns = MACHINE_COLUMNS + WORK_COLUMNS
        body = (table([[HEADINGS.get(c, c) for c in columns]]
                      + [[r[c] for c in columns] for r in rows]) if rows
                else "no machines")
        return "\n".join([self._title(), body, *self.clocks(rows)])

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        rows = self.machines()
        columns = MACHINE_COLUMNS + WORK_COLUMNS
        cell = "padding:2px 10px 2px 0;text-align:left;border:none"
        head = "".join(f"<th style='{cell}'>{html.escape(HEADINGS.get(c, c))}</th>"
                       for c in columns)
        body = "".join("<tr>" + "".join(f"<td style='{cell}'>{html.escape(r[c])}</td>"
                                        for c in columns) + "</tr>" for r in rows)
        table = (f"<table style='border-collapse:collapse;margin:4px 0'><tr>{head}</tr>"
                 f"{body}</table>" if rows else "<div>no machines</div>")
        notes = "".join(f"<div style='color:#656d76'>{html.escape(line)}</div>"
                        for line in self.clocks(rows))
        from .client.notebook import BOX

        return (f'<div class="joblib-cloud-status" style="{BOX}"><div style="font-weight:600">'
                f"joblib-cloud {html.escape(self._title())}</div>{table}{notes}</div>")

    # -- what it does ------------------------------------------------------------------
    def scale(self, n: int) -> CloudCluster:
        """Have ``n`` machines: the missing ones launched (aws) or started (local) and
        connected, the newest beyond ``n`` terminated.  Returns this handle."""
        if n < 1:
            raise ConfigError(f"n={n}: a cluster has at least one machine (down() removes it)")
        old = self.connected()
        new = resolve_config(**{**self.settings, "n": n})
        self.provider.scale(new)
        if old is not None:
            old.close()
        self.settings, self.config = {**self.settings, "n": n}, new
        registry.get_cluster(new).wait_until_settled()
        return self

    def down(self) -> int:
        """Disconnect and remove the cluster (aws: machines, security group, staged
        objects, keys), as ``joblib-cloud down --cluster NAME --yes``."""
        cluster = self.connected()
        if cluster is not None:
            cluster.close()
        args = argparse.Namespace(all=False, yes=True, dry_run=False, all_regions=False,
                                  region=self.config.region, cluster=self.config.cluster)
        return self.provider.down(self.config, args, print)

    def forward(self, job: str, remote: int, local: int | None = None) -> Any:
        """Reach port ``remote`` of a running job at http://127.0.0.1:LOCAL/ until
        ``.close()`` (or the end of this program); shows as a link."""
        from .jobs.forwarding import open_forward

        return open_forward(job, remote, local)
