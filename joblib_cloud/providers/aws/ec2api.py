"""boto3 clients and EC2 error classification for the ``aws`` provider.

Every EC2 error falls into one of a few classes, and each class has one reaction:
*capacity* → try the next zone, then on-demand; *quota*, *credentials*,
*image* → fail at once with the fix in the message; *throttling* → back off and retry.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import HostPythonError, JoblibCloudError

log = logging.getLogger("joblib_cloud")

TAG_KEY = "joblib-cloud:cluster"

CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "SpotMaxPriceTooLow", "InsufficientFreeAddressesInSubnet", "Unsupported",
    "MaxSpotInstanceCountExceeded", "InsufficientReservedInstanceCapacity"})
QUOTA_CODES = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded",
                         "ResourceLimitExceeded", "SecurityGroupLimitExceeded",
                         "RulesPerSecurityGroupLimitExceeded"})
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException",
                            "TooManyRequestsException", "RequestThrottled"})
CREDENTIAL_CODES = frozenset({"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId",
                              "ExpiredToken", "RequestExpired", "SignatureDoesNotMatch",
                              "AccessDenied", "AccessDeniedException"})
#: A region (or the service in it) the account has not enabled or subscribed to.
OPT_IN_CODE = "OptInRequired"
#: A new account AWS is still verifying: nothing can be launched yet.
PENDING_VERIFICATION_CODE = "PendingVerification"
#: Spot needs a service-linked role; an account that never used spot may not be allowed
#: to create it on the fly.
SPOT_ROLE_CODE = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
SPOT_ROLE_FIX = "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"
#: Codes with which a policy (or an opt-in region) shuts a whole region to these credentials.
REGION_DENIED_CODES = frozenset({"UnauthorizedOperation", "AuthFailure", OPT_IN_CODE})
IMAGE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Malformed",
                         "InvalidAMIID.Unavailable"})

CREDENTIALS_HELP = ("Configure AWS credentials the standard way: run `aws configure` (or "
                    "`aws sso login --profile NAME`), set AWS_PROFILE=NAME, or set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
QUOTA_URL = "https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas"

#: Throttling back-off: first delay and number of tries (tests shorten the delay).
THROTTLE_DELAY = 1.0
THROTTLE_TRIES = 8


class AWSError(JoblibCloudError):
    """EC2 refused a request for a reason the user has to fix."""


class CapacityError(AWSError):
    """No capacity for this type (in this zone / market) right now."""


class BootFailedError(AWSError):
    """A machine stopped before it accepted SSH: the message carries its state, the
    reason EC2 gives and the end of its console output (where the boot script writes)."""


class PythonBootFailedError(BootFailedError, HostPythonError):
    """A machine stopped while booting because no Python at the client's minor could be
    had on it: the boot's console line that names the fix leads the message."""


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def cause_code(exc: BaseException) -> str:
    """The EC2 error code of ``exc`` or of the error it was explained from."""
    return error_code(exc) or (error_code(exc.__cause__) if exc.__cause__ else "")


def unless(exc: BaseException, *codes: str) -> str:
    """In an ``except`` block: raise ``exc`` again unless its code (or its cause's) is one
    of ``codes`` (one ending in ``*`` matches as a prefix); else the code, handled."""
    code = cause_code(exc)
    if not any(code == c or (c.endswith("*") and code.startswith(c[:-1])) for c in codes):
        raise exc
    return code


def profile_name() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "NAME"


def error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Message", exc))


