"""The layer order (README.md, docs/architecture.md) as a test: every arrow between gradtrace's top-level packages
runs down this list, never up and never sideways between two packages of one layer.

An arrow is an import anywhere in a module (top level or not), and also a string that names a gradtrace module
exactly (``"gradtrace.adapters.diffusers.build"``, ``"gradtrace.pipeline.train:train_run"``): what is loaded
later through `importlib.import_module`, or through a table of module paths used for lazy dispatch, is an arrow
like any other. An f-string that starts with a module path (``f"gradtrace.evaluate.{name}"``) points into that
module. Read with ast; nothing is imported.

The package's root (`gradtrace/__init__.py`) is the front door: its table of lazily loaded names may point into
any layer, and every other module may take only `__version__` from it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import gradtrace

ROOT = Path(gradtrace.__file__).parent

# Top to bottom. A layer may import any layer below it; the packages of one layer import none of each other.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("pipeline",),
    ("evaluate",),
    ("attribution", "report"),
    ("weights",),
    ("methods",),
    ("features",),
    ("adapters",),
    ("data",),
    ("io", "metrics", "precision", "ranks"),
    ("choices", "extras"),  # the named choices and defaults the specs offer; the optional packages (errors only)
    ("errors",),
]
FRONT_DOOR = "gradtrace"
FROM_FRONT_DOOR = {"__version__"}
MODULE_PATH = re.compile(r"^gradtrace(\.[A-Za-z_]\w*)+(:[A-Za-z_][\w.]*)?$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level package (or module) of a gradtrace module: `gradtrace.features.store` -> `features`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FRONT_DOOR


def resolve(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def arrows_of(tree: ast.Module, known: set[str]) -> list[tuple[str, int, str, list[str]]]:
    """(target module, line, how, imported names) of every gradtrace module that `tree` imports or names."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gradtrace"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full if full in known else resolve(node.module, known), node.lineno, "import",
                            [alias.name]))
        elif isinstance(node, ast.Import):
            out += [(resolve(a.name, known), node.lineno, "import", []) for a in node.names
                    if a.name.split(".")[0] == "gradtrace"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.match(node.value):
            target = node.value.partition(":")[0]
            if target in known:  # a format tag such as "gradtrace.checkpoint" names no module
                out.append((target, node.lineno, "string", []))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            prefix = str(node.values[0].value)
            if prefix.startswith("gradtrace.") and MODULE_PATH.match(prefix.rstrip(".:")):
                target = resolve(prefix.rstrip(".:"), known)
                if target:
                    out.append((target, node.lineno, "string", []))
    return [a for a in out if a[0]]


def trees() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def arrows(mods: dict[str, ast.Module] | None = None) -> list[tuple[str, str, int, str, list[str]]]:
    """(source module, target module, line, how, names) for every arrow between two gradtrace modules."""
    mods = trees() if mods is None else mods
    known = set(mods)
    return [(name, target, line, how, names) for name, tree in mods.items()
            for target, line, how, names in arrows_of(tree, known) if target != name]


def rank() -> dict[str, int]:
    return {package: i for i, layer in enumerate(LAYERS) for package in layer}


def wrong_way(edges: list[tuple[str, str, int, str, list[str]]], ranks: dict[str, int]) -> list[str]:
    """Every arrow that runs up the order or sideways within a layer, as 'module:line -> module (how)'."""
    bad = []
    for src, dst, line, how, names in edges:
        a, b = package_of(src), package_of(dst)
        if a == b or a == FRONT_DOOR:
            continue
        if b == FRONT_DOOR:
            if how != "import" or not names or not set(names) <= FROM_FRONT_DOOR:
                bad.append(f"{src}:{line} -> {dst} ({how} {', '.join(names) or 'the package'})")
        elif ranks[a] >= ranks[b]:
            bad.append(f"{src}:{line} -> {dst} ({how})")
    return bad


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in trees()} - {FRONT_DOOR}
    ranks = rank()
    assert sorted(packages - set(ranks)) == [], "place each new top-level package or module in LAYERS"
    assert sorted(set(ranks) - packages) == [], "LAYERS names a package that no longer exists"


def test_no_arrow_runs_up_or_sideways():
    assert wrong_way(arrows(), rank()) == []


def test_the_checker_finds_planted_arrows():
    """Upward imports, a lazy import_module string, a dispatch table of module paths, an f-string prefix, a
    sideways import and anything but __version__ from the front door are all found; downward ones pass."""
    src = {
        "gradtrace": "X = {'a': 'gradtrace.cli'}",
        "gradtrace.cli": "from gradtrace import __version__\nimport gradtrace.pipeline",
        "gradtrace.pipeline": "from gradtrace.io import write_json_atomic",
        "gradtrace.io": "from gradtrace.pipeline import run",
        "gradtrace.data": "from importlib import import_module\nm = import_module('gradtrace.features')",
        "gradtrace.features": "TABLE = {'train': 'gradtrace.cli:main', 'tag': 'gradtrace.checkpoint'}",
        "gradtrace.methods": "def f(name):\n    from gradtrace.weights import learn\n    return name",
        "gradtrace.weights": "import gradtrace\nM = f'gradtrace.methods.{1}'\nP = f'gradtrace.pipeline.{1}'",
        "gradtrace.report": "from gradtrace.attribution import score",
        "gradtrace.attribution": "from gradtrace import UserError",
    }
    mods = {name: ast.parse(code) for name, code in src.items()}
    ranks = {"cli": 0, "pipeline": 1, "attribution": 2, "report": 2, "weights": 3, "methods": 4, "features": 5,
             "data": 6, "io": 7}
    assert wrong_way(arrows(mods), ranks) == [
        "gradtrace.io:1 -> gradtrace.pipeline (import)",
        "gradtrace.data:2 -> gradtrace.features (string)",
        "gradtrace.features:1 -> gradtrace.cli (string)",
        "gradtrace.methods:2 -> gradtrace.weights (import)",
        "gradtrace.weights:1 -> gradtrace (import the package)",
        "gradtrace.weights:3 -> gradtrace.pipeline (string)",
        "gradtrace.report:1 -> gradtrace.attribution (import)",
        "gradtrace.attribution:1 -> gradtrace (import UserError)",
    ]
