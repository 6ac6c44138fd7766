"""The stages import one way (docs/DESIGN-NOTES.md, "Stages and the import rule").

Every module of the package is parsed (``ast``, never imported): its imports at module level
and inside functions, the modules named in strings for a lazy import (``importlib``, the
runtime's table of names), and the attributes it reads of the modules it imported. Each module
belongs to one layer; a layer imports its own modules and the layers below it only. There is no
cycle between modules, whether the imports close it at load time or inside a function, and no
module reads a private name (``_x``) of another one. No exceptions are listed: a module that
needs something of a higher layer gets it moved down.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Set, Tuple

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "attncc"

# layer -> the layers below it, which its modules may import (their own layer too)
BELOW: Dict[str, Set[str]] = {
    "core": set(),                                  # the shared vocabulary: imports nothing of attncc
    "spec": {"core"},                               # TOML -> Pattern
    "runtime": {"core"},                            # what generated modules import at run time
    "reference": {"spec", "core"},                  # the float64 truth, independent of what it checks
    "analysis": {"spec", "core"},                   # Pattern -> Plan
    "codegen": {"analysis", "spec", "core"},        # Plan -> source
    "top": {"codegen", "analysis", "reference", "runtime", "spec", "core"},
}
# module (or package, with everything in it) -> its layer; a new top-level module needs a line here
LAYER_OF = {
    "attncc.core": "core",
    "attncc.spec": "spec",
    "attncc.runtime": "runtime",
    "attncc._reference": "reference",
    "attncc.evaluator": "reference",  # the IR evaluator of the reference (torch) and of pair_counts (numpy)
    "attncc.analysis": "analysis",
    "attncc.codegen": "codegen",
    # entry points, the compile API, explain's numbers, integrations
    "attncc": "top", "attncc.__main__": "top", "attncc.cli": "top", "attncc.console": "top",
    "attncc.explain": "top", "attncc.report": "top", "attncc.pair_counts": "top", "attncc.tune": "top",
    "attncc.module_cache": "top",
    "attncc.integrations": "top", "attncc.distributed": "top",
}


class Use(NamedTuple):
    """One module using another: an import (``name``: the name it takes, or None for the module
    itself) or an attribute read of an imported module (``name``: the attribute)."""

    source: str
    target: str
    name: object
    line: int


def module_names(root: Path) -> Dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str:
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or (module.startswith(prefix + ".") and prefix != PACKAGE):
            return LAYER_OF[prefix]
    raise AssertionError(f"{module}: no layer; add it to LAYER_OF in {Path(__file__).name}")


def _private(name: object) -> bool:
    return isinstance(name, str) and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def uses(module: str, source: str, modules: Set[str], is_package: bool) -> Iterator[Use]:
    """The modules of the package that ``module`` (its text ``source``) uses, and how."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]

    def deepest(name: str) -> str:  # ``a.b.c`` -> the longest prefix that is a module
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    bound: Dict[str, str] = {}  # local name -> the module it was bound to by an import
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                target = deepest(alias.name)
                yield Use(module, target, None, node.lineno)
                # ``import a.b`` binds ``a``; ``import a.b as x`` binds ``x`` to a.b
                bound[alias.asname or alias.name.split(".")[0]] = target if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from attncc.runtime import tiles``: the module tiles
                    yield Use(module, sub, None, node.lineno)
                    bound[alias.asname or alias.name] = sub
                else:
                    yield Use(module, deepest(base), alias.name, node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules
              and node.value != PACKAGE and id(node) not in docstrings):
            yield Use(module, node.value, None, node.lineno)  # imported by name, on first use
    # attribute reads of imported modules: ``tiles._hull(x)``, ``attncc.runtime.tiles.EMPTY``
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            target = _module_of(node.value, bound, modules)
            if target is not None and f"{target}.{node.attr}" not in modules:
                yield Use(module, target, node.attr, node.lineno)


