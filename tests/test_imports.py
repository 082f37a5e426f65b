"""Import structure of the package: no private name crosses modules, no import cycle at module level, and
``sparsekern.plan`` is a leaf.

The checks read the sources with :mod:`ast` (nothing is imported), so they see every module, including
those that need a GPU or optional packages. Each check is a function of ``{module name: source}`` and is
also run on small synthetic packages, to show that it fails where it should.

Rules:

* **private names**: ``from sparsekern.x import _name`` (or ``import``/``from`` of a private module
  ``sparsekern.x._mod``) is allowed only inside the package that owns the private name: a module of
  ``sparsekern.ops`` may import ``sparsekern.ops._ext``, ``sparsekern.bench`` may not. Both module-level and
  function-level imports count.
* **cycles**: the graph of module-level imports (``if TYPE_CHECKING:`` blocks excluded; an import inside a
  function runs at call time and cannot deadlock module initialisation) among sparsekern modules has no
  cycle. A package importing its own submodules and a submodule importing its own package are not edges
  of the graph (that is how a package re-exports its submodules).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> directory, as pyproject.toml's ``package-dir`` maps them
PACKAGE_DIRS = {"sparsekern": ROOT / "sparsekern", "sparsekern.methods": ROOT / "methods"}


def package_sources() -> dict[str, str]:
    """Module name -> source of every module of sparsekern (sparsekern.methods from ``methods/``)."""
    out: dict[str, str] = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "__pycache__" in rel.parts or (package == "sparsekern" and parts[:1] == ["methods"]):
                continue
            out[".".join([package, *parts])] = path.read_text()
    return out


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """Absolute name of the module named by an import statement in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _imports(importer: str, source: str, packages: set[str], *, module_level: bool) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) of the sparsekern imports of a module. With
    ``module_level``, only the statements that run when the module is imported (not in functions, not under
    ``if TYPE_CHECKING:``)."""
    tree = ast.parse(source)
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, None, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(importer, importer in packages, child.level, child.module)
                found.extend((target, a.name, child.lineno) for a in child.names)
            visit(child)

    visit(tree)
    return [(t, n, line) for t, n, line in found if t == "sparsekern" or t.startswith("sparsekern.")]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def private_imports(sources: dict[str, str]) -> list[str]:
    """One line per import of a private name or module from outside the package that owns it."""
    packages = {m for m, s in sources.items() if _declares_package(m, sources)}
    bad = []
    for importer, source in sources.items():
        for target, name, line in _imports(importer, source, packages, module_level=False):
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not _inside(importer, ".".join(parts[:i])):
                    bad.append(f"{importer}:{line} imports the private module {target}")
                    break
            else:
                if name and name.startswith("_") and not name.startswith("__") and not (
                        target in packages and _inside(importer, target)):
                    bad.append(f"{importer}:{line} imports the private name {name} from {target}")
    return list(dict.fromkeys(bad))  # one line per statement, not per imported name


def _declares_package(module: str, sources: dict[str, str]) -> bool:
    """A module is a package when another module lives inside it."""
    return any(other.startswith(module + ".") for other in sources)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the sparsekern modules it imports at module level (see the module docstring)."""
    packages = {m for m in sources if _declares_package(m, sources)}
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for importer, source in sources.items():
        for target, name, _ in _imports(importer, source, packages, module_level=True):
            targets = {target}
            if name and f"{target}.{name}" in sources:  # from package import submodule
                targets.add(f"{target}.{name}")
            for t in targets:
                if t in sources and t != importer and not _inside(importer, t) and not _inside(t, importer):
                    graph[importer].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


# ----------------------------------------------------------------------------- the package
SOURCES = package_sources()


def test_the_sources_were_found() -> None:
    for module in ("sparsekern.plan", "sparsekern.graph", "sparsekern.utils", "sparsekern.ops._ext",
                   "sparsekern.methods.sanp", "sparsekern.methods._reconstruction"):
        assert module in SOURCES


def test_no_private_name_is_imported_across_modules() -> None:
    assert private_imports(SOURCES) == []


def test_no_import_cycle_at_module_level() -> None:
    assert cycles(import_graph(SOURCES)) == []


def test_plan_is_a_leaf() -> None:
    """``sparsekern.plan`` imports nothing of sparsekern at module level but ``sparsekern.utils``, which
    imports nothing of sparsekern; neither loads torch. (``Plan.from_channel_masks``, which traces a model,
    imports ``sparsekern.graph`` when it is called.)"""
    packages = {m for m in SOURCES if _declares_package(m, SOURCES)}
    plan = {t for t, _, _ in _imports("sparsekern.plan", SOURCES["sparsekern.plan"], packages, module_level=True)}
    assert plan == {"sparsekern.utils"}
    assert _imports("sparsekern.utils", SOURCES["sparsekern.utils"], packages, module_level=False) == []
    code = "import sys, sparsekern.plan; assert 'torch' not in sys.modules, 'sparsekern.plan loaded torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- the checks can fail
BAD = {
    "sparsekern": "",
    "sparsekern.a": "from sparsekern.b import _helper\nimport sparsekern.c\n",
    "sparsekern.b": "import sparsekern.a\n\n_helper = 1\n",
    "sparsekern.c": "def f():\n    from sparsekern.a import x  # at call time: not an edge\n",
    "sparsekern.pkg": "from sparsekern.pkg import _private_mod\n",
    "sparsekern.pkg._private_mod": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sparsekern.d\n",
    "sparsekern.pkg.inner": "from sparsekern.pkg import _private_mod\nfrom . import _private_mod as again\n",
    "sparsekern.d": "from sparsekern.pkg._private_mod import thing\n",
    "sparsekern.e": "def f():\n    from sparsekern.b import _helper\n",
    "sparsekern.methods.x": "from sparsekern.methods.y import _score\n",
    "sparsekern.methods.y": "import sparsekern.pkg.inner\n",
}


def test_private_import_check_flags_a_synthetic_bad_package() -> None:
    bad = private_imports(BAD)
    assert any(line.startswith("sparsekern.a:1 ") and "_helper" in line for line in bad)
    assert any(line.startswith("sparsekern.e:2 ") and "_helper" in line for line in bad)  # in a function too
    assert any(line.startswith("sparsekern.d:1 ") and "private module sparsekern.pkg._private_mod" in line
               for line in bad)
    assert any(line.startswith("sparsekern.methods.x:1 ") and "_score" in line for line in bad)
    # inside the package that owns it, a private module may be imported (absolute or relative)
    assert not any(line.startswith(("sparsekern.pkg:", "sparsekern.pkg.inner:")) for line in bad)
    assert len(bad) == 4, bad


def test_cycle_check_flags_a_synthetic_cycle() -> None:
    graph = import_graph(BAD)
    assert graph["sparsekern.a"] == {"sparsekern.b", "sparsekern.c"}
    assert graph["sparsekern.c"] == set()  # a function-level import is not an edge
    assert graph["sparsekern.pkg._private_mod"] == set()  # nor one under TYPE_CHECKING
    assert cycles(graph) == [["sparsekern.a", "sparsekern.b"]]
    assert cycles(import_graph({k: v for k, v in BAD.items() if k != "sparsekern.b"})) == []


@pytest.mark.parametrize("module", ["sparsekern.plan", "sparsekern.utils"])
def test_leaf_check_sees_an_added_import(module: str) -> None:
    packages = {m for m in SOURCES if _declares_package(m, SOURCES)}
    source = SOURCES[module] + "\nfrom sparsekern.graph import trace_channels\n"
    assert "sparsekern.graph" in {t for t, _, _ in _imports(module, source, packages, module_level=True)}
