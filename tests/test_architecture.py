"""The tree's rules, checked: what may run on hosts imports only what hosts have, shipped
scripts agree with the package on shared names, modules stay small, every provider
implements the interface."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from joblib_cloud import provisioner
from joblib_cloud.host import jobhost, watchdog
from joblib_cloud.wire import contract

PACKAGE = Path(provisioner.__file__).parent
#: Code that runs on hosts: the agent, its workers, the wire formats, shipped scripts.
HOST_CODE = [PACKAGE / "worker.py", PACKAGE / "errors.py", *sorted((PACKAGE / "host").glob(
    "*.py")), *sorted((PACKAGE / "wire").glob("*.py"))]
#: Run as standalone scripts on hosts (before any Python environment exists, for two).
STANDALONE = [PACKAGE / "host" / name for name in ("watchdog.py", "jobhost.py", "fetch_uv.py")]
#: Imports inside functions, only on the path that needs them: numpy when a batch carries
#: a view of a cached array (the data itself needs numpy), threadpoolctl when a caller
#: caps a task's inner threads (``inner_max_num_threads``: scikit-learn brings it).
LAZY_ALLOWED = {"numpy", "threadpoolctl"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, imported at module level) for every import of ``path``."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, id(node) in top))
    return found


def _allowed_on_hosts(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("__future__", "joblib", "cloudpickle"):
        return True
    return module.startswith(("joblib_cloud.host", "joblib_cloud.wire",
                              "joblib_cloud.errors", "joblib_cloud.worker"))


@pytest.mark.parametrize("path", HOST_CODE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_host_code_imports_only_the_standard_library_joblib_and_cloudpickle(path):
    bad = [(module, level) for module, level in _imports(path)
           if not _allowed_on_hosts(module)
           and not (not level and module.split(".")[0] in LAZY_ALLOWED)]
    assert not bad, f"{path.name} imports what a host may lack: {bad}"


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_shipped_scripts_need_nothing_but_the_standard_library(path):
    bad = [m for m, _ in _imports(path)
           if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"]
    assert not bad, f"{path.name} runs without the package, yet imports {bad}"


def test_shipped_scripts_agree_with_the_package_on_shared_names():
    assert watchdog.AGENT_MARK == contract.AGENT_MODULE.encode()
    assert watchdog.HOME_ENV == jobhost.HOME_ENV == contract.HOME_ENV
    assert watchdog.ACTIVITY_FILE == jobhost.ACTIVITY_FILE == contract.ACTIVITY_FILE
    assert watchdog.ATTACHED_FILE == contract.ATTACHED_FILE
    assert contract.HOME_DEFAULT == jobhost.HOME_DEFAULT == f"~/{watchdog.HOME_DIRNAME}"
    assert jobhost.LENGTH_PREFIX == contract.LENGTH_PREFIX
    assert (PACKAGE / (contract.AGENT_MODULE.split(".", 1)[1] + ".py")).is_file()
    from joblib_cloud.client.streams import BOOTSTRAP

    assert f"from {contract.AGENT_MODULE} import main" in BOOTSTRAP
    compile(BOOTSTRAP, "<bootstrap>", "exec")  # every placeholder filled in


def test_no_module_is_over_about_four_hundred_lines():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


@pytest.mark.parametrize("name", sorted(provisioner.PROVIDERS))
def test_every_provider_implements_the_interface(name):
    provider = provisioner.provider(name)
    assert provider.name == name
    for method in ("ensure", "status", "down"):
        assert callable(getattr(provider, method, None)), (name, method)
