"""Dependencies run one way: transport -> service -> engine -> model -> memory ->
shared types; clients use only the shared types and the API. Every import of our
own modules (top-level or inside a function) is checked against the layer table,
so a cycle between folders cannot come back unnoticed."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHARED = {"lorapool.spec", "lorapool.types", "lorapool.errors", "lorapool.progress"}
API = {"lorapool.v1", "lorapool.convert"}
# layer -> layers its modules may import (besides their own)
ALLOWED = {
    "lorapool.v1": set(),
    "lorapool.spec": set(),
    "lorapool.types": set(),
    "lorapool.errors": set(),
    "lorapool.progress": set(),
    "lorapool.convert": {"lorapool.v1", "lorapool.types", "lorapool.errors"},
    "lorapool.memory": SHARED,
    "lorapool.server": set(),  # the package itself; modules belong to the layers below
    "lorapool.server.model": SHARED | {"lorapool.memory"},
    "lorapool.server.engine": SHARED | {"lorapool.memory", "lorapool.server.model"},
    "lorapool.server.metrics": set(),
    "lorapool.server.service": SHARED | API | {"lorapool.server.engine", "lorapool.server.metrics"},
    "lorapool.server.transport": SHARED
    | API
    | {
        "lorapool.server.service",
        "lorapool.server.metrics",
        "lorapool.server.engine",
        "lorapool.demo",
    },
    "lorapool.server.ray": SHARED
    | API
    | {
        "lorapool.server.service",
        "lorapool.server.metrics",
        "lorapool.server.engine",
        "lorapool.server.transport",
    },
    "lorapool.client": SHARED | API,
    "lorapool.demo": SHARED,
}
# The package root is the public facade: it re-exports lazily from every layer.
FACADE = {"lorapool"}


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / path for name, path in config["tool"]["setuptools"]["package-dir"].items()}


def our_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """Every lorapool module `name` imports, relative imports resolved."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base not in FACADE:  # `from lorapool import x` imports x, not the facade
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "lorapool" or m.startswith("lorapool.")}


def layer_of(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in our_modules() if m not in FACADE and layer_of(m) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_imports_run_one_way():
    modules = our_modules()
    wrong = []
    for name, path in sorted(modules.items()):
        if name in FACADE:
            continue
        own = layer_of(name)
        for target in sorted(imports_of(name, path)):
            layer = layer_of(target)
            if target in FACADE or layer is None:
                if target in modules or target == "lorapool":
                    wrong.append(f"{name} imports {target} (the package root)")
                continue
            if layer != own and layer not in ALLOWED[own]:
                wrong.append(f"{name} ({own}) imports {target} ({layer})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path):
    """Guard against a checker that cannot fail: a memory module importing the
    engine is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from lorapool.server.engine.engine import Engine\nfrom . import pool\n")
    found = imports_of("lorapool.memory.bad", bad)
    assert "lorapool.server.engine.engine" in found and "lorapool.memory.pool" in found
    assert layer_of("lorapool.server.engine.engine") not in ALLOWED["lorapool.memory"]
