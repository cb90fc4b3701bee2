"""A lean install: with every optional package missing (each set to None in sys.modules, as Python does for a
module that cannot be imported), the core trains, featurizes, attributes and learns weights for a classifier, and
each step that needs an optional package ends with one line naming the extra that brings it (exit code 2, no
traceback); the library's front door says the same as a UserError."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gradtrace.extras import EXTRA_OF

SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = r'''
import json, sys, io, contextlib
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None
from gradtrace.cli import main
out = sys.argv[1]
runs = {}
def cli(key, *argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([*argv, "--no-progress"])
        except SystemExit as exc:
            rc = exc.code
    runs[key] = [rc, err.getvalue()]
cli("help", "--help")
cli("train", "train", "--adapter", "classifier", "--model", "resnet", "--data", "digits", "--n", "60", "--steps", "2",
    "--model-options", '{"widths": [4, 8], "blocks": [1, 1]}', "--out", f"{out}/run")
cli("featurize", "featurize", "--checkpoint", f"{out}/run", "--dim", "64", "--out", f"{out}/ft")
cli("queries", "featurize", "--checkpoint", f"{out}/run", "--data", "digits", "--n", "6", "--dim", "64",
    "--out", f"{out}/fq")
cli("learn", "featurize", "--checkpoint", f"{out}/run", "--data", "digits", "--n", "70", "--ids", f"{out}/learn.txt",
    "--dim", "64", "--out", f"{out}/fl")
cli("learn-weights", "learn-weights", "--train", f"{out}/ft", "--queries", f"{out}/fl", "--steps", "5",
    "--out", f"{out}/w.json")
cli("attribute", "attribute", "--train", f"{out}/ft", "--queries", f"{out}/fq", "--top-k", "3", "--out",
    f"{out}/attr")
cli("report", "report", "--attributions", f"{out}/attr", "--out", f"{out}/r.html")
cli("diffusion", "train", "--data", "digits", "--n", "40", "--steps", "2", "--out", f"{out}/unet")
cli("hf", "featurize", "--checkpoint", f"{out}/run", "--data", f"hf:{out}", "--out", f"{out}/x")
cli("ekfac", "attribute-ekfac", "--checkpoint", f"{out}/run", "--data", "digits", "--n", "60", "--ids",
    f"{out}/learn.txt", "--out", f"{out}/ek")
cli("lm", "featurize", "--checkpoint", f"{out}/lm", "--out", f"{out}/y")
import gradtrace
from gradtrace.errors import UserError
def library(key, call):
    try:
        call()
        runs[key] = "no error"
    except UserError as exc:
        runs[key] = str(exc)
library("tracer", lambda: gradtrace.Tracer(object(), train=["a text"], store=f"{out}/store"))
result = gradtrace.AttributionResult.open(f"{out}/attr")
library("to_pandas", result.to_pandas)
library("inline", result._repr_html_)
print(json.dumps(runs))
'''


def test_without_the_optional_packages_the_core_runs_and_each_extra_is_named_in_one_line(tmp_path):
    (tmp_path / "learn.txt").write_text("\n".join(str(i) for i in range(60, 70)) + "\n")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text('{"model_type": "gpt2"}')  # a transformers model folder
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(sorted(EXTRA_OF))],
                          capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                                                               "PATH": "/usr/bin:/bin"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("help", "train", "featurize", "queries", "learn", "learn-weights", "attribute"):
        assert runs[key][0] == 0, (key, runs[key])  # the lean core
    assert (tmp_path / "attr" / "attributions.json").is_file() and not (tmp_path / "attr" / "report.png").exists()
    warning = runs["attribute"][1]
    assert "report.png is not drawn" in warning and "pip install 'gradtrace[report]'" in warning
    expected = {"report": ("drawing a figure needs matplotlib", "gradtrace[report]"),
                "diffusion": ("the 'diffusion-unet' model adapter needs diffusers", "gradtrace[diffusers]"),
                "hf": ("needs datasets", "gradtrace[hf]"),
                "ekfac": ("EK-FAC needs kronfluence", "gradtrace[ekfac]' and then pip install --no-deps kronfluence"),
                "lm": ("needs transformers", "gradtrace[transformers]")}
    for key, words in expected.items():
        rc, err = runs[key]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (key, err)
        assert all(w in lines[0] for w in words), (key, lines[0])
    assert "in-memory data needs datasets" in runs["tracer"] and "gradtrace[hf]" in runs["tracer"]
    assert "to_pandas needs pandas" in runs["to_pandas"] and "gradtrace[notebook]" in runs["to_pandas"]
    assert "needs matplotlib" in runs["inline"] and "gradtrace[report]" in runs["inline"]


def test_every_optional_package_is_in_an_extra_of_pyproject():
    import tomllib

    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    extras = project["optional-dependencies"]

    def pulled(extra: str) -> list[str]:  # with the extras it names of gradtrace itself ("gradtrace[all]")
        out = []
        for d in extras[extra]:
            if d.startswith("gradtrace["):
                out += [p for e in d[len("gradtrace["):-1].split(",") for p in pulled(e)]
            else:
                out.append(d)
        return out

    for package, extra in EXTRA_OF.items():
        if package in ("kronfluence", "tokenizers", "pyarrow"):  # kronfluence: --no-deps; the others come with theirs
            continue
        name = package.replace("_", "-")
        assert name not in core, package
        assert any(d.lower().startswith(name) for d in extras[extra]), (package, extra)
        assert any(d.lower().startswith(name) for d in pulled("all")), package
        assert any(d.lower().startswith(name) for d in pulled("dev")), package  # `make test` installs .[dev]
