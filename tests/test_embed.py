"""Export of the trained network and `python -m dist_triplet.embed` (tiny data, CPU)."""
import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="export and embed run on MXNet")

from dist_triplet import embed as embed_cli  # noqa: E402  (after the importorskip)
from dist_triplet.config import load_config  # noqa: E402
from dist_triplet.data import write_idx  # noqa: E402
from dist_triplet.export import export_model, model_files  # noqa: E402
from dist_triplet.model import build_embedding_net, embed, initialize  # noqa: E402
from dist_triplet.loop import train  # noqa: E402
from dist_triplet.retrieval.model import Model, read_meta  # noqa: E402

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 12, 5


def make_images(per_class, seed):
    """(N, 28, 28) uint8 images whose class sets a bright band, and (N,) labels."""
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(CLASSES), per_class).astype(np.uint8)
    images = rng.randint(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 7 * c:7 * c + 7, :] += 150
    return images, labels


@pytest.fixture
def idx_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for stem, per_class, seed in (("train", TRAIN_PER_CLASS, 0), ("t10k", TEST_PER_CLASS, 1)):
        images, labels = make_images(per_class, seed)
        write_idx(root / f"{stem}-images-idx3-ubyte", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels, gzip=True)
    return root


def tiny_config(idx_dir, run_dir, *extra):
    return load_config(None, [
        "data.dataset=idx", f"data.root={idx_dir}", f"output.dir={run_dir}",
        "distributed.backend=local", "distributed.device=cpu", "train.progress=false",
        "train.epochs=1", "sampler.kind=pk", f"sampler.p={CLASSES}", "sampler.k=4",
        "sampler.steps_per_epoch=3", "model.hidden=[32,16]", "model.final_relu=false",
        "model.normalize=true", "loss.margin=0.2", "eval.projector=false", "checkpoint.keep=0",
        *extra])