def _module_of(node: ast.AST, bound: Dict[str, str], modules: Set[str]):
    """The module an expression names (``tiles``, ``attncc.runtime.tiles``), else None."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        outer = _module_of(node.value, bound, modules)
        if outer is not None and f"{outer}.{node.attr}" in modules:
            return f"{outer}.{node.attr}"
    return None


def check(sources: Dict[str, Tuple[str, bool]]) -> List[str]:
    """The rule's violations among modules ``{name: (source, is_package)}``, as sentences."""
    modules = set(sources)
    problems = []
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, (source, is_package) in sorted(sources.items()):
        for use in uses(module, source, modules, is_package):
            if use.target == module:
                continue  # a module naming itself (``python -m`` running it as __main__)
            where = f"{module}:{use.line}"
            low, high = layer_of(use.target), layer_of(module)
            if low != high and low not in BELOW[high]:
                problems.append(f"{where}: {high} module imports {use.target} ({low}), not a layer below")
            if _private(use.name):
                problems.append(f"{where}: private name {use.name} of {use.target}")
            if use.name is None or use.target != module:
                graph.add_edge(module, use.target)
    cycles = [c[c.index(min(c)):] + c[:c.index(min(c))] for c in nx.simple_cycles(graph)]  # from its first name
    problems += sorted("import cycle: " + " -> ".join(c + c[:1]) for c in cycles)
    return list(dict.fromkeys(problems))  # each once (a line may read a module's names twice)


def package_sources(root: Path = ROOT) -> Dict[str, Tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in module_names(root).items()}


def test_stages_import_downward_without_cycles_or_private_names():
    problems = check(package_sources())
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for name in module_names(ROOT):
        layer_of(name)
    assert set(LAYER_OF.values()) <= set(BELOW)
    assert all(below <= set(BELOW) for below in BELOW.values())


def test_layers_form_an_order():
    # what a layer may import never leads back to it
    graph = nx.DiGraph([(layer, low) for layer, lows in BELOW.items() for low in lows])
    assert nx.is_directed_acyclic_graph(graph)
    assert all(BELOW[low] <= lows for lows in BELOW.values() for low in lows), "BELOW must be transitive"


def test_generated_modules_import_only_the_runtime():
    for path in sorted((ROOT / "generated").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] == PACKAGE:
                    assert name == "attncc.runtime" or name.startswith("attncc.runtime."), f"{path.name}: imports {name}"


# --- the checker itself: each kind of violation is found ------------------------------------------------

FAKE = {
    "attncc": ("", True),
    "attncc.core": ("", True),
    "attncc.core.tiles": ("EMPTY = 0\n_secret = 1\n", False),
    "attncc.spec": ("", True),
    "attncc.spec.load": ("from attncc.core import tiles\n", False),
    "attncc.analysis": ("", True),
    "attncc.analysis.plan": ("from attncc.spec import load\n", False),
    "attncc.codegen": ("", True),
    "attncc.codegen.emit": ("from attncc.analysis.plan import *\n", False),
    "attncc.runtime": ("", True),
    "attncc.runtime.call": ("from attncc.core.tiles import EMPTY\n", False),
}


def _with(module: str, source: str):
    return {**FAKE, module: (FAKE.get(module, ("", False))[0] + source, False)}


def test_checker_accepts_downward_imports():
    assert check(FAKE) == []


@pytest.mark.parametrize("module, source, found", [
    ("attncc.spec.load", "from attncc.analysis import plan\n", "spec module imports attncc.analysis.plan"),
    ("attncc.spec.load", "def f():\n    import attncc.codegen.emit\n", "imports attncc.codegen.emit"),
    ("attncc.runtime.call", "from attncc.spec.load import x\n", "imports attncc.spec.load"),
    ("attncc.core.tiles", "def f():\n    from attncc.runtime.call import Call\n", "core module imports"),
    ("attncc.analysis.plan", "import importlib\nM = importlib.import_module('attncc.codegen.emit')\n",
     "imports attncc.codegen.emit"),
    ("attncc.runtime.call", "from attncc.core.tiles import _secret\n", "private name _secret"),
    ("attncc.runtime.call", "from attncc.core import tiles\ny = tiles._secret\n", "private name _secret"),
    ("attncc.codegen.emit", "def f():\n    import attncc.core.tiles as t\n    return t._secret\n", "private name _secret"),
    ("attncc.analysis.plan", "from . import other\n", None),
])
def test_checker_finds_violations(module, source, found):
    sources = _with(module, source)
    if found is None:  # a relative import of a missing module: nothing to say
        assert check(sources) == []
        return
    problems = check(sources)
    assert any(found in p for p in problems), problems


def test_checker_finds_cycles_through_function_imports():
    sources = {**FAKE, "attncc.runtime.launch": ("from attncc.runtime import tuning\n", False),
               "attncc.runtime.tuning": ("def f():\n    from attncc.runtime.launch import pick\n", False)}
    assert check(sources) == ["import cycle: attncc.runtime.launch -> attncc.runtime.tuning -> attncc.runtime.launch"]
