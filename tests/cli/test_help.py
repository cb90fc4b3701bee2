"""Every subcommand's --help works, and the CLI's defaults are the specs' defaults (one source for both)."""
from dataclasses import fields

import pytest

from gradtrace.cli import COMMANDS, EVAL_COMMANDS, build_parser, main
from gradtrace.pipeline import AttributeSpec, LearnWeightsSpec
from gradtrace.pipeline.spec import default_of

ALL = [[name] for name in COMMANDS] + [["eval", name] for name in EVAL_COMMANDS] + [["eval"], []]


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "gradtrace")
def test_help_of_every_subcommand(path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gradtrace") and " ".join(["gradtrace", *path]) in out.splitlines()[0]


@pytest.mark.parametrize("path", [[n] for n in COMMANDS] + [["eval", n] for n in EVAL_COMMANDS])
def test_cli_defaults_are_the_spec_defaults(path):
    command = EVAL_COMMANDS[path[1]] if path[0] == "eval" else COMMANDS[path[0]]
    required = {f.name: "x" for f in fields(command.spec) if f.metadata.get("required")}
    argv = [*path] + [a for name, v in required.items() for a in (f"--{name.replace('_', '-')}", v)]
    args = build_parser().parse_args(argv)
    for f in fields(command.spec):
        if f.metadata.get("cli", True) and f.name not in required:
            assert getattr(args, f.name) == default_of(f), f.name


def test_python_and_cli_default_to_the_per_group_kernel_and_their_c_rule():
    assert AttributeSpec(train="t", queries="q", out="o").kernel == "per-group"
    assert AttributeSpec(train="t", queries="q", out="o").lambda_c is None  # the weights' c, else 0.01
    assert LearnWeightsSpec(train="t", generate=4).lambda_c == "auto"
    assert build_parser().parse_args(["learn-weights", "--train", "t"]).lambda_c == "auto"
