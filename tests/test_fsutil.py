"""Atomic writes (dist_triplet/fsutil.py): all or nothing, no temp file left."""
import json
import os

import pytest

from dist_triplet.fsutil import atomic_write, write_json


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
