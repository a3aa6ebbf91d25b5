"""Backbones (backbone.py): every model-zoo name builds offline, convolutional networks
take the flat training rows, weights load from a .params file with one-line errors, and
inputs that cannot work are refused."""
import dataclasses

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="backbones are MXNet networks")

from dist_triplet.backbone import build_network, check_backbone, initialize_network, load_weights  # noqa: E402
from dist_triplet.config import Config  # noqa: E402
from dist_triplet.zoo import ZOO  # noqa: E402


def model_cfg(backbone, **kw):
    """Section ``model`` for ``backbone``, Dense 8 head, L2-normalised, keys ``kw``."""
    import dataclasses
    cfg = Config().model
    return dataclasses.replace(cfg, backbone=backbone, hidden=[8], final_relu=False,
                               normalize=True, **kw)


def built(cfg, shape, seed=1):
    units = int(np.prod(shape))
    net = build_network(cfg, units, shape)
    initialize_network(net, cfg, mx.cpu(), seed, units)
    return net, units


def test_zoo_names_are_mxnet_model_zoo_names():
    from mxnet.gluon.model_zoo import vision
    for name in ZOO:
        net = vision.get_model(name, pretrained=False)  # raises for an unknown name
        assert hasattr(net, "features"), name


@pytest.mark.parametrize("backbone, shape", [("convnet", (12, 10, 3)), ("resnet18_v1", (32, 32, 3)),
                                             ("mobilenetv2_0.25", (28, 28, 1))])
def test_conv_backbone_embeds_flat_rows_as_images(backbone, shape):
    """(B, H*W*C) rows stored (H, W, C) -> (B, 8) unit rows; the network sees the image:
    its output changes when two pixels of one image swap places across rows of the
    image, which a network on a shuffled layout would not reproduce from the rows."""
    cfg = model_cfg(backbone, **({"channels": [4, 8]} if backbone == "convnet" else {}))
    net, units = built(cfg, shape)
    net.hybridize(static_alloc=True, static_shape=True)
    x = np.random.RandomState(0).rand(3, units).astype(np.float32)
    out = net(mx.nd.array(x)).asnumpy()
    assert out.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # The reshape: an image given as (H, W, C) rows equals the features of the NCHW array.
    img = mx.nd.array(x).reshape((-1,) + shape).transpose((0, 3, 1, 2))
    feats = net.features(img)
    if net.pool:
        feats = mx.nd.Pooling(feats, global_pool=True, pool_type="avg", kernel=(1, 1))
    np.testing.assert_allclose(net.head(feats.flatten()).asnumpy(), out, rtol=1e-4, atol=1e-5)


def test_flatten_pool_keeps_positions():
    """model.pool=flatten: the head's Dense reads C x h x w features (2 blocks of 8 on 8x8:
    8 x 4 x 4 = 128 inputs, against 8 with global average pooling), so two images whose
    feature maps differ only by where a feature sits embed differently."""
    avg, _ = built(model_cfg("convnet", channels=[4, 8]), (8, 8, 1))
    flat, units = built(model_cfg("convnet", channels=[4, 8], pool="flatten"), (8, 8, 1))
    assert avg.head[0].weight.shape == (8, 8) and flat.head[0].weight.shape == (8, 128)
    img = np.zeros((8, 8), np.float32)
    img[1:3, 1:3] = 1.0                      # a blob top left, and the same blob bottom right
    x = np.stack([img.ravel(), img[::-1, ::-1].ravel()])
    ref = flat.head(flat.features(mx.nd.array(x).reshape((-1, 1, 8, 8))).flatten()).asnumpy()
    out = flat(mx.nd.array(x)).asnumpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(out[0] - out[1]).max() > 1e-3


