"""Atomic writes (dist_triplet/fsutil.py): all or nothing, no temp file left."""
import json
import os

import pytest

from dist_triplet.fsutil import atomic_dir, atomic_write, write_json


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_binary_mode(tmp_path):
    path = tmp_path / "x.bin"
    with atomic_write(str(path), "wb") as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
    out = tmp_path / "idx"
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("first")
    assert sorted(os.listdir(out)) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "b"), "w").write("second, broken")
            raise RuntimeError("killed half-way")
    assert sorted(os.listdir(out)) == ["a"] and (out / "a").read_text() == "first"
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "b"), "w").write("second")
    assert sorted(os.listdir(out)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temp or old directory left


def test_write_json_writes_null_for_undefined_numbers(tmp_path):
    """Issue 17 (8): metrics.json held bare NaN, which strict JSON parsers reject."""
    import json
    import math

    from dist_triplet.fsutil import write_json
    path = tmp_path / "m.json"
    write_json(str(path), {"p": float("nan"), "rows": [1.5, float("inf")], "n": 3})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) \
        == {"p": None, "rows": [1.5, None], "n": 3}
    assert not math.isnan(json.loads(text)["rows"][0])
