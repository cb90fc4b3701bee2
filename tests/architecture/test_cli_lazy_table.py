"""The CLI's lazy table: each command's stage function is a "module:function" string imported when the command
runs, so start-up imports neither torch nor any stage. These strings are imports the import graph must count;
here they are read with ast like the module-level imports, checked to resolve, and kept in the layer order
(the CLI reaches the stages of `gradtrace.pipeline` and its own `gradtrace.cli.say`, nothing else)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrace
from gradtrace import choices
from gradtrace.adapters.diffusion.sample import SAMPLERS as ADAPTER_SAMPLERS
from gradtrace.cli import COMMANDS, EVAL_COMMANDS, SAY, load
from gradtrace.methods import get_method, known_methods
from gradtrace.methods.ekfac_method import Ekfac
from gradtrace.pipeline.specs.sample import SAMPLERS

ROOT = Path(gradtrace.__file__).parent
REF = re.compile(r"^gradtrace(\.\w+)+(:\w+)?$")
ALL = {**COMMANDS, **{f"eval {name}": c for name, c in EVAL_COMMANDS.items()}}


def string_references() -> set[str]:
    """Every "gradtrace.module[:name]" string constant in cli/ (what the import graph counts as a lazy import)."""
    out = set()
    for path in (ROOT / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and REF.match(node.value):
                out.add(node.value)
    return out


def test_every_lazy_reference_is_a_string_constant_of_cli():
    refs = string_references()
    assert {c.run_ref for c in ALL.values()} <= refs
    assert SAY in refs


def test_lazy_references_stay_in_the_layer_order():
    modules = {ref.partition(":")[0] for ref in string_references()}
    assert modules and all(m.startswith("gradtrace.pipeline.") or m.startswith("gradtrace.cli.") for m in modules)


@pytest.mark.parametrize("path", sorted(ALL))
def test_each_command_resolves_its_stage_and_its_line(path):
    command = ALL[path]
    run = load(command.run_ref)
    assert callable(run) and run.__module__ == command.run_ref.partition(":")[0]
    assert callable(load(f"{SAY}:{command.say_ref}"))
    # the stage module takes the spec the CLI builds (its own re-export of the spec class)
    stage = sys.modules[run.__module__]
    assert command.spec in vars(stage).values()


@pytest.mark.parametrize("argv", [["--help"], ["attribute", "--help"], ["attribute", "--train", "t"],
                                  ["attribute", "--train", "t", "--queries", "q", "--out", "o", "--weights", "w",
                                   "--aspect", "a"], ["eval", "lds", "--help"]])
def test_help_and_refusals_import_no_torch_and_no_stage(argv):
    code = ("import sys\nfrom gradtrace.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nheavy = sorted(m for m in sys.modules if m in ('torch', 'diffusers', 'transformers') or "
            "m.startswith('gradtrace.') and m.split('.')[1] not in ('cli', 'pipeline', 'errors', 'extras', 'io', "
            "'choices') or "
            "m.startswith('gradtrace.pipeline.') and not m.startswith(('gradtrace.pipeline.spec', "
            "'gradtrace.pipeline.scoring_options')))\nprint('HEAVY', heavy, rc)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("HEAVY")][-1]
    assert line in ("HEAVY [] 0", "HEAVY [] 2"), line


def test_the_specs_choices_are_the_implementations():
    """`gradtrace.choices` lists what the stages offer without importing them; the registries agree with it."""
    # the built-in names first, then any registered since (a test module may register its own at collection)
    assert tuple(known_methods())[:len(choices.METHODS)] == choices.METHODS
    assert list(choices.MethodNames()) == known_methods()
    assert all(choices.needs_model(name) == get_method(name).needs_model for name in choices.METHODS)
    assert choices.EKFAC_GRID == Ekfac.lambda_grid_size and choices.EKFAC_DEFAULT_C == Ekfac.default_c
    assert SAMPLERS == ADAPTER_SAMPLERS
