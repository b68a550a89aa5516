"""Exceptions a user can meet, each saying what happened and what to do."""

from __future__ import annotations

import pickle


class JoblibCloudError(RuntimeError):
    """Base class of joblib-cloud's own errors.  The command line prints its message on
    one line and exits with its :attr:`exit_code`."""

    #: What ``joblib-cloud`` exits with on this error (documented in ``--help``).
    exit_code = 1


class ConfigError(JoblibCloudError, ValueError):
    """A setting, argument or name given that cannot work as given; the message says the
    fix."""

    exit_code = 2


class JobError(JoblibCloudError):
    """A ``run`` job could not be started, found, followed or reached again."""


class HostLostError(JoblibCloudError):
    """A host stopped answering (connection dropped, VM gone, heartbeat missed)."""


class ClusterLostError(JoblibCloudError):
    """No host of the cluster is left to run the remaining work."""


class HostConnectError(JoblibCloudError):
    """A host could not be reached or refused us."""

    exit_code = 3


class HostKeyError(HostConnectError):
    """A host presented an SSH key we cannot verify."""


class EnvironmentMismatchError(JoblibCloudError):
    """The host's Python or cloudpickle differs from the client's."""


class HostPythonError(EnvironmentMismatchError):
    """A host cannot have the client's Python minor: its image has no such interpreter and
    none could be installed (on aws: uv's standalone Python could not be downloaded).
    The message names the fix: ``python=``, ``image_id=``, or a client on a minor the
    image has."""


class TerminatedWorkerError(JoblibCloudError):
    """A worker process on a host died while running a task (crash, os._exit, OOM-kill)."""


class ResultTooLargeError(JoblibCloudError):
    """A task's result exceeds ``max_result_size``."""


class RemoteTaskError(JoblibCloudError):
    """A task raised an exception that could not be sent back as itself."""


class TaskPicklingError(JoblibCloudError, pickle.PicklingError):
    """A task or its arguments could not be pickled on the client."""


class AbortedError(JoblibCloudError):
    """The batch was cancelled (timeout, Ctrl-C or an error elsewhere in the call)."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class BudgetExceededError(JoblibCloudError):
    """A cluster reached its ``budget=``: its machines were told to stop."""

