"""The package's import graph (read with ast, nothing imported): no cycle between modules, imports at the top
of modules, no private name imported across modules, and the model-agnostic stages free of model code."""
from __future__ import annotations

import ast
from pathlib import Path

import gradtrace

ROOT = Path(gradtrace.__file__).parent
AGNOSTIC = ("features", "methods", "weights", "evaluate", "attribution")
# The model-adapter interface and registry; everything else under adapters/ is one kind of model.
SEAM = {"gradtrace.adapters", "gradtrace.adapters.base", "gradtrace.adapters.checkpoint",
        "gradtrace.adapters.layers", "gradtrace.adapters.train_state"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def resolve(name: str, known: set[str]) -> str | None:
    """The gradtrace module an import refers to (a name imported from a package resolves to the package)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) of every module-level gradtrace import."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradtrace"):
            sub = [f"{node.module}.{a.name}" for a in node.names]
            for full, alias in zip(sub, node.names):
                target = full if full in known else resolve(node.module, known)
                out.append((target, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gradtrace"):
                    out.append((resolve(alias.name, known), [], node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _, _ in module_imports(tree, known) if t and t != name} for name, tree in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_at_module_top():
    """No gradtrace import hides inside a function (the way import cycles used to be dodged)."""
    late = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("gradtrace"):
                        late.append(f"{name}:{inner.lineno}")
    assert late == []


def test_no_private_name_imported_across_modules():
    mods = modules()
    known = set(mods)
    bad = [f"{name}:{line} {names[0]}" for name, tree in mods.items()
           for _, names, line in module_imports(tree, known)
           if names and names[0].startswith("_") and not names[0].endswith("__")]
    assert bad == []


def test_model_agnostic_packages_import_no_model_code():
    """features/, methods/, weights/, evaluate/, attribution/ reach models only through the adapter seam."""
    edges = graph()
    bad = [f"{src} -> {dst}" for src, dsts in edges.items() if src.split(".")[1:2] in ([p] for p in AGNOSTIC)
           for dst in dsts if dst.startswith("gradtrace.adapters") and dst not in SEAM]
    assert bad == []