def test_export_then_load_reproduces_the_network(tmp_path):
    net = build_embedding_net(784, [32, 8], final_relu=False, normalize=True)
    initialize(net, 0.1, mx.cpu(), seed=3)
    x = np.random.RandomState(4).rand(10, 784).astype(np.float32)
    want = embed(net, x, mx.cpu())
    export_model(net, str(tmp_path / "model"), mx.cpu(), 784, meta={"note": "unit test"})
    for path in model_files(str(tmp_path / "model")):
        assert os.path.isfile(path)
    meta = read_meta(str(tmp_path / "model"))
    assert meta["input_units"] == 784 and meta["embedding_dim"] == 8 and meta["note"] == "unit test"
    got = Model(str(tmp_path / "model")).block(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_training_run_exports_a_model_that_embed_reproduces(idx_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_config(idx_dir, run_dir))
    model_dir = run_dir / "model"
    assert sorted(os.listdir(model_dir)) == ["embed-0000.params", "embed-symbol.json", "meta.json"]
    assert json.loads((model_dir / "meta.json").read_text())["embedding_dim"] == 16

    images, _ = make_images(TEST_PER_CLASS, 1)
    pixels = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    want = embed(result.net, pixels, mx.cpu())                  # the in-memory network
    assert want.shape == (len(images), 16)

    idx_file = idx_dir / "t10k-images-idx3-ubyte"
    np.save(tmp_path / "u8.npy", images)                         # (N, 28, 28) uint8
    np.save(tmp_path / "f32.npy", pixels)                        # (N, 784) float, as is
    for source, model_arg in ((idx_file, model_dir), (tmp_path / "u8.npy", run_dir),
                              (tmp_path / "f32.npy", model_dir)):
        out = tmp_path / f"{source.name}.emb"                    # no .npy suffix added
        status = embed_cli.main(["--model", str(model_arg), "--input", str(source),
                                 "--out", str(out), "--batch-size", "7"])
        assert status == 0
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("no_model", "does not exist"),
    ("labels_file", "labels file"),
    ("wrong_width", "model/meta.json), found 10x10x1 images (100 values) (shape (3, 10, 10))"),     # issue 17 (6)
    ("not_idx", "not an IDX file"),
    ("objects", "not a numeric .npy"),
    ("int_npy", "expected uint8 pixels"),
    ("missing_input", "does not exist"),
    ("bad_batch", "--batch-size"),
    ("nan_input", "3 of 1568 values are NaN or infinite"),
    ("model_is_file", "is a file, not a directory"),
    ("input_is_dir", "directory holds neither train.npz, IDX files nor class folders"),
    ("meta_bad_json", "meta.json: not valid JSON"),
    ("meta_list", "meta.json: expected a JSON object"),
    ("meta_bad_units", "meta.json: expected input_units a positive integer"),
    ("corrupt_params", "embed-0000.params: MXNet cannot load it: "),
    ("corrupt_symbol", "embed-symbol.json: MXNet cannot load it: "),
])
def test_embed_rejects_bad_input_with_a_clear_message(tmp_path, capsys, case, message):
    net = build_embedding_net(784, [8], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    model_dir = str(tmp_path / "model")
    export_model(net, model_dir, mx.cpu(), 784)
    source = tmp_path / "input"
    args = {"batch": "4", "model": model_dir}
    if case == "no_model":
        args["model"] = str(tmp_path / "nowhere")
        np.save(source, np.zeros((2, 784), np.float32))
    elif case == "labels_file":
        write_idx(source, np.zeros(5, np.uint8))
    elif case == "wrong_width":
        np.save(source, np.zeros((3, 10, 10), np.uint8))
    elif case == "not_idx":
        source.write_text("<html>404</html>")
    elif case == "objects":
        np.save(source, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "int_npy":
        np.save(source, np.zeros((2, 784), np.int64))
    elif case == "bad_batch":
        np.save(source, np.zeros((2, 784), np.float32))
        args["batch"] = "0"
    elif case == "nan_input":
        bad = np.zeros((2, 784), np.float32)
        bad[0, :2], bad[1, 5] = np.nan, np.inf
        np.save(source, bad)
    elif case == "input_is_dir":
        source.mkdir()
    elif case != "missing_input":
        np.save(source, np.zeros((2, 784), np.float32))
        sym, params, meta = model_files(model_dir)
        if case == "model_is_file":
            args["model"] = meta
        elif case == "meta_bad_json":
            with open(meta, "w") as fh:
                fh.write("{'input_units': 784}")
        elif case == "meta_list":
            with open(meta, "w") as fh:
                fh.write("[784]")
        elif case == "meta_bad_units":
            with open(meta, "w") as fh:
                fh.write('{"input_units": "many"}')
        elif case == "corrupt_params":
            with open(params, "wb") as fh:
                fh.write(b"not an NDArray file" * 4)
        elif case == "corrupt_symbol":
            with open(sym, "r+") as fh:
                fh.truncate(100)
    if source.exists() is False and os.path.exists(f"{source}.npy"):
        os.replace(f"{source}.npy", source)                     # np.save added .npy
    status = embed_cli.main(["--model", args["model"], "--input", str(source),
                             "--out", str(tmp_path / "out.npy"), "--batch-size",
                             args["batch"]])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err    # one line
    if case.startswith(("meta", "corrupt", "model")):
        assert model_dir in err, err
    assert not (tmp_path / "out.npy").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.fixture
def small_model(tmp_path):
    net = build_embedding_net(784, [8], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    return export_model(net, str(tmp_path / "model"), mx.cpu(), 784)


def test_embed_output_that_is_a_directory_fails_up_front(tmp_path, capsys, small_model):
    np.save(tmp_path / "in.npy", np.zeros((2, 784), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    status = embed_cli.main(["--model", small_model, "--input", str(tmp_path / "in.npy"),
                             "--out", str(out)])
    assert status == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out} is a directory: pass a file name\n"
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "model", "out"]


def test_embed_save_failure_removes_the_temp_file(tmp_path, monkeypatch, capsys, small_model):
    from dist_triplet.retrieval import cli

    def fail(fh, array):
        fh.write(b"half")
        raise OSError("No space left on device")
    np.save(tmp_path / "in.npy", np.zeros((2, 784), np.float32))
    monkeypatch.setattr(cli.np, "save", fail)
    assert embed_cli.main(["--model", small_model, "--input", str(tmp_path / "in.npy"),
                           "--out", str(tmp_path / "out.npy")]) == 2
    assert "No space" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "model"]


def test_embed_warns_on_float_input_that_looks_unscaled(tmp_path, capsys, small_model):
    np.save(tmp_path / "in.npy", np.full((2, 784), 200.0, np.float32))
    status = embed_cli.main(["--model", small_model, "--input", str(tmp_path / "in.npy"),
                             "--out", str(tmp_path / "out.npy")])
    assert status == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "pixels / 255" in err and "200" in err
    assert np.load(tmp_path / "out.npy").shape == (2, 8)
    np.save(tmp_path / "ok.npy", np.full((2, 784), 0.5, np.float32))   # scaled: no warning
    assert embed_cli.main(["--model", small_model, "--input", str(tmp_path / "ok.npy"),
                           "--out", str(tmp_path / "out.npy"), "--force"]) == 0
    assert capsys.readouterr().err == ""


def test_embed_refuses_non_finite_embeddings_naming_the_input(tmp_path, capsys):
    """Finite inputs whose embeddings overflow (weights of ones: 4 x 3e38 = inf) are an
    error naming the input, not a .npy of inf (embed only warned about values > 1)."""
    from dist_triplet import embed as embed_cli
    net = build_embedding_net(4, [4], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    net[0].weight.set_data(mx.nd.ones((4, 4)))
    net[0].bias.set_data(mx.nd.zeros(4))
    export_model(net, str(tmp_path / "model"), mx.cpu(), 4)
    inp, out = tmp_path / "x.npy", tmp_path / "e.npy"
    np.save(inp, np.full((3, 4), 3e38, np.float32))
    capsys.readouterr()
    assert embed_cli.main(["--model", str(tmp_path / "model"), "--input", str(inp),
                           "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and str(inp) in err[0] and "12 non-finite" in err[0], err
    assert not out.exists()


def test_model_embed_refuses_rows_of_another_width(tmp_path):
    """A convolutional export regrouped 10 rows of 784 values into one 8x8 image and
    returned (1, D), exit 0 (an MLP export failed inside MXNet instead): both now refuse,
    naming the width meta.json records."""
    import dataclasses
    from dist_triplet.backbone import build_network, initialize_network
    from dist_triplet.config import Config
    cfg = dataclasses.replace(Config().model, backbone="convnet", channels=[4, 8], hidden=[8],
                              final_relu=False)
    net = build_network(cfg, 64, (8, 8, 1))
    initialize_network(net, cfg, mx.cpu(), 0, 64)
    export_model(net, str(tmp_path / "model"), mx.cpu(), 64)
    model = Model(str(tmp_path / "model"))
    assert model.embed(np.zeros((10, 64), np.float32)).shape == (10, 8)
    with pytest.raises(ValueError, match=r"^queries: the model in .* gave 122 embeddings for "
                                         r"10 rows of shape \(784,\): it takes 64 values per "
                                         r"row \(.*meta.json\)"):
        model.embed(np.zeros((10, 784), np.float32), source="queries")
    # meta.json edited to 4x4 images: 20 rows of 16 values gave 5 embeddings, exit 0.
    meta_path = tmp_path / "model" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, input_units=16, image_shape=[4, 4, 1])))
    with pytest.raises(ValueError, match=r"gave 5 embeddings for 20 rows of shape \(16,\): "
                                         r"it takes 16 values per row \(.*meta.json\)"):
        Model(str(tmp_path / "model")).embed(np.zeros((20, 16), np.float32))
    # Without meta.json (an export by another tool): a convnet's input width is unknown.
    meta_path.unlink()
    with pytest.raises(ValueError, match=r"meta.json is missing, and the first layer is not a "
                                         r"Dense: the input width is unknown"):
        Model(str(tmp_path / "model"))


def test_export_without_meta_json_takes_its_first_dense_layers_width(tmp_path):
    """The fallback for exports by other tools raised TypeError (a parameter shape None)."""
    net = build_embedding_net(6, [5, 3])
    initialize(net, 0.1, mx.cpu(), seed=0)
    export_model(net, str(tmp_path / "m"), mx.cpu(), 6)
    (tmp_path / "m" / "meta.json").unlink()
    model = Model(str(tmp_path / "m"))
    assert model.input.units == 6 and model.input.kind is None
    x = np.random.RandomState(0).rand(4, 6).astype(np.float32)
    np.testing.assert_allclose(model.embed(x), net(mx.nd.array(x)).asnumpy(), rtol=1e-6)


def test_an_export_with_nan_parameters_is_refused(tmp_path):
    """Re-check finding: a damaged export holding NaN gave all-zero embeddings (a ReLU turns
    NaN into 0), and embed and index exited 0."""
    net = build_embedding_net(6, [5, 3])
    initialize(net, 0.1, mx.cpu(), seed=0)
    export_model(net, str(tmp_path / "m"), mx.cpu(), 6)
    params = model_files(str(tmp_path / "m"))[1]
    saved = mx.nd.load(params)
    name = sorted(saved)[0]
    saved[name][0] = np.nan
    mx.nd.save(params, saved)
    with pytest.raises(ValueError, match=rf"embed-0000.params: {name} holds NaN or infinite "
                                         r"values: a damaged export"):
        Model(str(tmp_path / "m"))