def explain(exc: BaseException, what: str) -> BaseException:
    """An :class:`AWSError` with the fix for ``exc``, or ``exc`` itself if unclassified."""
    from botocore.exceptions import (
        NoCredentialsError,
        NoRegionError,
        SSOError,
        TokenRetrievalError,
    )

    code = error_code(exc)
    if isinstance(exc, (SSOError, TokenRetrievalError)):
        return AWSError(
            f"your AWS SSO session has expired or is invalid ({exc}) while trying to {what}. "
            f"Log in again with `aws sso login --profile {profile_name()}`, then retry.")
    if code == OPT_IN_CODE:
        return AWSError(
            f"this AWS region (or EC2 in it) is not enabled for your account, so joblib-cloud "
            f"cannot {what} ({code}: {error_message(exc)}). Enable the region in the AWS "
            "console (Account > AWS Regions), or pick an enabled one with region=.")
    if code == PENDING_VERIFICATION_CODE:
        return AWSError(
            f"AWS is still verifying this new account, so it cannot {what} yet ({code}: "
            f"{error_message(exc)}). Wait until AWS confirms the account (usually minutes, "
            "at most a few hours; check your e-mail), then retry.")
    if code == SPOT_ROLE_CODE:
        return AWSError(
            f"spot machines need the spot service-linked role, which these credentials may "
            f"not create ({code}). Create it once with `{SPOT_ROLE_FIX}`, or use spot=False.")
    if isinstance(exc, NoCredentialsError):
        return AWSError(f"no AWS credentials found while trying to {what}. {CREDENTIALS_HELP}")
    if isinstance(exc, NoRegionError):
        return AWSError(f"no AWS region: pass region='us-east-1' (or set JOBLIB_CLOUD_REGION "
                        f"or AWS_REGION) to {what}")
    if code in CREDENTIAL_CODES:
        return AWSError(
            f"AWS refused to {what} ({code}: {error_message(exc)}). Check that your "
            "credentials are valid and not expired, and that they allow EC2 "
            f"(RunInstances, DescribeInstances, TerminateInstances, security groups). "
            f"{CREDENTIALS_HELP}")
    if code in QUOTA_CODES:
        return AWSError(
            f"AWS quota reached while trying to {what} ({code}: {error_message(exc)}). "
            f"Ask for fewer or smaller machines (n=, instance=), or request a higher "
            f"quota (e.g. 'Running On-Demand Standard instances' vCPUs) at {QUOTA_URL}")
    if code in IMAGE_CODES:
        return AWSError(
            f"the machine image cannot be used ({code}: {error_message(exc)}). Unset "
            "image_id= to use the current Amazon Linux image, or pass an AMI id that "
            "exists in this region.")
    if code in CAPACITY_CODES:
        return CapacityError(f"no capacity to {what} ({code}: {error_message(exc)})")
    return exc


T = TypeVar("T")


def call(fn: Callable[..., T], what: str, **kwargs: Any) -> T:
    """``fn(**kwargs)``, retrying throttling with exponential back-off and jitter, and
    turning classified errors into messages that say what to do."""
    from botocore.exceptions import BotoCoreError, ClientError

    delay = THROTTLE_DELAY
    for attempt in range(1, THROTTLE_TRIES + 1):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            if error_code(exc) in THROTTLE_CODES and attempt < THROTTLE_TRIES:
                log.info("AWS throttled %s; retrying in %.1fs", what, delay)
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, 30.0)
                continue
            raise explain(exc, what) from exc
        except BotoCoreError as exc:
            explained = explain(exc, what)
            if explained is exc:
                raise
            raise explained from exc
    raise AssertionError("unreachable")  # pragma: no cover


def session(region: str | None) -> Any:
    """A boto3 session for ``region`` with usable credentials, or a clear error."""
    import boto3

    if not region:
        raise AWSError("no AWS region configured: pass region='us-east-1' (or set "
                       "JOBLIB_CLOUD_REGION, AWS_REGION or AWS_DEFAULT_REGION)")
    try:
        sess = boto3.session.Session(region_name=region)
        credentials = sess.get_credentials()
    except Exception as exc:  # noqa: BLE001 - e.g. a profile that does not exist
        explained = explain(exc, "load AWS credentials")
        if isinstance(explained, AWSError):
            raise explained from exc
        raise AWSError(f"cannot load AWS credentials: {exc}. {CREDENTIALS_HELP}") from exc
    if credentials is None:
        raise AWSError(f"no AWS credentials found. {CREDENTIALS_HELP}")
    return sess


def tag_spec(resource: str, cluster: str) -> dict[str, Any]:
    return {"ResourceType": resource, "Tags": [{"Key": TAG_KEY, "Value": cluster},
                                               {"Key": "Name", "Value": f"joblib-cloud-{cluster}"}]}


def cluster_filter(cluster: str | None) -> list[dict[str, Any]]:
    """Filter on our tag: one cluster, or (``None``) every joblib-cloud cluster."""
    if cluster is None:
        return [{"Name": "tag-key", "Values": [TAG_KEY]}]
    return [{"Name": f"tag:{TAG_KEY}", "Values": [cluster]}]


def tag_value(resource: dict[str, Any]) -> str | None:
    for tag in resource.get("Tags") or ():
        if tag.get("Key") == TAG_KEY:
            return tag.get("Value")
    return None


def instances(ec2: Any, what: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every instance ``DescribeInstances`` lists for ``filters``, all pages."""
    pages = call(lambda: list(ec2.get_paginator("describe_instances").paginate(
        Filters=filters)), what)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def describe_instances(ec2: Any, cluster: str | None, states: tuple[str, ...]
                       ) -> list[dict[str, Any]]:
    filters = cluster_filter(cluster) + [{"Name": "instance-state-name", "Values": list(states)}]
    found = instances(ec2, "list instances", filters)
    # Tag filters are done by EC2; re-check so an untagged resource can never slip in.
    return [i for i in found if tag_value(i) is not None
            and (cluster is None or tag_value(i) == cluster)]
