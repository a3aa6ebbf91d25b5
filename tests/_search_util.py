"""Shared by the retrieval tests (test_index, test_search, test_calibrate): an identity
model (Dense 4 -> 4, weight I, bias 0, no ReLU) exported like a trained one, so embeddings
are the pixels / 255 and every neighbour and distance can be computed by hand."""
import json

import numpy as np
import pytest

from dist_triplet.data import write_idx
from dist_triplet.export import export_model
from dist_triplet.model import build_embedding_net, initialize
from dist_triplet.retrieval.index import Index


S = 255.0 ** 2  # squared distances: pixel units / 255^2 = embedding units


def export_identity(path, width=4, out=None):
    """An exported Dense(width -> out) with weight I (or its first rows), bias 0."""
    out = out or width
    import mxnet as mx
    net = build_embedding_net(width, [out], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    net[0].weight.set_data(mx.nd.array(np.eye(out, width)))
    net[0].bias.set_data(mx.nd.zeros(out))
    export_model(net, str(path), mx.cpu(), width)
    return str(path)


def write_split(root, stem, pixels, labels):
    """(N, 4) pixel rows as 2x2 IDX images + labels under root (stem train or t10k)."""
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{stem}-images-idx3-ubyte",
              np.asarray(pixels, np.uint8).reshape(-1, 2, 2))
    write_idx(root / f"{stem}-labels-idx1-ubyte", np.asarray(labels, np.uint8))


# Gallery: class 0 at the origin, class 1 and class 2 far away on other axes.
GALLERY = [(0, 0, 0, 0), (200, 0, 0, 0), (0, 200, 0, 0), (0, 0, 0, 3)]
GALLERY_LABELS = [0, 1, 2, 0]
# Calibration queries, all nearest to the origin item; offset on axis 2 (pixels).
# right (label 0): 10, 20, 30, 45; wrong: 40 (label 1), 50 (label 3: a class the gallery
# lacks), 60 (label 2). Sorted: 10r 20r 30r 40w 45r 50w 60w.
CAL = [(0, 0, 10, 0), (0, 0, 40, 0), (0, 0, 20, 0), (0, 0, 50, 0), (0, 0, 30, 0),
       (0, 0, 60, 0), (0, 0, 45, 0)]
CAL_LABELS = [0, 1, 0, 3, 0, 2, 0]


@pytest.fixture
def setup(tmp_path):
    model = export_identity(tmp_path / "model")
    data = tmp_path / "data"
    write_split(data, "train", GALLERY, GALLERY_LABELS)
    write_split(data, "t10k", CAL, CAL_LABELS)
    index_dir = tmp_path / "index"
    from dist_triplet import index as index_cli
    assert index_cli.main(["--model", model, "--data", f"{data}:train",
                           "--out", str(index_dir)]) == 0
    return tmp_path, model, data, str(index_dir)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def plain_nearest_other(x, i):
    """Reference: the nearest other row by exact squared distance, ties by lower index."""
    best, best_j = None, None
    for j in range(len(x)):
        if j == i:
            continue
        d = sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j]))
        if best is None or d < best:
            best, best_j = d, j
    return best_j


def flat_index(tmp_path, emb, labels, name="ix"):
    Index.build(emb, labels, [f"r{i}" for i in range(len(emb))],
                [str(c) for c in range(int(labels.max()) + 1)]).save(str(tmp_path / name))
    return Index.load(str(tmp_path / name))


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]
