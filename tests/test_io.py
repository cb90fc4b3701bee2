"""gradtrace.io: atomic writes leave complete files with the umask's mode, and nothing behind on failure."""
import json
import os
import stat

import numpy as np
import pytest

from gradtrace.cli import main
from gradtrace.io import atomic_write, command_line, jsonable, write_json_atomic, write_npy_atomic


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": np.int64(3)})
        write_npy_atomic(tmp_path / "a.npy", np.arange(4))
        (tmp_path / "plain").write_text("")  # what any other new file gets
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.json", "a.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3}
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2, 3]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a.json", {"v": object()})
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_jsonable_and_command_line(monkeypatch):
    assert jsonable({"a": (1, np.float32(0.5)), "b": np.arange(2)}) == {"a": [1, 0.5], "b": [0, 1]}
    monkeypatch.setattr("sys.argv", ["/usr/bin/gradtrace", "attribute", "--top-k", "3"])
    assert command_line() == "gradtrace attribute --top-k 3"


def test_every_artefact_file_follows_the_umask(tmp_path):
    """Checkpoints (model.safetensors, config.json), samples, stores and attributions: each file has the mode any
    new file gets under the umask (0640 under 027), never a temporary file's 0600."""
    commands = ["train --data digits --n 8 --steps 2 --batch-size 4 --out {t}/ck",
                "sample --checkpoint {t}/ck --num 2 --sample-steps 2 --out {t}/s",
                "featurize --checkpoint {t}/ck --out {t}/f --dim 32 --timesteps 1",
                "featurize --checkpoint {t}/ck --samples {t}/s --out {t}/q --dim 32 --timesteps 1",
                "attribute --train {t}/f --queries {t}/q --top-k 2 --out {t}/a"]
    old = os.umask(0o027)
    try:
        for command in commands:
            assert main(command.format(t=tmp_path).split() + ["--no-progress"]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert {"ck/model.safetensors", "ck/config.json", "f/features.npy", "a/attributions.json"} <= set(modes)
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o640} == {}