@pytest.mark.parametrize("backbone", ["mlp", "resnet18_v1"])
def test_flatten_pool_refused_where_nothing_is_left_to_flatten(backbone):
    """A model-zoo network's features end in a global pool and the MLP has no map: flatten
    would silently change nothing (and a resume would then refuse the unchanged network)."""
    with pytest.raises(ValueError, match=r"model\.pool=flatten is for model\.backbone=convnet; "
                                         f"'{backbone}'"):
        check_backbone(model_cfg(backbone, pool="flatten"), (32, 32, 3))
    check_backbone(model_cfg(backbone, pool="avg"), (32, 32, 3))


@pytest.mark.parametrize("backbone", ["mlp", "resnet18_v1"])
def test_channels_refused_where_there_are_no_conv_blocks(backbone):
    """model.channels builds convnet's blocks only: on the MLP or a model-zoo net it would
    silently change nothing."""
    with pytest.raises(ValueError, match=r"model\.channels=\[4, 8\] is for "
                                         rf"model\.backbone=convnet; '{backbone}'"):
        check_backbone(model_cfg(backbone, channels=[4, 8]), (32, 32, 3))
    check_backbone(model_cfg(backbone), (32, 32, 3))  # the default is no choice


def test_mlp_backbone_is_the_seed_network():
    from dist_triplet.model import build_embedding_net, initialize
    cfg = Config().model
    net, units = built(cfg, (28, 28, 1), seed=3)
    ref = build_embedding_net(784, [256, 128])
    initialize(ref, 0.1, mx.cpu(), 3)
    x = mx.nd.array(np.random.RandomState(1).rand(2, 784))
    np.testing.assert_array_equal(net(x).asnumpy(), ref(x).asnumpy())


def test_weights_load_and_head_is_fresh(tmp_path):
    """A model-zoo style file (features + a 1000-way classifier 'output') loads into the
    backbone; the head keeps its initialisation."""
    from mxnet.gluon.model_zoo import vision
    shape = (32, 32, 3)
    zoo = vision.get_model("resnet18_v1", pretrained=False, classes=1000)
    zoo.initialize(mx.init.Normal(0.05))
    zoo(mx.nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / "resnet18.params")
    zoo.save_parameters(path)
    cfg = model_cfg("resnet18_v1", weights=path)
    net, _ = built(cfg, shape)
    conv0 = net.features[0].weight.data().asnumpy()
    np.testing.assert_array_equal(conv0, zoo.features[0].weight.data().asnumpy())
    fresh = load_weights(net, path, "resnet18_v1", apply=False)
    assert fresh == ["head.0.weight", "head.0.bias"]


def test_weights_shape_mismatch_names_parameter_and_shapes(tmp_path):
    cfg = model_cfg("convnet", channels=[4, 8])
    net, _ = built(cfg, (8, 8, 3))
    path = str(tmp_path / "w.params")
    net.save_parameters(path)
    gray = model_cfg("convnet", channels=[4, 8], weights=path)
    with pytest.raises(ValueError, match=r"parameter 'features\.0\.weight' has shape "
                                         r"\(4, 3, 3, 3\) in the file but \(4, 1, 3, 3\)"):
        built(gray, (8, 8, 1))
    other = model_cfg("convnet", channels=[4, 16], weights=path)
    with pytest.raises(ValueError, match=r"features\.4\.weight.*\(8, 4, 3, 3\).*\(16, 4, 3, 3\)"):
        built(other, (8, 8, 3))
    # The whole network saved, head included: everything loads, nothing fresh.
    same = model_cfg("convnet", channels=[4, 8], weights=path)
    net2, _ = built(same, (8, 8, 3), seed=9)
    assert load_weights(net2, path, "convnet", apply=False) == []
    np.testing.assert_array_equal(net2.head[0].weight.data().asnumpy(),
                                  net.head[0].weight.data().asnumpy())


