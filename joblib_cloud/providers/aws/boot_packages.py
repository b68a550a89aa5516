"""The aws boot's background install: the heavy packages, after the agent's.

The boot script (``userdata.py``) installs joblib and cloudpickle, then runs what
:func:`background_step` renders before it lets the client in: the state file
(``wire/contract.py`` ``INSTALLING_FILE``) says what installs and which modules that
provides, as this client has them; ``host/background.py`` reads it on the host.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from typing import Any

from ...wire import contract

#: The background install's output (its last lines are a failed install's message).
PACKAGES_LOG = "/opt/joblib-cloud/packages.log"
UV = "/opt/joblib-cloud/bin/uv"


def background_step(python: str, pins: str, flags: str, user: str, state: dict[str, Any],
                    as_user: bool, then: str) -> str:
    """The heavy packages, after the agent's, then ``then`` (the OpenMP runtime: run
    alongside, its ``apt-get`` doubled the install's time): in the background once the
    state file (``wire/contract.py``) says what installs, under an exclusive ``flock``
    held until both are done (the agent's own installs wait for it).  The state turns
    ``installed`` (tasks go on) or ``failed`` in place, keeping the lock's file; the file
    goes once all is well.  A failure is no boot failure: the tasks that need these
    packages fail with the log's last lines (``host/background.py``)."""
    installing = shlex.quote(json.dumps(state))
    # Into the venv as its owner (the agent's own installs write there too); an image's
    # interpreter (python=) takes them as root.
    runner = f'runuser -u {user} -- env HOME="$HOME_DIR" ' if as_user else ""
    return f"""STATE="$HOME_DIR/.joblib-cloud/{contract.INSTALLING_FILE}"
echo {installing} > "$STATE" && chown {user}: "$STATE" && chmod 644 "$STATE"
echo "joblib-cloud: installing {len(state['distributions'])} packages in the background"
mark() {{ sed "s/: \\"installing\\"/: \\"$1\\"/" "$STATE" > "$STATE.t"
  cat "$STATE.t" > "$STATE"; }}
exec 9<"$STATE"
flock -x 9
(trap - ERR; set +e
 if {runner}{UV} pip install --quiet --python {python}{flags} {pins} >{PACKAGES_LOG} 2>&1
 then mark installed; echo "joblib-cloud: packages installed"; OK=1
 else mark failed; echo "joblib-cloud: installing the packages failed:"
   tail -n 5 {PACKAGES_LOG}
 fi
 {then}[ -z "${{OK:-}}" ] || rm -f "$STATE" "$STATE.t") &
exec 9<&-
"""


def background_state(requirements: list[str], requirements_file: bool) -> dict[str, Any]:
    """The state file's content for ``requirements`` (pins, ``packages=``): the modules
    they provide, with their dependencies', as this client has them installed (a
    distribution it lacks: its normalised name; a requirements file: any module)."""
    names = [re.split(r"[\s<>=!~;@\[]", r.strip(), maxsplit=1)[0] for r in requirements]
    modules: set[str] = set()
    by_dist: dict[str, set[str]] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(normal(dist), set()).add(top)
    todo, seen = [normal(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        modules |= by_dist.get(name, {name.replace("-", "_")})
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [normal(re.split(r"[\s<>=!~;(\[]", r, maxsplit=1)[0]) for r in requires
                 if "extra ==" not in r]
    modules -= {"joblib", "cloudpickle", "_distutils_hack"}
    from_file = ["-r requirements.txt"] if requirements_file else []
    return {"state": "installing", "distributions": names + from_file,
            "modules": None if requirements_file else sorted(modules), "log": PACKAGES_LOG}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
