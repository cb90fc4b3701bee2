"""The wheel: built from the sources (PEP 517, setuptools, no network), it holds the package with its py.typed and
neither tests nor benchmarks; installed into a fresh virtual environment it gives a `gradtrace` command whose
`--help` works and whose tiny classifier run (train, featurize, attribute) gives the top-k ids and scores of the
same commands run from the sources. The fresh environment sees the test environment's packages (torch, ...)
through a .pth path entry, so nothing is downloaded; gradtrace itself comes only from the wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gradtrace.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--adapter", "classifier", "--model", "resnet", "--data", "digits", "--n", "50", "--steps", "3",
         "--model-options", '{"widths": [4, 8], "blocks": [1, 1]}']


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def commands(out: Path) -> list[list[str]]:
    return [[*TRAIN, "--out", str(out / "run")],
            ["featurize", "--checkpoint", str(out / "run"), "--dim", "64", "--out", str(out / "ft")],
            ["featurize", "--checkpoint", str(out / "run"), "--data", "digits", "--n", "55", "--ids",
             str(out.parent / "queries.txt"), "--dim", "64", "--out", str(out / "fq")],
            ["attribute", "--train", str(out / "ft"), "--queries", str(out / "fq"), "--top-k", "4", "--no-report",
             "--out", str(out / "attr")]]


def test_the_wheel_installs_into_a_fresh_venv_and_runs_as_the_sources_do(tmp_path):
    source = tmp_path / "source"  # a copy: building leaves build/ and egg-info behind, not in the worktree
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(source)])
    wheel = next((tmp_path / "dist").glob("gradtrace-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradtrace/py.typed" in names and "gradtrace/cli/__init__.py" in names
    assert "gradtrace/extras.py" in names and "gradtrace/pipeline/tracer.py" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", "examples", "scripts", "docs")]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: diffusers" in metadata and "Provides-Extra: ekfac" in metadata
    assert "Requires-Dist: matplotlib" not in metadata.split("Provides-Extra")[0]  # not in the core

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not gradtrace
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    where = run([str(python), "-c", "import gradtrace; print(gradtrace.__file__)"], env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the wheel's, not src/ nor an editable
    assert "usage: gradtrace" in run([str(venv / "bin" / "gradtrace"), "--help"], env=env).stdout

    (tmp_path / "queries.txt").write_text("50\n51\n52\n53\n54\n")
    (tmp_path / "wheel").mkdir(), (tmp_path / "sources").mkdir()
    script = ("import json, sys; from gradtrace.cli import main; "
              "sys.exit(max(main([*argv, '--no-progress']) for argv in json.loads(sys.argv[1])))")
    run([str(python), "-c", script, json.dumps(commands(tmp_path / "wheel"))], env=env, cwd=tmp_path)  # one process
    for argv in commands(tmp_path / "sources"):
        assert main([*argv, "--no-progress"]) == 0
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "wheel" / "attr" / name),
                                      np.load(tmp_path / "sources" / "attr" / name))
    assert os.path.getsize(tmp_path / "wheel" / "attr" / "attributions.json") > 0
