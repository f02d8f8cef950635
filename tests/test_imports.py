"""The house reads top-down: the layer order the library declares (`testbed.LAYERS`, its
pure core `testbed.PURE`), enforced by parsing every module's imports (ast, nothing is
imported to check).

Rules:
- a package of testbed/ imports only the packages below it in `LAYERS` (and itself);
  every package has a place in the order;
- the pure core (`PURE`: packages and modules) loads no asyncio, aiohttp or torch, however
  indirectly;
- nothing in testbed/ imports runners or tools; no runner imports tools;
- no circular imports between modules.
"Loads" follows the imports a module runs when it is imported (module level, its parent
packages' __init__ included); an import inside a function runs only when called, so it
counts for the layering rules but not for what a module loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("testbed", "runners", "tools", "tests")
FORBIDDEN = ("asyncio", "aiohttp", "torch")  # what the pure core never loads


def declared(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`LAYERS` and `PURE` as testbed/__init__.py states them (read, not imported)."""
    values: dict[str, tuple[str, ...]] = {"LAYERS": (), "PURE": ()}
    tree = ast.parse((root / "testbed" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in values:
            values[node.targets[0].id] = tuple(ast.literal_eval(node.value))
    return values["LAYERS"], values["PURE"]


@dataclass
class Graph:
    """Modules of a source tree and what each imports: `eager` at module level (run on
    import), `lazy` inside functions; both hold module names (internal ones resolved to
    the deepest existing module, external ones to their top-level package)."""

    modules: dict[str, Path] = field(default_factory=dict)
    eager: dict[str, set[str]] = field(default_factory=dict)
    lazy: dict[str, set[str]] = field(default_factory=dict)

    def imports(self, mod: str) -> set[str]:
        return self.eager.get(mod, set()) | self.lazy.get(mod, set())

    def loads(self, mod: str) -> set[str]:
        """Every module imported (transitively) when `mod` is imported."""
        seen: set[str] = set()
        todo = [mod]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo += self.eager.get(m, set())
            todo += _parents(m)
        return seen - {mod}


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build_graph(root: Path, packages: Iterable[str]) -> Graph:
    g = Graph()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            g.modules[_module_name(root, path)] = path
    for mod, path in g.modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        eager, lazy = g.eager.setdefault(mod, set()), g.lazy.setdefault(mod, set())
        for node, top in _imports(tree):
            for target in _targets(g, mod, is_pkg, node):
                if target != mod:
                    (eager if top else lazy).add(target)
    return g


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import with whether it runs at import time (not inside a function, nor under
    `if TYPE_CHECKING`)."""
    def walk(node: ast.AST, top: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, top
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                yield from walk(child, False)
            else:
                yield from walk(child, top)

    yield from walk(tree, True)


def _targets(g: Graph, mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {_resolve(g, a.name) for a in node.names}
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    out = set()
    for a in node.names:
        sub = f"{name}.{a.name}"
        out.add(sub if sub in g.modules else _resolve(g, name))
    return out


def _resolve(g: Graph, name: str) -> str:
    """The deepest module of the tree that `name` names, or its top-level package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in g.modules:
            return ".".join(parts[:i])
    return parts[0]


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def cycles(g: Graph) -> list[list[str]]:
    """Circular imports between modules (Tarjan's strongly connected components of the
    internal import graph, eager and lazy imports together; a package and its own
    submodules excepted: `from . import x` in an __init__ is how packages are built)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def edges(m: str) -> list[str]:
        return sorted(t for t in g.imports(m) if t in g.modules and not _within(t, m) and not _within(m, t))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(g.modules):
        if m not in index:
            visit(m)
    return out


def _package(mod: str) -> str | None:
    """The package of testbed/ a module belongs to (None: testbed's own __init__, or outside)."""
    parts = mod.split(".")
    return parts[1] if parts[0] == "testbed" and len(parts) > 1 else None


def rule_violations(g: Graph, layers: tuple[str, ...], pure: tuple[str, ...]) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    out = []
    rank = {p: i for i, p in enumerate(layers)}
    for mod in sorted(g.modules):
        imports = g.imports(mod)
        if _within(mod, "testbed"):
            out += [f"{mod} imports {t} (the library imports no runner or tool)" for t in sorted(imports)
                    if _within(t, "runners") or _within(t, "tools")]
        if _within(mod, "runners"):
            out += [f"{mod} imports {t} (no runner imports a tool)" for t in sorted(imports) if _within(t, "tools")]
        here = _package(mod)
        if here is None:
            continue
        if here not in rank:
            out.append(f"{mod}: its package {here!r} has no place in testbed.LAYERS")
            continue
        for t in sorted(imports):
            there = _package(t)
            if there is not None and there != here and rank.get(there, -1) <= rank[here]:
                out.append(f"{mod} imports {t} ({there} is not below {here} in testbed.LAYERS)")
    for mod in sorted(g.modules):
        if any(_within(mod, f"testbed.{p}") for p in pure):
            bad = sorted(g.loads(mod) & set(FORBIDDEN))
            out += [f"{mod} loads {b} (the pure core loads no asyncio, aiohttp or torch)" for b in bad]
    out += [f"circular imports: {' -> '.join(c)}" for c in cycles(g)]
    return out


# ---------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def project() -> Graph:
    return build_graph(ROOT, PACKAGES)


def test_the_project_keeps_its_import_rules(project: Graph) -> None:
    assert rule_violations(project, *declared(ROOT)) == []


def test_the_declared_order_names_every_package_and_only_those(project: Graph) -> None:
    layers, pure = declared(ROOT)
    packages = {p.name for p in (ROOT / "testbed").iterdir() if (p / "__init__.py").exists()}
    assert set(layers) == packages and len(layers) == len(set(layers))
    for name in pure:
        assert f"testbed.{name}" in project.modules, name
    assert len(project.modules) > 80  # every package was read


def test_every_folder_says_what_it_owns_and_may_import(project: Graph) -> None:
    """Each package's first lines (its docstring) say what it owns and what it may import."""
    for path in project.modules.values():
        if path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Owns" in doc and "import" in doc, f"{path.relative_to(ROOT)}: no statement of what it owns and imports"


# ---------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> Graph:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return build_graph(root, ("testbed", "runners", "tools"))


GOOD = {
    "testbed/__init__.py": "LAYERS = ('experiments', 'harness', 'agents', 'placement')\nPURE = ('placement',)\n",
    "testbed/placement/__init__.py": "",
    "testbed/placement/policy.py": "import math\nfrom .problem import x\n",
    "testbed/placement/problem.py": "import numpy\nx = 1\n",
    "testbed/agents/__init__.py": "",
    "testbed/agents/controller.py": "import asyncio\nimport torch\nfrom ..placement import policy\n",
    "testbed/harness/__init__.py": "",
    "testbed/harness/cluster.py": "from ..agents.controller import x\n",
    "testbed/experiments/__init__.py": "",
    "testbed/experiments/run.py": "from ..harness import cluster\n",
    "runners/__init__.py": "",
    "runners/run.py": "from testbed.harness import cluster\n",
    "tools/__init__.py": "",
    "tools/plot.py": "from testbed.placement.problem import x\n",
}


def _violations(root: Path, g: Graph) -> list[str]:
    return rule_violations(g, *declared(root))


def test_the_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    g = _tree(tmp_path, GOOD)
    assert _violations(tmp_path, g) == []
    assert g.eager["testbed.placement.policy"] == {"math", "testbed.placement.problem"}
    assert g.eager["testbed.agents.controller"] == {"asyncio", "torch", "testbed.placement.policy"}
    assert "torch" in g.loads("testbed.harness.cluster") and "asyncio" not in g.loads("testbed.placement.policy")


@pytest.mark.parametrize(("rel", "text", "message"), [
    ("testbed/placement/policy.py", "import asyncio\n", "testbed.placement.policy loads asyncio"),
    ("testbed/placement/problem.py", "from aiohttp import web\n", "testbed.placement.policy loads aiohttp"),
    ("testbed/placement/problem.py", "import torch\n", "testbed.placement.problem loads torch"),
    ("testbed/agents/controller.py", "def f():\n    from ..harness import cluster\n",
     "testbed.agents.controller imports testbed.harness.cluster"),
    ("testbed/harness/cluster.py", "from ..experiments.run import TORCH_THREADS\n",
     "testbed.harness.cluster imports testbed.experiments.run (experiments is not below harness"),
    ("testbed/placement/problem.py", "def f():\n    from ..agents import controller\n",
     "testbed.placement.problem imports testbed.agents.controller (agents is not below placement"),
    ("testbed/webview/__init__.py", "", "testbed.webview: its package 'webview' has no place"),
    ("testbed/placement/problem.py", "def f():\n    import runners.run\n", "testbed.placement.problem imports runners.run"),
    ("runners/run.py", "import tools.plot\n", "runners.run imports tools.plot"),
    ("testbed/placement/problem.py", "def f():\n    from . import policy\n",
     "circular imports: testbed.placement.policy -> testbed.placement.problem"),
])
def test_the_checker_finds_a_bad_import(tmp_path: Path, rel: str, text: str, message: str) -> None:
    g = _tree(tmp_path, {**GOOD, rel: text})
    found = _violations(tmp_path, g)
    assert any(v.startswith(message) for v in found), found


def test_a_lazy_import_loads_nothing_at_import_time(tmp_path: Path) -> None:
    g = _tree(tmp_path, {**GOOD, "testbed/placement/policy.py": "def f():\n    import torch\n"
                                                                 "if TYPE_CHECKING:\n    import asyncio\n"})
    assert g.lazy["testbed.placement.policy"] == {"torch", "asyncio"}
    assert not {"torch", "asyncio"} & g.loads("testbed.placement.policy")
