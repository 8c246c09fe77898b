"""The package's imports point one way: decomposition <- formats/layers <- surgery <- pipeline <- cli, server.

Walks the import statements of src/embfactor (top-level and inside functions, all counted) and fails on a cycle
between modules, on a cycle between packages, or on an arrow that points up. A registry loading its built-in
members on first use (``formats.get_format``, ``eval.tasks``) keeps the registry in a module of its own that the
members import, so even those lazy imports make no cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "embfactor"

# package -> packages it must never import, even lazily (the layering of the issue's "arrows one way")
FORBIDDEN = {
    "decomposition": {"formats", "layers", "surgery", "pipeline", "eval", "train", "models", "hf", "cli", "server"},
    "formats": {"layers", "surgery", "pipeline", "eval", "train", "models", "hf", "cli", "server"},
    "layers": {"surgery", "pipeline", "eval", "train", "models", "hf", "cli", "server"},
    # surgery owns the quantization_config record (surgery.qconfig); hf registers it and its quantizer with
    # transformers and sits above surgery (issue 23: the two imported each other inside functions)
    "surgery": {"pipeline", "eval", "train", "models", "hf", "cli", "server"},
    "hf": {"pipeline", "eval", "train", "models", "cli", "server"},
    # eval holds the metrics; the check of a written folder (verify) and the planner read them, not the reverse
    "eval": {"pipeline", "train", "plan", "verify", "models", "cli", "server"},
    "data": {"formats", "layers", "surgery", "plan", "eval", "train", "verify", "pipeline", "models", "cli", "server"},
    "plan": {"pipeline", "train", "verify", "models", "cli", "server"},
    "train": {"pipeline", "cli", "server"},
    "verify": {"pipeline", "train", "cli", "server"},
    "pipeline": {"cli", "server"},
    "config": {"formats", "layers", "surgery", "pipeline", "eval", "train", "cli", "server"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = p
    return out


def _imports(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported module, lazy) for every import of an embfactor module."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in ast.walk(tree) if not any(isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                        for a in _parents(tree, n))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                target = resolve(n) if n.startswith("embfactor.") else None
                # a package's own __init__ (imported by its members) is not an arrow back
                if target and target != mod and not mod.startswith(target + "."):
                    found.append((mod, target, id(node) not in top))
    return found


def _parents(tree: ast.AST, node: ast.AST) -> list[ast.AST]:
    if not hasattr(_parents, "cache") or _parents.cache[0] is not tree:
        parent: dict[int, ast.AST] = {}
        for p in ast.walk(tree):
            for c in ast.iter_child_nodes(p):
                parent[id(c)] = p
        _parents.cache = (tree, parent)
    parent = _parents.cache[1]
    out, cur = [], parent.get(id(node))
    while cur is not None:
        out.append(cur)
        cur = parent.get(id(cur))
    return out


def _package(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else ""


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle():
    edges: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in _imports(_modules()):
        edges[a].add(b)
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = defaultdict(set)
    for a, b, _ in _imports(_modules()):
        if _package(a) != _package(b):
            edges[_package(a)].add(_package(b))
    cycle = _cycle(edges)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_arrows_point_one_way():
    bad = sorted(
        f"{a} imports {b}" for a, b, _ in _imports(_modules()) if _package(b) in FORBIDDEN.get(_package(a), ())
    )
    assert not bad, "\n".join(bad)


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_registered_quant_method_is_the_records():
    """hf.hook keeps the name as a literal (importing the record would import torch on `import embfactor`)."""
    from embfactor.hf.hook import QUANT_METHOD
    from embfactor.surgery.qconfig import QUANT_METHOD as RECORD_METHOD
    from embfactor.surgery.qconfig import EmbfactorConfig

    assert QUANT_METHOD == RECORD_METHOD == EmbfactorConfig("int", {}, 4, 2, "e").quant_method
