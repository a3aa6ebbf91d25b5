"""Projector export: files per tag, one metadata line per point, and a second export (a
resumed run) that replaces the first instead of appending to projector_config.pbtxt."""
import numpy as np
import pytest

pytest.importorskip("tensorboardX")

from dist_triplet.projector import export_projector  # noqa: E402


def _export(log_dir, n=9, images=True):
    rng = np.random.default_rng(0)
    pixels = rng.random((n, 16), dtype=np.float32)          # 4 x 4 images in [0, 1]
    emb = rng.standard_normal((n, 3)).astype(np.float32)
    labels = np.arange(n) % 3
    return export_projector(str(log_dir), {"origin": pixels, "triplet": emb}, labels,
                            ("cat", "dog", "bird"), images=pixels if images else None), emb


def test_projector_files_and_metadata(tmp_path):
    written, emb = _export(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["origin", "triplet"]
    meta = (tmp_path / "00000" / "triplet" / "metadata.tsv").read_text().splitlines()
    assert meta == ["cat", "dog", "bird"] * 3
    tensors = np.loadtxt(tmp_path / "00000" / "triplet" / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(tensors, emb, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "00000" / "origin" / "sprite.png").is_file()
    assert np.loadtxt(tmp_path / "00000" / "origin" / "tensors.tsv").shape == (9, 16)


def test_second_export_replaces_the_first(tmp_path):
    _export(tmp_path)
    _export(tmp_path, n=6, images=False)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2
    assert len((tmp_path / "00000" / "origin" / "metadata.tsv").read_text().splitlines()) == 6
    assert not (tmp_path / "00000" / "origin" / "sprite.png").exists()


def test_row_count_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'triplet': 2 rows but 3 labels"):
        export_projector(str(tmp_path), {"triplet": np.zeros((2, 2), np.float32)},
                         np.arange(3), ("a", "b", "c"))
