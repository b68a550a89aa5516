"""The tree's rules, checked: what may run on hosts imports only what hosts have, shipped
scripts agree with the package on shared names, modules stay small, every provider
implements the interface."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from joblib_cloud import provisioner
from joblib_cloud.host import jobfiles, jobhost, watchdog
from joblib_cloud.wire import contract

PACKAGE = Path(provisioner.__file__).parent
#: Code that runs on hosts: the agent, its workers, the wire formats, shipped scripts.
HOST_CODE = [PACKAGE / "worker.py", PACKAGE / "errors.py", *sorted((PACKAGE / "host").glob(
    "*.py")), *sorted((PACKAGE / "wire").glob("*.py"))]
#: Run as standalone scripts on hosts (before any Python environment exists, for two).
STANDALONE = [*(PACKAGE / "host" / name for name in ("watchdog.py", "jobhost.py", "fetch_uv.py")),
              PACKAGE / "wire" / "archive.py"]
#: Imports inside functions, only on the path that needs them: numpy when a batch carries
#: a view of a cached array (the data itself needs numpy), threadpoolctl when a caller
#: caps a task's inner threads (``inner_max_num_threads``: scikit-learn brings it).
LAZY_ALLOWED = {"numpy", "threadpoolctl"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_path(module: str) -> Path | None:
    """The file of a ``joblib_cloud`` module, or None for anything else."""
    if module.split(".")[0] != PACKAGE.name:
        return None
    base = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(handlers: list[ast.ExceptHandler]) -> bool:
    """An ``except`` that catches a failed import (the code copes without the module)."""
    names = {"ImportError", "ModuleNotFoundError", "Exception"}
    for handler in handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(isinstance(k, ast.Name) and k.id in names
                                       for k in kinds):
            return True
    return False


def _imports(path: Path, package: str | None = None) -> list[tuple[str, bool]]:
    """(absolute module, runs when the module is imported) for every import of ``path``.

    An import runs at import time unless it sits in a function, under ``if
    TYPE_CHECKING:``, or in a ``try`` that catches its failure; imports under other
    module-level ``if``s (a version check) do run on some Python, so they count."""
    if package is None:
        package = _module_name(path) if path.name == "__init__.py" else \
            _module_name(path).rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, eager) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" may name a submodule
                found.extend((f"{module}.{a.name}", eager) for a in node.names
                             if _module_path(f"{module}.{a.name}"))
            else:
                module = node.module or ""
            found.append((module, eager))
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, ast.AST):
                    continue
                inner = eager
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inner = False
                elif isinstance(node, ast.If) and field == "body" and \
                        "TYPE_CHECKING" in ast.unparse(node.test):
                    inner = False
                elif isinstance(node, ast.Try) and field == "body" and _guarded(node.handlers):
                    inner = False
                visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


def _bootstrap_closure() -> list[Path]:
    """Every module of the package that starting the agent imports: the bootstrap's own
    import, each package ``__init__`` on the way, and whatever those import at import time,
    followed to the end (what the host's Python really loads, however the tree changes)."""
    from joblib_cloud.client.streams import BOOTSTRAP

    roots = [line.split()[1] for line in BOOTSTRAP.splitlines()
             if line.startswith("from ") and line.split()[1].startswith(PACKAGE.name)]
    # A worker also imports what a batch references: everything that runs on hosts.
    roots += [_module_name(p) for p in HOST_CODE]
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b first
            name = ".".join(parts[:i])
            path = _module_path(name)
            if path is None or name in seen:
                continue
            seen[name] = path
            todo += [m for m, eager in _imports(path) if eager]
    return sorted(set(seen.values()))


def _allowed_on_hosts(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top in ("__future__", "joblib", "cloudpickle",
                                                     PACKAGE.name)


def test_the_bootstrap_closure_is_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in _bootstrap_closure()}
    # The package's __init__ runs first, and it loads the backend and its settings.
    assert {"__init__.py", "worker.py", "backend.py", "config.py"} <= names


@pytest.mark.parametrize("path", _bootstrap_closure(),
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_what_the_agent_imports_needs_only_the_standard_library_joblib_and_cloudpickle(path):
    bad = [module for module, eager in _imports(path)
           if eager and not _allowed_on_hosts(module)]
    assert not bad, f"{path.name} is imported on hosts, yet imports what a host lacks: {bad}"


@pytest.mark.parametrize("path", HOST_CODE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_host_code_imports_only_the_standard_library_joblib_and_cloudpickle(path):
    """Host code's imports inside functions too: only the lazy ones a batch brings."""
    bad = [module for module, eager in _imports(path)
           if not _allowed_on_hosts(module)
           and not (not eager and module.split(".")[0] in LAZY_ALLOWED)]
    assert not bad, f"{path.name} imports what a host may lack: {bad}"


def test_the_old_rule_would_have_missed_a_version_dependent_import(tmp_path):
    """A module-level ``if`` (``tomli`` on 3.10 only) counts as imported at start-up."""
    sample = PACKAGE / "config.py"
    assert all(m != "tomli" or not eager for m, eager in _imports(sample))
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nif sys.version_info < (3, 11):\n    import tomli\n"
                     "def f():\n    import paramiko\n")
    assert _imports(probe, PACKAGE.name) == [("sys", True), ("tomli", True),
                                             ("paramiko", False)]


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
    assert jobfiles.INSTALLING_FILE == contract.INSTALLING_FILE
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


# ------------------------------------------------------- provider names stay in providers/

#: Built-in provider names (a provider registered by a user has a name we cannot know, so
#: the rule is checked for these: code that names none of them names no provider).
PROVIDER_NAMES = {"aws", "ssh", "local"}
#: Places outside ``providers/`` allowed a provider's name, each for a reason.
NAMING_ALLOWED = {
    # Shipped alone to the job's machine, where it cannot import providers/: a job that
    # came with no backend settings uses that machine's own cores.
    "host/jobhost.py",
}
#: AWS-only commands (``cost``, ``instances``) read the aws provider's own modules.
AWS_COMMANDS = {"cli/cluster.py"}


def _names_a_provider(source: str, rel: str) -> list[str]:
    """Where module ``rel`` names a provider: a string literal that is a provider's name
    (outside docstrings and the CLI's ``add_argument`` calls), a comparison of a
    ``provider`` value with a literal, or an import of one provider's own modules."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            skip.add(id(body[0].value))  # docstring
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            skip.update(id(a) for a in node.args)  # argument parsing may name one

    def is_provider_value(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == "provider")
                or (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                    and node.slice.value == "provider"))

    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and node.value in PROVIDER_NAMES
                and id(node) not in skip and rel not in NAMING_ALLOWED):
            found.append(f"{rel}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Compare) and any(
                is_provider_value(side) for side in [node.left, *node.comparators]):
            others = [side for side in [node.left, *node.comparators]
                      if not is_provider_value(side)]
            if any(isinstance(side, (ast.Constant, ast.Set, ast.Tuple, ast.List))
                   for side in others):
                found.append(f"{rel}:{node.lineno}: compares a provider name")
        if isinstance(node, ast.ImportFrom) and rel not in AWS_COMMANDS:
            module = "." * node.level + (node.module or "")
            if re.search(r"(^|\.)providers\.\w", module):
                found.append(f"{rel}:{node.lineno}: imports {module}")
    return found


def test_no_code_outside_providers_names_a_provider():
    """Every difference between providers is behind the Provider/Fleet interface: a new
    provider changes nothing outside its own module (tests/test_custom_provider.py)."""
    found = [line for path in sorted(PACKAGE.rglob("*.py"))
             if "providers" not in path.relative_to(PACKAGE).parts
             for line in _names_a_provider(path.read_text(),
                                           path.relative_to(PACKAGE).as_posix())]
    assert found == []


def test_the_provider_rule_sees_literals_comparisons_and_imports():
    source = ('from ..providers.aws import s3store\n'
              'def f(config):\n    """About aws."""\n'
              '    return config.provider == "aws" or {"x": "ssh"}\n')
    assert sorted(_names_a_provider(source, "jobs/x.py")) == [
        "jobs/x.py:1: imports ..providers.aws", "jobs/x.py:4: 'aws'", "jobs/x.py:4: 'ssh'",
        "jobs/x.py:4: compares a provider name"]


# ------------------------------------------------------- client/ without import cycles

def _client_import_graph() -> dict[str, set[str]]:
    """Which ``client/`` module imports which, counting every import: at import time, in a
    function, or for type checking only (a cycle there is still two modules that must be
    read and changed together)."""
    client = PACKAGE / "client"
    names = {_module_name(p) for p in client.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(client.glob("*.py")):
        found = {m for m, _ in _imports(path)}
        # "from .x import y" records both "...x" and, when y is a module, "...x.y"
        graph[_module_name(path)] = {m for m in found if m in names} - {_module_name(path)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) == []


def test_client_modules_import_each_other_without_a_cycle():
    """The scheduler (cluster.py), one host's stream (session.py) and what sends on it
    (uploads.py, packages.py) meet through narrow interfaces, not each other's modules."""
    cycle = _cycle(_client_import_graph())
    assert not cycle, "import cycle in client/: " + " -> ".join(cycle)
