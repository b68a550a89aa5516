"""Settings: keyword > ``JOBLIB_CLOUD_*`` environment > config file > default.

Every setting has one name used in all three places (``n`` ↔ ``JOBLIB_CLOUD_N`` ↔ ``n = 4``
in ``~/.joblib-cloud/config.toml``).  Values are validated here, once, so that a bad
value fails with a ``ConfigError`` (a ``ValueError``) naming the setting and where it
came from instead of surfacing later as an SSH or EC2 error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .providers import DEFAULT as DEFAULT_PROVIDER
from .wire import contract

ENV_PREFIX = "JOBLIB_CLOUD_"


def home_dir() -> Path:
    """Local state directory (keys, known hosts, cluster records): mode 0700, made so
    again if it was opened to others since (``mkdir``'s mode applies only when made)."""
    path = Path(contract.home())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file that is mode 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(str(value).strip())


def _to_float(value: Any) -> float:
    """A finite number: ``nan`` compares false with everything (an ``idle_timeout=nan``
    would never stop a machine) and ``inf`` is no bound."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20,
               "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}


def _to_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"1M"`` or ``"2 GB"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(_to_float(value))
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 1048576, '1M' or '2GB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _to_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return [str(item).strip() for item in value]
    raise ValueError(f"expected a list or a comma-separated string, got {value!r}")


def _to_opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    #: Defines a fleet and how the client talks to it: two configurations that differ in
    #: it are two clusters (a changed heartbeat or cache size must not be silently
    #: ignored).  ``sync_packages`` is not one: it changes neither the hosts nor how they
    #: are reached, only what the client does when a batch misses a module (each batch
    #: carries its own setting) and whether packages= get installed, which a reused
    #: cluster also does; so turning it on does not start a second set of agents.
    fleet: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("provider", DEFAULT_PROVIDER, str, "aws (default), ssh or local", fleet=True),
    Setting("instance", "C4", str, "C<n>/M<n>/R<n> alias or a literal EC2 type", fleet=True),
    Setting("n", 1, _to_int, "number of machines (hosts)", fleet=True),
    Setting("hosts", [], _to_list, "user@addr:port list for the ssh provider", fleet=True),
    Setting("cluster", "default", str, "cluster name: reuse key and tag value", fleet=True),
    Setting("region", None, _to_opt_str, "EC2 region (then AWS_REGION, AWS_DEFAULT_REGION)",
            fleet=True),
    Setting("spot", False, _to_bool, "spot instances, falling back to on-demand", fleet=True),
    Setting("idle_timeout", 600.0, _to_float,
            "seconds a host stays up with no work, a client attached or not"),
    Setting("no_client_timeout", 120.0, _to_float,
            "seconds a host stays up with no work once its last client left"),
    Setting("max_lifetime", 12 * 3600.0, _to_float, "seconds after which a VM always stops"),
    Setting("budget", None, lambda v: None if v is None else _to_float(v),
            "dollar cap for an aws cluster, held by the machines themselves"),
    Setting("boot_timeout", 1200.0, _to_float,
            "seconds a VM may take to boot and install before it stops itself"),
    Setting("workers_per_host", None, lambda v: None if v is None else _to_int(v),
            "worker processes per host (default: its CPU count)", fleet=True),
    Setting("python", None, _to_opt_str,
            "interpreter on the host (default: python3; this one for local)", fleet=True),
    Setting("ssh_key", None, _to_opt_str, "private key for ssh hosts", fleet=True),
    Setting("known_hosts", None, _to_opt_str,
            "known-hosts file for ssh hosts (default ~/.ssh/known_hosts)", fleet=True),
    Setting("connect_timeout", None, lambda v: None if v is None else _to_float(v),
            "seconds to keep retrying a host that does not accept SSH yet (default 60; "
            "on aws boot_timeout)"),
    Setting("heartbeat_timeout", 30.0, _to_float,
            "seconds of silence after which a host counts as lost", fleet=True),
    Setting("cache_threshold", 2**20, _to_size,
            "arguments at least this large are cached on each host by content", fleet=True),
    Setting("cache_size", 8 * 2**30, _to_size, "bytes of cached arguments per host (LRU)",
            fleet=True),
    Setting("staging", "auto", lambda v: str(v).strip().lower(),
            "large arguments through the cloud's object store (aws: S3), sent once for all "
            "hosts: auto (when cheaper than over SSH to each host), always, or never"),
    Setting("max_result_size", 512 * 2**20, _to_size,
            "largest pickled batch result a host sends back", fleet=True),
    Setting("verbose", False, _to_bool, "progress lines even when not on a terminal"),
    Setting("image_id", None, _to_opt_str, "EC2 AMI id (default: current Amazon Linux)",
            fleet=True),
    Setting("packages", [], _to_list, "extra pip packages to install on the hosts"),
    Setting("requirements", None, _to_opt_str, "requirements file to install on the hosts"),
    Setting("sync_packages", None, lambda v: None if v is None else _to_bool(v),
            "install on a host the client's version of a package a task misses there "
            "(default: on for aws, off for ssh and local)"),
    Setting("ingress_cidr", None, _to_opt_str, "CIDR allowed to reach port 22 on EC2 hosts"),
    Setting("subnet_id", None, _to_opt_str,
            "EC2 subnet to launch in (default: the default VPC's subnets)", fleet=True),
    Setting("security_group_id", None, _to_opt_str,
            "existing EC2 security group to use instead of the cluster's own", fleet=True),
    Setting("image", None, _to_opt_str, "Docker image the agent runs in on each VM", fleet=True),
    Setting("user", None, _to_opt_str, "SSH user on EC2 hosts (default from the image)",
            fleet=True),
    Setting("shutdown_command", "sudo shutdown -h now", str,
            "what the on-VM kill switch runs"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
FLEET_FIELDS = tuple(s.name for s in SETTINGS if s.fleet)
STAGING_MODES = ("auto", "always", "never")


def config_file_path() -> Path:
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    return Path(explicit) if explicit else home_dir() / "config.toml"


def _toml_module() -> Any:
    """``tomllib`` (3.11+) or the ``tomli`` backport, imported only when a config file
    is read: hosts import this module too (the agent's package) and have neither."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ModuleNotFoundError:
        raise ConfigError("reading a config file on Python 3.10 needs the 'tomli' package: "
                         "pip install tomli (joblib-cloud's own install brings it)") from None
    return tomli


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    tomllib = _toml_module()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"valid settings: {', '.join(SETTINGS_BY_NAME)}"
        )
    return data


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    """Resolved, validated settings.  Build with :func:`resolve_config`."""

    provider: str
    instance: str
    n: int
    hosts: tuple[str, ...]
    cluster: str
    region: str | None
    spot: bool
    idle_timeout: float
    no_client_timeout: float
    max_lifetime: float
    budget: float | None
    boot_timeout: float
    workers_per_host: int | None
    python: str | None
    ssh_key: str | None
    known_hosts: str | None
    #: ``None`` when not set and the provider has no default of its own
    #: (``Provider.default_connect_timeout``): its fleet decides (aws: ``boot_timeout``).
    connect_timeout: float | None
    heartbeat_timeout: float
    cache_threshold: int
    cache_size: int
    staging: str
    max_result_size: int
    verbose: bool
    image_id: str | None
    packages: tuple[str, ...]
    requirements: str | None
    sync_packages: bool
    ingress_cidr: str | None
    subnet_id: str | None
    security_group_id: str | None
    image: str | None
    user: str | None
    shutdown_command: str

    def replace(self, **changes: Any) -> CloudConfig:
        return resolve_config(**{**dataclasses.asdict(self), **changes}, _environ={},
                              _file={})


def resolve_config(
    _environ: Mapping[str, str] | None = None,
    _file: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> CloudConfig:
    """Merge keyword arguments, environment and config file; validate everything."""
    unknown = sorted(set(kwargs) - set(SETTINGS_BY_NAME))
    if unknown:
        raise TypeError(
            f"unknown joblib-cloud setting(s): {', '.join(unknown)}. "
            f"Valid settings: {', '.join(SETTINGS_BY_NAME)}"
        )
    environ = os.environ if _environ is None else _environ
    file_values = _read_config_file(config_file_path()) if _file is None else _file
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if kwargs.get(setting.name) is not None:
            raw, origin = kwargs[setting.name], f"keyword {setting.name}="
        elif environ.get(setting.env, "").strip() != "":
            raw, origin = environ[setting.env], f"environment variable {setting.env}"
        elif setting.name in file_values:
            raw, origin = file_values[setting.name], f"config file setting {setting.name}"
        else:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid value {raw!r} for {origin}: {exc}") from None
        values.setdefault("_origin", {})[setting.name] = origin
    origins: dict[str, str] = values.pop("_origin", {})
    if values["region"] is None:
        values["region"] = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    _validate(values, origins)
    values["hosts"] = tuple(values["hosts"])
    values["packages"] = tuple(values["packages"])
    return CloudConfig(**values)


def _validate(values: dict[str, Any], origins: dict[str, str]) -> None:
    def fail(name: str, message: str) -> None:
        origin = origins.get(name, f"setting {name}")
        raise ConfigError(f"invalid value {values[name]!r} for {origin}: {message}")

    values["provider"] = values["provider"].strip().lower()
    from .provisioner import PROVIDERS, provider

    if values["provider"] not in PROVIDERS:
        fail("provider", f"unknown provider; choose one of {', '.join(PROVIDERS)}")
    chosen = provider(values["provider"])
    if values["sync_packages"] is None:
        values["sync_packages"] = chosen.manages_environment
    if values["n"] < 1:
        fail("n", "the number of machines must be at least 1")
    if values["workers_per_host"] is not None and values["workers_per_host"] < 1:
        fail("workers_per_host", "must be at least 1 (or unset for one per CPU)")
    if values["connect_timeout"] is None:
        values["connect_timeout"] = chosen.default_connect_timeout
    for name in ("idle_timeout", "no_client_timeout", "max_lifetime", "boot_timeout",
                 "connect_timeout", "heartbeat_timeout"):
        if values[name] is not None and values[name] <= 0:
            fail(name, "must be a positive number of seconds")
    if values["budget"] is not None and values["budget"] <= 0:
        fail("budget", "must be a positive number of dollars")
    if values["staging"] not in STAGING_MODES:
        fail("staging", f"choose one of {', '.join(STAGING_MODES)}")
    for name in ("cache_threshold", "cache_size", "max_result_size"):
        if values[name] <= 0:
            fail(name, "must be a positive size")
    for name, prefix in (("subnet_id", "subnet"), ("security_group_id", "sg")):
        if values[name] is not None and not re.fullmatch(prefix + r"-[0-9a-f]{8,17}",
                                                         values[name]):
            fail(name, f"expected an id such as '{prefix}-0123456789abcdef0'")
    if values["user"] is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}",
                                                       values["user"]):
        fail("user", "expected a Unix user name such as 'ec2-user' or 'ubuntu'")
    if values["image"] is not None:
        from .jobs.docker import check_image

        try:
            values["image"] = check_image(values["image"])
        except ValueError as exc:
            fail("image", str(exc))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", values["cluster"]):
        fail("cluster", "use 1-63 letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit")
    try:
        chosen.validate(values, lambda name: origins.get(name, f"setting {name}"))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
