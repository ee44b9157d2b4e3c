"""The package's floors: every import (function-local ones too) points down or sideways, never up, and no modules
import each other in a circle. And the public API is the committed one (tests/public_api.json).

Regenerate the committed API after a deliberate change with ``python tests/test_layers.py``.
"""

from __future__ import annotations

import ast
import enum
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import fair_forge.explainability as api

PACKAGE = Path(api.__file__).resolve().parent
API_FILE = Path(__file__).with_name("public_api.json")
# lowest first; a module may import its own floor and the floors below it
FLOORS: dict[str, int] = {
    "errors": 0, "core": 1, "viz": 2, "text": 3, "runtime": 4, "methods": 5,
    "explainer": 6, "item_plan": 6, "similarity": 6, "evaluation": 6, "runs": 7, "cli": 8, "__init__": 9, "_facade": 9,
}
# the one deliberate upward import: the result types' display/storage methods reach viz/ and runs/ through the
# facade (core/types.py, ``_facade``), imported on first use
ALLOWED_UP = {("core.types", "_facade")}


def _modules() -> dict[str, Path]:
    """Dotted module names inside the package (``methods`` for methods/__init__.py) -> their files."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING blocks)."""
    is_package = path.name == "__init__.py"
    here = [] if name == "__init__" else name.split(".")
    base_of_file = here if is_package else here[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("fair_forge.explainability"):
                    continue
                base = node.module.split(".")[2:]
            else:
                base = base_of_file[: len(base_of_file) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                candidate = ".".join(base + [alias.name])
                targets.add(candidate if candidate in modules else ".".join(base) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fair_forge.explainability."):
                    targets.add(".".join(alias.name.split(".")[2:]))
    return {target for target in targets if target in modules and target != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_every_module_lives_on_a_floor() -> None:
    assert {name.split(".")[0] for name in _modules()} <= set(FLOORS)


def test_no_import_points_up() -> None:
    upward = sorted((source, target) for source, targets in _graph().items() for target in targets
                    if _floor(target) > _floor(source) and (source, target) not in ALLOWED_UP)
    assert upward == [], f"imports against the floors (source -> target): {upward}"


def test_no_import_circle() -> None:
    graph = {source: {t for t in targets if (source, t) not in ALLOWED_UP} for source, targets in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == [], f"modules that import each other in a circle: {circles}"


def test_the_walk_sees_function_local_and_relative_imports() -> None:
    """The checks above can fail: known arrows of each kind are found (a function-local import in the CLI, a
    sibling module imported by ``from . import``, the facade's one upward arrow)."""
    graph = _graph()
    assert "runs.datasets" in graph["cli.dataset"]  # imported inside run_dataset
    assert {"methods.gradient", "methods.perturbation", "methods.registry"} <= graph["methods"]
    assert "_facade" in graph["core.types"] and _floor("_facade") > _floor("core.types")


def test_no_module_is_over_450_lines() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 450}
    assert long == {}


# ---- the public API --------------------------------------------------------------------------------------------------


def _describe(obj: Any) -> Any:
    """A public name as comparable data: a class's bases, public members' signatures and pydantic fields; a
    function's signature; a constant's repr. Module paths are left out (they are not the API)."""
    if inspect.isclass(obj):
        if issubclass(obj, enum.Enum):
            return {"enum": [member.value for member in obj]}
        members: dict[str, Any] = {}
        for name, value in sorted(vars(obj).items()):
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                members[name] = "property"
            elif callable(value):
                try:
                    members[name] = str(inspect.signature(value))
                except (TypeError, ValueError):
                    members[name] = "callable"
        fields = getattr(obj, "model_fields", None)
        if fields is not None:
            members["model_fields"] = {key: str(info.annotation) for key, info in fields.items()}
        return {"class": [base.__name__ for base in obj.__mro__[1:] if base.__module__.startswith("fair_forge")],
                "members": members}
    if callable(obj):
        return {"signature": str(inspect.signature(obj))}
    return {"value": repr(obj)}


def public_api() -> dict[str, Any]:
    text = json.dumps({name: _describe(getattr(api, name)) for name in sorted(api.__all__)}, indent=1, sort_keys=True)
    return json.loads(re.sub(r"fair_forge\.explainability\.(\w+\.)*", "", text))


def test_the_public_api_is_the_committed_one() -> None:
    committed = json.loads(API_FILE.read_text(encoding="utf-8"))
    current = public_api()
    assert sorted(current) == sorted(committed), "names added to or removed from __all__"
    changed = {name: (committed[name], current[name]) for name in committed if committed[name] != current[name]}
    assert changed == {}, f"public signatures changed (regenerate with python {Path(__file__).name}): {changed}"


if __name__ == "__main__":
    API_FILE.write_text(json.dumps(public_api(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {API_FILE}", file=sys.stderr)
