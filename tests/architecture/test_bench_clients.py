"""bench/ scripts are thin clients of gradtrace and of bench/common.py (read with ast, nothing run): no script
imports another script or tests/, none edits sys.path, and no test imports bench/ (the tests that check a
benchmark's figures run its script)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def imported(tree: ast.Module) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


def edits_sys_path(tree: ast.Module) -> list[int]:
    """Lines that call a method of sys.path (insert, append, extend)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "path"
            and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys"]


def offences(files: dict[str, str], scripts: set[str], *, is_test: bool) -> list[str]:
    bad = []
    for name, text in files.items():
        tree = ast.parse(text)
        for module, line in imported(tree):
            top = module.split(".")[0]
            if is_test and (top in scripts or top in ("bench", "common")):
                bad.append(f"{name}:{line} imports {module}")
            if not is_test and (top in scripts or top in ("tests", "fixtures", "conftest")):
                bad.append(f"{name}:{line} imports {module}")
        bad += [f"{name}:{line} edits sys.path" for line in edits_sys_path(tree)]
        if is_test and "spec_from_file_location" in text and "bench" in text:
            bad.append(f"{name} loads a bench script as a module")
    return bad


def scripts() -> set[str]:
    return {p.stem for p in BENCH.glob("bench_*.py")}


def test_bench_scripts_import_no_script_and_no_test():
    files = {str(p.relative_to(REPO)): p.read_text() for p in sorted(BENCH.glob("*.py"))}
    assert offences(files, scripts(), is_test=False) == []


def test_no_test_imports_bench():
    here = Path(__file__).resolve()
    files = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "tests").rglob("*.py")) if p != here}
    assert offences(files, scripts(), is_test=True) == []


def test_the_checks_find_planted_offences():
    names = {"bench_lds", "bench_lm"}
    script = ("import sys\nsys.path.insert(0, 'x')\nfrom bench_lds import learned_weights\n"
              "from fixtures.planted import p")
    assert offences({"bench/bench_lm.py": script}, names, is_test=False) == [
        "bench/bench_lm.py:3 imports bench_lds", "bench/bench_lm.py:4 imports fixtures.planted",
        "bench/bench_lm.py:2 edits sys.path"]
    test = ("import importlib.util\nfrom common import Clock\n"
            "spec = importlib.util.spec_from_file_location('b', 'bench/b.py')")
    assert offences({"tests/t.py": test}, names, is_test=True) == [
        "tests/t.py:2 imports common", "tests/t.py loads a bench script as a module"]
    assert offences({"bench/bench_lm.py": "from common import Clock\nimport gradtrace"}, names, is_test=False) == []
