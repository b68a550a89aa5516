"""A fake EC2 whose instances really boot: moto for the API, one guest per instance.

A test double around botocore (the one place every client call passes), never a special
case in product code:

- ``RunInstances``: moto answers, then a guest boots for each new instance, seeded with
  the user-data moto stored for it (exactly what EC2 would hand cloud-init), from the
  image family its ``ImageId`` stands for (:meth:`GuestEC2.register_image`; any other
  AMI boots Debian 12).
- ``TerminateInstances``: moto answers, and the guests power off (as EC2 stops a VM).
- A guest that powers itself off (kill switch, failed boot) becomes a terminated
  instance, with the state reason EC2 gives: ``Client.InstanceInitiatedShutdown``.
- ``GetConsoleOutput``: the guest's console, as boto3 returns it (botocore decodes EC2's
  base64 on the way).

The documented ``provisioner.set_address_hook`` points SSH at each guest's own loopback
address; nothing ever connects to an address moto hands out.
"""

from __future__ import annotations

import base64
import itertools
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import botocore.client
import pytest
from guests import FAMILIES, Guest, base_image, tools_missing
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.models.instances import StateReason

from joblib_cloud import provisioner

_addresses = itertools.count()  # guest addresses are never reused within a session
SELF_SHUTDOWN = ("Client.InstanceInitiatedShutdown",
                 "Client.InstanceInitiatedShutdown: Instance initiated shutdown")


class GuestEC2:
    def __init__(self, workdir: Path, region: str) -> None:
        self.workdir = workdir
        self.region = region
        self.guests: dict[str, Guest] = {}
        #: Seconds each next launched guest waits before it boots (a slow machine).
        self.boot_delays: list[float] = []
        #: AMI id -> guest image family (guests.FAMILIES); other AMIs boot ``bookworm``.
        self.images: dict[str, str] = {}
        #: Files (path -> text) every next guest's image holds (e.g. /etc/uv/uv.toml).
        self.image_files: dict[str, str] = {}
        #: Whether the guests launched next can run Docker containers (guests.Guest).
        self.docker = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the double
    def api_call(self, real, client, operation: str, params: dict[str, Any]) -> Any:
        if operation == "GetConsoleOutput" and params.get("InstanceId") in self.guests:
            guest = self.guests[params["InstanceId"]]
            tail = guest.console()[-64 * 1024:]  # EC2 keeps the last 64 KiB
            return {"InstanceId": guest.instance_id, "Timestamp": datetime.now(timezone.utc),
                    "Output": tail}
        response = real(client, operation, params)
        if operation == "RunInstances":
            family = self.images.get(params.get("ImageId", ""), "bookworm")
            for instance in response["Instances"]:
                self._boot(client, instance["InstanceId"], family)
        elif operation == "TerminateInstances":
            for iid in params.get("InstanceIds", []):
                guest = self.guests.get(iid)
                if guest is not None:
                    threading.Thread(target=guest.power_off, daemon=True).start()
        return response

    def register_image(self, family: str) -> str:
        """An AMI (in moto) whose instances boot guests of ``family``: pass it as
        ``image_id=``.  Builds that family's root filesystem if it is not cached yet."""
        import boto3

        base_image(family)
        ec2 = boto3.client("ec2", region_name=self.region)
        name = f"{FAMILIES[family]}-{family}-amd64"
        image_id = ec2.register_image(Name=name, Architecture="x86_64",
                                      RootDeviceName="/dev/xvda")["ImageId"]
        self.images[image_id] = family
        return image_id

    def _boot(self, client: Any, instance_id: str, family: str) -> None:
        user_data = client.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
        with self._lock:
            delay = self.boot_delays.pop(0) if self.boot_delays else 0.0
            guest = Guest(self.workdir, next(_addresses), base64.b64decode(user_data).decode(),
                          instance_id, delay=delay, family=family, files=self.image_files,
                          docker=self.docker)
            self.guests[instance_id] = guest
        guest.on_exit(self._powered_off)
        guest.start()

    def _powered_off(self, guest: Guest) -> None:
        """The VM stopped on its own: EC2 terminates it (shutdown behaviour terminate)."""
        backend = ec2_backends[DEFAULT_ACCOUNT_ID][self.region]
        try:
            instance = backend.get_instance(guest.instance_id)
        except Exception:  # noqa: BLE001 - already gone from moto
            return
        if instance.state not in ("terminated", "shutting-down"):
            backend.terminate_instances([guest.instance_id])
            instance.state_reason = StateReason(SELF_SHUTDOWN[1], SELF_SHUTDOWN[0])

    def address(self, instance: dict[str, Any]) -> tuple[str, int]:
        guest = self.guests[instance["InstanceId"]]
        return guest.address, guest.port

    def stop_all(self) -> None:
        threads = [threading.Thread(target=g.cleanup) for g in self.guests.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


@pytest.fixture(name="guest_ec2")
def guest_ec2_fixture(aws, monkeypatch, tmp_path):
    """moto (the ``aws`` fixture) whose instances are guests that really boot."""
    reason = tools_missing()
    if reason:
        pytest.fail(f"guests cannot run here: {reason} (.ci/run installs what they need)")
    base_image()
    fake = GuestEC2(tmp_path / "guests", aws.meta.region_name)
    real = botocore.client.BaseClient._make_api_call

    def wrapped(client, operation, params):
        return fake.api_call(real, client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", wrapped)
    provisioner.set_address_hook(fake.address)
    try:
        yield fake
    finally:
        fake.stop_all()
        provisioner.set_address_hook(None)
