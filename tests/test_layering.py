"""Imports flow one way: base ← transport ← dispatch ← context ← entities ← wait ← CLI.

Each module's imports are read with :mod:`ast` (module level, inside functions,
and under ``if TYPE_CHECKING:``: a type hint is a dependency too) and every
import of another emailmw module must go to the same layer or a lower one.
A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import emailmw

pytestmark = pytest.mark.timeout(30)

PACKAGE_DIR = Path(emailmw.__file__).parent

#: Layer of each module, lowest first. Same-layer imports are allowed.
LAYERS: dict[str, int] = {
    # 0 base: no I/O, no threads of their own; used by everything above.
    "emailmw.errors": 0,
    "emailmw.info": 0,
    "emailmw.metrics": 0,  # histograms and connection states (the transports record them)
    "emailmw.stats": 0,
    "emailmw.timeout": 0,
    "emailmw.validation": 0,
    "emailmw.waitable": 0,  # depends on a WaitOwner protocol, not on the context
    # 1 transport: email containers, codec, senders and receivers.
    "emailmw.transport": 1,
    "emailmw.transport.data": 1,
    "emailmw.transport.codec": 1,
    "emailmw.transport.receiver": 1,
    "emailmw.transport.sender": 1,
    "emailmw.transport.intra": 1,
    "emailmw.transport.smtp": 1,
    "emailmw.transport.smtp_pool": 1,  # several SmtpEmailSenders (smtp-connections)
    "emailmw.transport.imap": 1,
    "emailmw.transport.tls": 1,
    "emailmw.transport.settings": 1,  # what each transport is given (not the Options)
    "emailmw.transport.signing": 1,  # SigningSender wraps any sender
    "emailmw.transport.imap_session": 1,
    "emailmw.transport.mailbox": 1,
    "emailmw.transport.imap_cadence": 1,
    "emailmw.transport.imap_resync": 1,
    "emailmw.transport.oauth": 1,  # OAuth2 access tokens and their SASL exchanges
    # 2 dispatch
    "emailmw.dispatch": 2,
    "emailmw.dispatch.handlers": 2,
    "emailmw.dispatch.polling": 2,
    "emailmw.dispatch.ordering": 2,
    "emailmw.dispatch.core": 2,
    # admission (signature, replay, allowed senders) of received emails, by the core
    "emailmw.security": 2,
    "emailmw.state_store": 2,  # the SQLite file of what survives a restart
    "emailmw.durable": 2,  # a durable subscription's position and handled ids
    # 3 context
    "emailmw.context": 3,
    "emailmw.options": 3,  # reading files and the environment: the context's business
    # asyncio twins, mixins of the context and the entities (on protocols, not on them)
    "emailmw.aio": 3,
    "emailmw.metrics_http": 3,  # the optional Prometheus endpoint, started by the context
    # 4 entities
    "emailmw.entity": 4,
    "emailmw.serialization": 4,  # message types: how a typed value becomes a body
    "emailmw.pubsub": 4,
    "emailmw.service": 4,
    # 5 waiting on entities
    "emailmw.wait": 5,
    "emailmw.executor": 5,  # runs the callbacks of entities
    # 6 applications of the library: the CLI, the demo, the public package
    "emailmw.commands": 6,
    "emailmw._progress": 6,  # progress bars and lines of long commands
    "emailmw.demo": 6,
    "emailmw.cli": 6,
    "emailmw.__main__": 6,
    "emailmw": 6,
    # the local mail stack: standalone (standard library only)
    "emailmw.devserver": 6,
    "emailmw.devserver.__main__": 6,
    "emailmw.devserver.certs": 6,
    "emailmw.devserver.cli": 6,
    "emailmw.devserver.configs": 6,
    "emailmw.devserver.errors": 6,
    "emailmw.devserver.federation": 6,
    "emailmw.devserver.install": 6,
    "emailmw.devserver.oauth2": 6,
    "emailmw.devserver.processes": 6,
    "emailmw.devserver.server": 6,
}

DEVSERVER = {m for m in LAYERS if m == "emailmw.devserver" or m.startswith("emailmw.devserver.")}

#: Modules that must not import any other emailmw module at all ...
STANDALONE = {
    "emailmw.errors",
    "emailmw.info",
    "emailmw.metrics",
    "emailmw.timeout",
    "emailmw.transport.data",
    *DEVSERVER,
}
#: ... except, in a standalone package, each other.
STANDALONE_PACKAGES = {"emailmw.devserver"}

TRANSPORT = {m for m, layer in LAYERS.items() if layer == 1}
DISPATCH = {m for m, layer in LAYERS.items() if layer == 2}
ENTITIES = {"emailmw.entity", "emailmw.pubsub", "emailmw.service", "emailmw.wait"}
APPLICATIONS = {m for m, layer in LAYERS.items() if layer == 6}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    type_only: bool
    top_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def add(target: str, node: ast.stmt, type_only: bool, top_level: bool) -> None:
        if target == "emailmw" or target.startswith("emailmw."):
            found.append(Import(name, target, node.lineno, type_only, top_level))

    def visit(node: ast.AST, type_only: bool, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_type_only = type_only or _is_type_checking(child)
            child_top = top_level and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, child_type_only, child_top)
            elif isinstance(child, ast.ImportFrom):
                module = resolve(child)
                for alias in child.names:
                    submodule = f"{module}.{alias.name}"
                    add(
                        submodule if submodule in known else module,
                        child,
                        child_type_only,
                        child_top,
                    )
            visit(child, child_type_only, child_top)

    visit(tree, False, True)
    return found


MODULES = all_modules()
IMPORTS = [i for name, path in MODULES.items() for i in imports_of(name, path, set(MODULES))]
RUNTIME = [i for i in IMPORTS if not i.type_only]


def fmt(i: Import) -> str:
    return f"{i.source} (line {i.line}) imports {i.target}"


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(MODULES) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layering.py: {missing}"


def test_the_modules_this_suite_knows_exist() -> None:
    core = {
        m
        for m in LAYERS
        if m
        not in {
            "emailmw.transport.smtp",
            "emailmw.transport.imap",
            "emailmw.commands",
            "emailmw.security",
        }
    }
    assert core <= set(MODULES), sorted(core - set(MODULES))


def test_imports_go_to_the_same_layer_or_below() -> None:
    bad = [
        fmt(i)
        for i in IMPORTS
        if i.source in LAYERS and i.target in LAYERS and LAYERS[i.target] > LAYERS[i.source]
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_imports_name_real_modules() -> None:
    unknown = [fmt(i) for i in IMPORTS if i.target not in MODULES]
    # A lazily imported module that has not landed yet would show up here.
    assert not unknown, "\n".join(unknown)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_standalone_modules_import_nothing_of_emailmw() -> None:
    bad = [
        fmt(i)
        for i in IMPORTS
        if i.source in STANDALONE
        and not any(within(i.source, p) and within(i.target, p) for p in STANDALONE_PACKAGES)
    ]
    assert not bad, "\n".join(bad)


def test_stats_imports_only_the_metrics() -> None:
    # the counters hold the histograms and connection states: emailmw.metrics, itself standalone
    bad = [fmt(i) for i in IMPORTS if i.source == "emailmw.stats" and i.target != "emailmw.metrics"]
    assert not bad, "\n".join(bad)


def test_transport_never_imports_dispatch_context_or_entities() -> None:
    above = DISPATCH | {"emailmw.context"} | ENTITIES | APPLICATIONS
    bad = [fmt(i) for i in IMPORTS if i.source in TRANSPORT and i.target in above]
    assert not bad, "\n".join(bad)


def test_dispatch_never_imports_context_or_entities() -> None:
    above = {"emailmw.context"} | ENTITIES | APPLICATIONS
    bad = [fmt(i) for i in IMPORTS if i.source in DISPATCH and i.target in above]
    assert not bad, "\n".join(bad)


def test_context_never_imports_entities() -> None:
    bad = [fmt(i) for i in IMPORTS if i.source == "emailmw.context" and i.target in ENTITIES]
    assert not bad, "\n".join(bad)


def test_entities_never_import_wait_or_applications() -> None:
    bad = [
        fmt(i)
        for i in IMPORTS
        if i.source in {"emailmw.pubsub", "emailmw.service"}
        and i.target in {"emailmw.wait"} | APPLICATIONS
    ]
    assert not bad, "\n".join(bad)


def test_only_applications_import_the_package_root() -> None:
    bad = [fmt(i) for i in IMPORTS if i.target == "emailmw" and i.source not in APPLICATIONS]
    assert not bad, "\n".join(bad)


def test_library_never_imports_the_cli() -> None:
    cli_side = {
        "emailmw.cli",
        "emailmw.commands",
        "emailmw.demo",
        *DEVSERVER,
        "emailmw.__main__",
    }
    bad = [fmt(i) for i in IMPORTS if i.target in cli_side and i.source not in cli_side]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_module_level() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in RUNTIME:
        if i.top_level and i.target != i.source and i.target in graph:
            graph[i.source].add(i.target)
    graph["emailmw"] = set()  # the package root re-exports everything by design
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_type_only_imports_go_downward_too() -> None:
    """A type hint is a dependency: no upward import, not even for type checking."""
    upward = sorted(
        fmt(i)
        for i in IMPORTS
        if i.type_only and i.target in LAYERS and LAYERS[i.target] > LAYERS.get(i.source, 99)
    )
    assert upward == []


def test_the_import_reader_itself(tmp_path: Path) -> None:
    source = tmp_path / "fake.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from . import polling\n"
        "from ..context import Context\n"
        "from emailmw import commands, Options\n"
        "if TYPE_CHECKING:\n"
        "    from emailmw.wait import WaitSet\n"
        "def f():\n"
        "    import emailmw.pubsub\n",
        encoding="utf-8",
    )
    known = set(MODULES)
    found = {
        (i.target, i.type_only, i.top_level)
        for i in imports_of("emailmw.dispatch.fake", source, known)
    }
    assert found == {
        ("emailmw.dispatch.polling", False, True),
        ("emailmw.context", False, True),
        ("emailmw.commands", False, True),
        ("emailmw", False, True),
        ("emailmw.wait", True, True),
        ("emailmw.pubsub", False, False),
    }
