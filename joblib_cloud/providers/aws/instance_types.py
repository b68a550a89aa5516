"""Instance aliases (``C16``, ``M8``, ``R4``) and a rough price table.

Users think in cores and memory, not EC2 names: ``C<n>`` is an n-vCPU compute-optimised
machine (2 GiB/vCPU), ``M<n>`` general purpose (4 GiB/vCPU), ``R<n>`` memory-optimised
(8 GiB/vCPU).  Any literal EC2 type (``c7g.large``) is accepted too; both are checked
against ``describe_instance_types`` before anything is launched, so a typo never costs
a half-launched cluster.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

#: Alias letter -> (EC2 family, GiB per vCPU, on-demand USD per vCPU-hour in us-east-1).
FAMILIES: dict[str, tuple[str, int, float]] = {
    "C": ("c6i", 2, 0.0425),
    "M": ("m6i", 4, 0.048),
    "R": ("r6i", 8, 0.063),
}
#: vCPUs -> EC2 size name, for the families above.
SIZES: dict[int, str] = {2: "large", 4: "xlarge", 8: "2xlarge", 16: "4xlarge", 32: "8xlarge",
                         48: "12xlarge", 64: "16xlarge", 96: "24xlarge", 128: "32xlarge"}
#: Extra families for literal types, USD per vCPU-hour (us-east-1 on-demand, rounded).
EXTRA_PRICES: dict[str, float] = {
    "c5": 0.0425, "c6a": 0.0383, "c7i": 0.0446, "c7a": 0.0513, "c6g": 0.034, "c7g": 0.0363,
    "m5": 0.048, "m6a": 0.0432, "m7i": 0.0504, "m7a": 0.0580, "m6g": 0.0385, "m7g": 0.0408,
    "r5": 0.063, "r6a": 0.0567, "r7i": 0.0662, "r7a": 0.0760, "r6g": 0.0504, "r7g": 0.0536,
    "t3": 0.0208, "t3a": 0.0188,
}
_ALIAS_RE = re.compile(r"^([A-Za-z])(\d+)$")


@dataclasses.dataclass(frozen=True)
class InstanceType:
    """A validated EC2 instance type."""

    name: str
    vcpus: int
    memory_gib: float
    alias: str | None = None
    arch: str = "x86_64"


def aliases() -> list[tuple[str, str, int, int]]:
    """Every alias as (alias, EC2 type, vCPUs, memory GiB)."""
    return [(f"{letter}{vcpus}", f"{family}.{size}", vcpus, vcpus * gib)
            for letter, (family, gib, _) in FAMILIES.items()
            for vcpus, size in SIZES.items()]


def valid_aliases() -> str:
    return ", ".join(alias for alias, *_ in aliases())


def hourly_price(type_name: str, vcpus: int) -> float | None:
    family = type_name.split(".")[0]
    per_vcpu = {fam: price for fam, _, price in FAMILIES.values()}.get(family)
    per_vcpu = per_vcpu if per_vcpu is not None else EXTRA_PRICES.get(family)
    return None if per_vcpu is None else round(per_vcpu * vcpus, 4)


def type_price(type_name: str) -> float | None:
    """Estimate from the type name alone (``c6i.4xlarge`` -> 16 vCPUs), for ``status``."""
    size = type_name.partition(".")[2]
    match = re.fullmatch(r"(\d*)xlarge", size)
    vcpus = (4 * int(match.group(1) or 1)) if match else {"large": 2, "medium": 2}.get(size)
    return None if vcpus is None else hourly_price(type_name, vcpus)


def resolve_name(instance: str) -> tuple[str, str | None]:
    """``C16`` -> (``c6i.4xlarge``, ``C16``); a literal type -> (type, None)."""
    text = instance.strip()
    match = _ALIAS_RE.match(text)
    if match:
        letter, vcpus = match.group(1).upper(), int(match.group(2))
        if letter in FAMILIES and vcpus in SIZES:
            return f"{FAMILIES[letter][0]}.{SIZES[vcpus]}", f"{letter}{vcpus}"
        raise ValueError(
            f"unknown instance alias {instance!r}. Valid aliases: {valid_aliases()}; "
            "or give a literal EC2 type such as 'c6i.4xlarge' (see `joblib-cloud instances`)")
    if not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+", text):
        raise ValueError(
            f"invalid instance {instance!r}: use an alias ({valid_aliases()}) or a literal "
            "EC2 type such as 'c6i.4xlarge'")
    return text, None


def validate(describe: Callable[..., dict[str, Any]], instance: str) -> InstanceType:
    """Resolve ``instance`` and confirm with EC2 (``describe`` is
    ``describe_instance_types``) that the type exists in this region."""
    name, alias = resolve_name(instance)
    try:
        found = describe(InstanceTypes=[name])["InstanceTypes"]
    except Exception as exc:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        if code != "InvalidInstanceType":
            raise
        found = []
    if not found:
        raise ValueError(
            f"EC2 instance type {name!r} (from instance={instance!r}) is not offered in this "
            f"region. Valid aliases: {valid_aliases()}; or pick a literal type listed by "
            "`aws ec2 describe-instance-types`.")
    info = found[0]
    archs = info.get("ProcessorInfo", {}).get("SupportedArchitectures") or ["x86_64"]
    return InstanceType(name=name, vcpus=int(info["VCpuInfo"]["DefaultVCpus"]),
                        memory_gib=info["MemoryInfo"]["SizeInMiB"] / 1024, alias=alias,
                        arch="arm64" if "arm64" in archs else "x86_64")