def test_weights_of_another_architecture_and_unreadable_file(tmp_path):
    net, _ = built(model_cfg("convnet", channels=[4, 8]), (8, 8, 1))
    path = str(tmp_path / "w.params")
    net.save_parameters(path)
    with pytest.raises(ValueError, match=r"parameter 'features\.0\.weight' has shape "
                                         r"\(4, 1, 3, 3\) in the file but \(64, 1, 7, 7\)"):
        built(model_cfg("resnet18_v1", weights=path), (32, 32, 1))
    saved = mx.nd.load(path)
    del saved["features.1.gamma"]
    mx.nd.save(path, saved)
    with pytest.raises(ValueError, match=r"parameter 'features\.1\.gamma' of model\.backbone="
                                         r"convnet \(shape \(4,\)\) is missing from the file"):
        built(model_cfg("convnet", channels=[4, 8], weights=path), (8, 8, 1))
    saved["stray.weight"] = saved["features.0.weight"]
    saved["features.1.gamma"] = mx.nd.ones((4,))
    mx.nd.save(path, saved)
    with pytest.raises(ValueError, match=r"1 entries are no parameter of model\.backbone=convnet "
                                         r"\(first: 'stray\.weight'\)"):
        built(model_cfg("convnet", channels=[4, 8], weights=path), (8, 8, 1))
    bad = tmp_path / "bad.params"
    bad.write_bytes(b"not params")
    with pytest.raises(ValueError, match=r"MXNet cannot read it as a \.params file"):
        built(model_cfg("convnet", channels=[4, 8], weights=str(bad)), (8, 8, 1))
    with pytest.raises(ValueError, match="no such file"):
        built(model_cfg("convnet", channels=[4, 8], weights=str(tmp_path / "none")), (8, 8, 1))


def test_exported_model_as_weights_says_what_weights_takes(tmp_path):
    """An export (<run>/model) or its embed-0000.params as model.weights said "no such
    file" or "parameter '0.weight' ... is missing": say what model.weights takes and where
    a run's own parameters are (a checkpoint's params: net.save_parameters, which loads)."""
    from dist_triplet.export import export_model, model_files
    net, units = built(Config().model, (28, 28, 1))
    export_model(net, str(tmp_path / "model"), mx.cpu(), units)
    for path, what in ((tmp_path / "model", "is a directory"),
                       (model_files(str(tmp_path / "model"))[1], "holds an exported model's")):
        with pytest.raises(ValueError) as info:
            built(dataclasses.replace(Config().model, weights=str(path)), (28, 28, 1))
        msg = str(info.value)
        assert msg.startswith(f"model.weights={str(path)!r} {what}") and "\n" not in msg
        assert "Gluon .params file of the backbone" in msg
        assert "<run>/checkpoints/epoch-NNNN/params" in msg
    net.save_parameters(str(tmp_path / "params"))              # what a checkpoint holds
    again, _ = built(dataclasses.replace(Config().model, weights=str(tmp_path / "params")),
                     (28, 28, 1), seed=7)
    np.testing.assert_array_equal(again[0].weight.data().asnumpy(),
                                  net[0].weight.data().asnumpy())


@pytest.mark.parametrize("backbone, shape, match", [
    ("convnet", None, r"is convolutional but the data are feature vectors"),
    ("convnet", (3, 40, 1), r"needs H, W >= 4; the images are 3x40"),
    ("densenet121", (32, 32, 3), r"too small for its downsampling \(MXNet: .*"),
    ("alexnet", (28, 28, 1), r"too small for its downsampling"),
])
def test_inputs_that_cannot_work_are_refused(backbone, shape, match):
    with pytest.raises(ValueError, match=match) as err:
        check_backbone(model_cfg(backbone, **({"channels": [4, 8, 16]}
                                               if backbone == "convnet" else {})), shape)
    assert "\n" not in str(err.value)


def test_unknown_backbone_is_a_config_error():
    from dist_triplet.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"model\.backbone='resnet19' is not one of mlp, convnet"):
        load_config(None, ["model.backbone=resnet19"])


