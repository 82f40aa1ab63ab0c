"""The package's shape: imports run one way, every module imports on its own, functions stay short.

These read the source (``ast``), so they hold for imports inside functions too: a "lazy"
import that closes a circle is still a circle.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "covinit"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """covinit modules that ``path`` imports anywhere in its body (``from covinit import x``
    counts as importing ``covinit.x`` when ``x`` is a module, else the package itself)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "covinit")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "covinit":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_inside_the_package():
    graph = _graph()
    # The package's __init__ re-exports the public names: every other module sits below it
    # and must never import from it.
    users = sorted(name for name, deps in graph.items() if "covinit" in deps and name != "covinit")
    assert users == [], f"modules importing the package root: {users}"
    graph.pop("covinit")
    assert _cycle(graph) is None, f"import circle: {' → '.join(_cycle(graph) or [])}"


def test_every_module_imports_on_its_own():
    """Each module imports in a fresh interpreter, so none depends on another having been
    imported first (one subprocess: the package is dropped from sys.modules between modules)."""
    names = sorted(name for name in _modules() if name != "covinit.__main__")  # runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k == 'covinit' or k.startswith('covinit.')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_module_hides_behind_a_function_of_the_same_name():
    """``import covinit.x`` must give the module, not a re-exported function called ``x``."""
    import covinit

    for name in _modules():
        if name.count(".") == 1 and not name.endswith("__main__"):
            attr = getattr(covinit, name.split(".")[1], None)
            module = importlib.import_module(name)
            assert attr is None or attr is module, \
                f"covinit.{name.split('.')[1]} is {type(attr).__name__}, not the module {name}"


def test_functions_stay_short():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("needle", ["DESIGN.md"])
def test_docstrings_cite_only_what_users_can_read(needle):
    cited = [name for name, path in _modules().items() if needle in path.read_text("utf-8")]
    assert cited == [], f"{needle} is not shipped with the package but cited in {cited}"
