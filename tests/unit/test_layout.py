"""The house's layout, checked from the real imports: no arrow up a layer, no cycle, small modules.

Every ``import`` and ``from ... import`` in every module of the package
counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``). Each module belongs to one component; a component may
import only the components :data:`ARROWS` lists for it. The README's
"Layout" section draws the same picture.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "recoveryd"
MAX_LINES = 450

# Components, bottom to top; a module is in the component of its longest prefix.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "generated": ("recoveryd.v1",),
    "errors": ("recoveryd.errors",),
    "base": ("recoveryd._time", "recoveryd._format", "recoveryd._version", "recoveryd._threads"),
    "transport": ("recoveryd.transport",),
    "protocol": ("recoveryd.protocol", "recoveryd.codec", "recoveryd.credentials"),
    "metrics": ("recoveryd.metrics",),
    "testing": ("recoveryd.testing",),
    "policy": (
        "recoveryd.coordinator.config",
        "recoveryd.coordinator.membership",
        "recoveryd.coordinator.policy",
        "recoveryd.coordinator.plans",
        "recoveryd.coordinator.planner",
        "recoveryd.coordinator.census",
    ),
    "coordinator": ("recoveryd.coordinator",),
    "agent": ("recoveryd.agent",),
    "status": ("recoveryd.status",),
    "sidecar": ("recoveryd.sidecar",),
    "demo": ("recoveryd.demo",),
    "cli": ("recoveryd.cli", "recoveryd.__main__"),
    "api": ("recoveryd",),
}

_BOTTOM = {"errors", "base"}
# What each component may import (besides itself). The data plane knows
# nothing of the control plane; the coordinator and the agent meet only in
# the protocol; the sidecar is an agent; the demo and the CLI sit on top.
ARROWS: dict[str, set[str]] = {
    "generated": set(),
    "errors": set(),
    "base": {"errors"},
    "transport": {"generated", *_BOTTOM},
    "protocol": {"generated", *_BOTTOM},
    "metrics": {"protocol", *_BOTTOM},
    "testing": {"transport", *_BOTTOM},
    "policy": {"protocol", *_BOTTOM},
    "coordinator": {"policy", "metrics", "protocol", "generated", *_BOTTOM},
    "agent": {"transport", "protocol", "metrics", "generated", *_BOTTOM},
    "status": {"protocol", *_BOTTOM},
    "sidecar": {"agent", "transport", "protocol", "metrics", "generated", *_BOTTOM},
    "demo": {
        "coordinator",
        "policy",
        "agent",
        "sidecar",
        "testing",
        "status",
        "protocol",
        *_BOTTOM,
    },
    "cli": {"demo", "sidecar", "agent", "coordinator", "policy", "status", "protocol", *_BOTTOM},
    "api": set(COMPONENTS) - {"api"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "v1" not in p.relative_to(PACKAGE).parts
    }


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, name: str) -> set[str]:
    """Every recoveryd module ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "recoveryd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base.split(".")[0] != "recoveryd":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
    return out


def component_of(module: str) -> str:
    """The component a module belongs to (the longest matching prefix)."""
    best, length = "", -1
    for comp, prefixes in COMPONENTS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = comp, len(p)
    if not best:
        raise AssertionError(f"{module} is in no component: add it to COMPONENTS")
    return best


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Arrows the layers do not allow, and private modules used outside their package."""
    bad = []
    for src, targets in sorted(graph.items()):
        have = component_of(src)
        for dst in sorted(targets):
            want = component_of(dst)
            if want != have and want not in ARROWS[have]:
                bad.append(f"{src} ({have}) imports {dst} ({want})")
            parts = dst.split(".")
            for i, part in enumerate(parts):
                owner = ".".join(parts[:i])
                private = part.startswith("_") and not part.startswith("__") and i > 1
                if private and not (src == owner or src.startswith(owner + ".")):
                    bad.append(f"{src} imports {dst}, private to {owner}")
    return bad


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every import cycle among the modules (each as the path that closes it)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append([*path[path.index(n) :], n])
            elif n not in state and n in graph:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: imports_of(path, name) - {name} for name, path in mods.items()}


def test_every_module_is_in_a_component(graph: dict[str, set[str]]) -> None:
    for module in graph:
        component_of(module)


def test_no_import_runs_up_a_layer(graph: dict[str, set[str]]) -> None:
    assert violations(graph) == []


def test_the_import_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}, f"split these by responsibility (STYLE.md): {big}"


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        name
        for name, path in _modules().items()
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []


# ---- the checks themselves can fail -----------------------------------------------------


def test_an_upward_arrow_is_found() -> None:
    graph = {
        "recoveryd.transport.sender": {"recoveryd.agent.link"},
        "recoveryd.metrics": {"recoveryd.coordinator.planner"},
        "recoveryd.protocol": {"recoveryd"},
    }
    assert violations(graph) == [
        "recoveryd.metrics (metrics) imports recoveryd.coordinator.planner (policy)",
        "recoveryd.protocol (protocol) imports recoveryd (api)",
        "recoveryd.transport.sender (transport) imports recoveryd.agent.link (agent)",
    ]


def test_a_sibling_arrow_and_a_private_module_are_found() -> None:
    graph = {
        "recoveryd.agent.client": {"recoveryd.coordinator.membership"},
        "recoveryd.sidecar.share": {"recoveryd.transport._flatten"},
        "recoveryd.transport.tree": {"recoveryd.transport._flatten", "recoveryd._time"},
    }
    assert violations(graph) == [
        "recoveryd.agent.client (agent) imports recoveryd.coordinator.membership (policy)",
        "recoveryd.sidecar.share imports recoveryd.transport._flatten, private to "
        "recoveryd.transport",
    ]


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_imports_are_read_wherever_they_stand(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from recoveryd.agent import Agent\n"
        "def f():\n    import recoveryd.transport.sender\n"
        "    from recoveryd import codec\n"
        "from recoveryd.transport import format as f2\n"
    )
    assert imports_of(src, "recoveryd.x") == {
        "recoveryd.agent",
        "recoveryd.transport.sender",
        "recoveryd.codec",
        "recoveryd.transport.format",
    }