def test_conv_run_with_augmentation_exports_a_model_embed_reads(tmp_path):
    """End to end on a tiny 4x4 IDX set: a convnet run with crop and flip trains (finite
    loss, P@1 computed), and its export embeds the test images exactly as the trained
    network does, from (B, 16) rows; meta.json names the backbone and the image shape."""
    from _ckpt_util import run_args, write_dataset
    from dist_triplet.config import load_config
    from dist_triplet.retrieval.model import Model, read_meta
    from dist_triplet.loop import train
    from dist_triplet.model import embed
    from dist_triplet.data import load_data
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(None, run_args(data, str(out), "model.backbone=convnet",
                                     "model.channels=[4,8]", "model.hidden=[8]",
                                     "augment.pad=1", "augment.flip=true", "train.epochs=2",
                                     "eval.report=false", "checkpoint.keep=0",
                                     "distributed.backend=local", "distributed.device=cpu"))
    result = train(cfg)
    assert np.isfinite(result.metrics["loss"]) and 0 <= result.metrics["precision_at_1"] <= 1
    meta = read_meta(str(out / "model"))
    assert meta["backbone"] == "convnet" and meta["image_shape"] == [4, 4, 1]
    assert meta["input_units"] == 16
    _, test = load_data(cfg.data)
    exported = Model(str(out / "model")).block
    want = embed(result.net, test.images, mx.cpu())
    np.testing.assert_allclose(embed(exported, test.images, mx.cpu()), want, rtol=1e-5,
                               atol=1e-6)


def test_weights_with_nan_are_refused_naming_the_parameter(tmp_path):
    """A file with one NaN layer passed check and trained to exit 0 (ReLU turned NaN into
    0: the loss stayed finite) and the export gave one embedding for every image."""
    net, _ = built(model_cfg("convnet", channels=[4, 8]), (8, 8, 1))
    path = str(tmp_path / "w.params")
    net.save_parameters(path)
    saved = mx.nd.load(path)
    saved["features.0.weight"][0, 0, 0, 0] = np.nan
    saved["features.0.weight"][1, 0, 0, 0] = np.inf
    mx.nd.save(path, saved)
    with pytest.raises(ValueError, match=r"parameter 'features\.0\.weight' holds 2 NaN or "
                                         r"infinite values"):
        built(model_cfg("convnet", channels=[4, 8], weights=path), (8, 8, 1))


def test_a_head_of_another_shape_is_initialised_whole_with_a_warning(tmp_path, caplog):
    """A flatten head trained at 8x8 loaded at 12x12: its bias (same shape) came from the
    file and its weight (other shape) stayed random, at INFO. Now the whole head is fresh,
    with a warning naming both shapes."""
    cfg = model_cfg("convnet", channels=[4, 8], pool="flatten")
    net, _ = built(cfg, (8, 8, 1))
    net.head[0].bias.set_data(mx.nd.ones(8))           # biases start at 0: make it tell
    path = str(tmp_path / "w.params")
    net.save_parameters(path)
    again = build_network(dataclasses.replace(cfg, weights=path), 144, (12, 12, 1))
    initialize_network(again, cfg, mx.cpu(), 5, 144)
    bias = again.head[0].bias.data().asnumpy().copy()
    with caplog.at_level("WARNING"):
        fresh = load_weights(again, path, "convnet")
    assert fresh == ["head.0.weight", "head.0.bias"]
    np.testing.assert_array_equal(again.head[0].bias.data().asnumpy(), bias)   # not the file's
    assert not np.array_equal(bias, net.head[0].bias.data().asnumpy())
    assert "head.0.weight is (8, 128) in the file, (8, 288) here: the whole head" in caplog.text
    np.testing.assert_array_equal(again.features[0].weight.data().asnumpy(),
                                  net.features[0].weight.data().asnumpy())


def test_an_empty_params_file_says_so(tmp_path):
    """adv finding: mx.nd.save(path, {}) was "holds unnamed arrays, not a Gluon .params"."""
    path = str(tmp_path / "empty.params")
    mx.nd.save(path, {})
    with pytest.raises(ValueError, match=r"holds no parameters \(an empty \.params file\)"):
        built(model_cfg("convnet", channels=[4, 8], weights=path), (8, 8, 1))
