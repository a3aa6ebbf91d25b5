"""Embedding networks for every ``model.backbone``: the seed's MLP, a small convolutional
network, and the architectures of ``mxnet.gluon.model_zoo.vision``.

Every network takes the training rows as they are, ``(B, F) float32`` (uint8 image bytes
already divided by 255 on the device, ``model.gather_rows``), and returns ``(B, D)
float32`` embeddings; a convolutional network reshapes its rows to ``(B, C, H, W)`` inside
``hybrid_forward`` (rows are stored (H, W, C), ``data.Split.image_shape``). So the data
path, the training steps, the export (``embed-symbol.json`` still takes (B, F) rows) and
``dist_triplet.embed`` / index / search are the same for every backbone.

* ``mlp`` (default): the seed article's network, unchanged (``model.build_embedding_net``:
  Dense ``model.hidden``, Uniform(``model.init_scale``) init).
* ``convnet``: ``model.channels`` blocks of Conv3x3 -> BatchNorm -> ReLU -> MaxPool 2x2
  (the last block without the pool), global average pooling (``model.pool=avg``) or the
  feature map flattened as it is (``flatten``), then the Dense head.
* any name of ``mxnet.gluon.model_zoo.vision.get_model`` (``resnet18_v1``,
  ``mobilenetv2_1.0``, ...: :data:`ZOO`): the architecture's ``features`` (built with
  ``pretrained=False``: nothing is downloaded), ``model.pool`` where its features keep a
  spatial map (``model.pool=flatten`` is refused: their features end in a global pool;
  so is ``model.channels``, which only ``convnet`` reads), then the Dense head; its
  classifier (``output``) is dropped.

The head of a convolutional backbone is ``model.hidden``'s Dense layers (the last width
is the embedding size D, as for the MLP), with ``model.final_relu`` and
``model.normalize`` as for the MLP. Convolutional weights are He-initialised
(``mx.init.Xavier(gaussian, in, 2)``, He et al. 2015), BatchNorm gamma 1, beta 0.

BatchNorm under data parallelism: each worker normalises with its own batch's statistics
(no synchronised BatchNorm), and its running mean / variance (auxiliary states, no
gradient) are updated from its own batches only, so they differ between workers;
evaluation and export use rank 0's. The trainable parameters stay identical on every
worker (tests/test_equivalence.py).

``model.weights``: a Gluon ``.params`` file (``Block.save_parameters``, structural names
such as ``features.0.weight``) loaded into the backbone (:func:`load_weights`). Every
backbone parameter must be in the file with its shape; the head (``head.*``) is loaded
when the file has it with the right shape and initialised otherwise, and the file's
``output.*`` (the classifier the head replaces) is ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from .config import ModelConfig
from .model import L2Normalize, build_embedding_net
from .zoo import BACKBONES, ZOO

log = logging.getLogger(__name__)

__all__ = ["check_network", "ConvEmbedding", "build_network", "initialize_network",
           "load_weights", "check_backbone"]

HEAD = "head."          # structural-name prefix of the embedding head
CLASSIFIER = "output."  # a model-zoo file's classifier, replaced by the head


def _rows_to_images(F, x, image_shape):
    """(B, H*W*C) rows stored (H, W, C) -> (B, C, H, W), the layout of MXNet's Conv2D."""
    h, w, c = image_shape
    return F.transpose(F.reshape(x, shape=(-1, h, w, c)), axes=(0, 3, 1, 2))


def _conv_blocks(channels: Sequence[int]):
    """``convnet``'s feature extractor: per width Conv3x3 (no bias: BatchNorm's beta is
    one) -> BatchNorm -> ReLU, then MaxPool 2x2 after every block but the last."""
    seq = nn.HybridSequential()
    for i, width in enumerate(channels):
        seq.add(nn.Conv2D(width, 3, padding=1, use_bias=False), nn.BatchNorm(),
                nn.Activation("relu"))
        if i + 1 < len(channels):
            seq.add(nn.MaxPool2D(2))
    return seq


class ConvEmbedding(gluon.HybridBlock):
    """(B, H*W*C) float32 rows -> (B, D) float32: reshape to (B, C, H, W), ``features`` (a
    convolutional feature extractor), global average pooling when a spatial map is left
    and ``pool``, flatten, ``head`` (Dense ``hidden``, optional L2 normalisation).

    Args:
        features: the feature extractor, (B, C, H, W) -> (B, C', h, w) or (B, C').
        image_shape: (H, W, C) of the rows.
        hidden: Dense widths of the head; the last is D.
        final_relu, normalize: as ``model.final_relu`` / ``model.normalize``.
        pool: global average pooling after ``features`` (False when they end in a vector,
            or to keep the map: ``model.pool=flatten``).
    """

    def __init__(self, features, image_shape, hidden, *, final_relu: bool, normalize: bool,
                 pool: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.pool = pool
        with self.name_scope():
            self.features = features
            self.head = nn.HybridSequential()
            for i, units in enumerate(hidden):
                last = i == len(hidden) - 1
                self.head.add(nn.Dense(units, activation=None if last and not final_relu
                                       else "relu"))
            if normalize:
                self.head.add(L2Normalize())

    def hybrid_forward(self, F, x):
        y = self.features(_rows_to_images(F, x, self.image_shape))
        if self.pool:
            y = F.Pooling(y, global_pool=True, pool_type="avg", kernel=(1, 1))
        return self.head(F.flatten(y))


def build_network(model_cfg, in_units: int, image_shape: Optional[Tuple[int, int, int]]):
    """The embedding network of ``model_cfg`` (config section ``model``), not initialised.

    Args:
        model_cfg: ``config.ModelConfig`` (backbone, hidden, channels, final_relu, normalize).
        in_units: F, the width of a training row.
        image_shape: (H, W, C) of image rows; None for feature rows.

    Returns:
        A ``gluon.HybridBlock`` (B, F) float32 -> (B, hidden[-1]) float32.

    Raises:
        ValueError: :func:`check_backbone`'s errors (unknown backbone, a convolutional
            backbone on feature rows, an input too small for its downsampling).
    """
    check_backbone(model_cfg, image_shape)
    if model_cfg.backbone == "mlp":
        return build_embedding_net(in_units, model_cfg.hidden, final_relu=model_cfg.final_relu,
                                   normalize=model_cfg.normalize)
    return _conv_network(model_cfg, image_shape)


def _conv_network(model_cfg, image_shape):
    if model_cfg.backbone == "convnet":
        features, pool = _conv_blocks(model_cfg.channels), model_cfg.pool == "avg"
    else:
        from mxnet.gluon.model_zoo import vision
        features = vision.get_model(model_cfg.backbone, pretrained=False).features
        pool = model_cfg.pool == "avg" and len(_feature_shape(features, image_shape)) == 4
    return ConvEmbedding(features, image_shape, model_cfg.hidden,
                         final_relu=model_cfg.final_relu, normalize=model_cfg.normalize,
                         pool=pool)


def _feature_shape(features, image_shape) -> tuple:
    """Output shape of ``features`` for one (C, H, W) image, by MXNet's shape inference;
    raises MXNetError when the image is too small for one of its layers."""
    h, w, c = image_shape
    with contextlib.redirect_stdout(io.StringIO()):  # MXNet prints the arguments on failure
        _, out, _ = features(mx.sym.var("data")).infer_shape(data=(1, c, h, w))
    return tuple(out[0])


def check_backbone(model_cfg, image_shape) -> None:
    """Refuse a backbone that cannot run on these rows (``train`` and, before any rank
    starts, ``dist_triplet.check`` call it).

    Raises:
        ValueError (one line, naming the key and value): ``model.backbone`` unknown;
            ``model.pool=flatten`` or ``model.channels`` (other than the default) on
            another backbone than ``convnet``; a
            convolutional backbone on feature rows (``image_shape`` None); an image too
            small for the backbone's downsampling (``convnet``: each pool halves, so H and
            W must be >= 2 ** (blocks - 1); a model-zoo net: MXNet's shape inference
            names the failing layer).
    """
    name = model_cfg.backbone
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r} is not known; choose mlp, convnet or a "
                         f"mxnet.gluon.model_zoo.vision name ({', '.join(ZOO[:2])}, ...: "
                         f"{', '.join(ZOO)})")
    if model_cfg.pool == "flatten" and name != "convnet":
        raise ValueError(f"model.pool=flatten is for model.backbone=convnet; {name!r} ends in "
                         "a vector (mlp) or a global pool (model zoo): leave model.pool unset")
    if list(model_cfg.channels) != ModelConfig().channels and name != "convnet":
        raise ValueError(f"model.channels={list(model_cfg.channels)} is for "
                         f"model.backbone=convnet; {name!r} has no such blocks (mlp: "
                         "model.hidden; model zoo: its own layers): leave model.channels unset")
    if name == "mlp":
        return
    if image_shape is None:
        raise ValueError(f"model.backbone={name!r} is convolutional but the data are feature "
                         "vectors (no image shape); use model.backbone=mlp for features")
    h, w, c = image_shape
    if name == "convnet":
        need = 2 ** (len(model_cfg.channels) - 1)
        if min(h, w) < need:
            raise ValueError(f"model.backbone=convnet with {len(model_cfg.channels)} blocks "
                             f"(model.channels={list(model_cfg.channels)}) halves the image "
                             f"{len(model_cfg.channels) - 1} times and needs H, W >= {need}; "
                             f"the images are {h}x{w}: use fewer model.channels or "
                             "data.image_size")
        return
    from mxnet.gluon.model_zoo import vision
    try:
        # A fixed prefix: MXNet names the failing layer, the same in every process.
        _feature_shape(vision.get_model(name, pretrained=False, prefix=f"{name}_").features,
                       image_shape)
    except mx.base.MXNetError as exc:
        from .export import mxnet_error_line
        raise ValueError(f"model.backbone={name!r}: the {h}x{w}x{c} images are too small for "
                         f"its downsampling (MXNet: {mxnet_error_line(exc)}); use larger "
                         "data.image_size or a smaller backbone (convnet, resnet18_v1, "
                         "mobilenetv2_1.0)") from None


def initialize_network(net, model_cfg, ctx, seed: int, in_units: int) -> None:
    """Initialise ``net`` (from :func:`build_network`) on ``ctx`` (a context or list) from
    ``mx.random.seed(seed)``, then load ``model.weights`` if given.

    The MLP keeps the seed's init (``model.initialize``: Uniform(``model.init_scale``)).
    A convolutional network gets He init (Xavier gaussian, fan-in, magnitude 2: He et al.
    2015) for its weights (BatchNorm and biases keep their own ones / zeros). Model-zoo
    layers leave input channels deferred: shape inference on a (1, in_units) row settles
    them, then the parameters are initialised again from the same seed, now with their
    data, so that every parameter exists before Horovod's broadcast. No forward pass runs
    here: in inference mode MXNet's oneDNN convolution reorders its weight in place into
    a blocked layout, which Horovod's broadcast cannot read ("can't generate TBlob for
    MKLDNN data").

    Raises:
        ValueError: :func:`load_weights`' errors.
    """
    from .model import initialize
    if model_cfg.backbone == "mlp":
        initialize(net, model_cfg.init_scale, ctx, seed)
    else:
        init = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)
        mx.random.seed(seed)
        net.initialize(init, ctx=ctx, force_reinit=True)
        net.infer_shape(mx.nd.zeros((1, in_units)))
        mx.random.seed(seed)
        net.initialize(init, ctx=ctx, force_reinit=True)
    if model_cfg.weights:
        load_weights(net, model_cfg.weights, model_cfg.backbone)


def _read_params(path: str) -> dict:
    """A Gluon ``.params`` file as {structural name: NDArray}. Raises ValueError (one line)
    when MXNet cannot read it, or for a directory or an exported model's parameters
    (``HybridBlock.export``: ``arg:`` / ``aux:`` names; the export is for inference)."""
    import os
    use = ("model.weights takes a Gluon .params file of the backbone (Block.save_parameters: "
           "names such as features.0.weight); an exported model (<run>/model) is for "
           "dist_triplet.embed / index / search; to start from a run's weights pass its "
           "checkpoint's parameters, <run>/checkpoints/epoch-NNNN/params")
    if os.path.isdir(path):
        raise ValueError(f"model.weights={path!r} is a directory: {use}")
    if not os.path.isfile(path):
        raise ValueError(f"model.weights={path!r}: no such file")
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as exc:
        from .export import mxnet_error_line
        raise ValueError(f"model.weights={path!r}: MXNet cannot read it as a .params file: "
                         f"{mxnet_error_line(exc)}") from None
    if not loaded:
        raise ValueError(f"model.weights={path!r}: holds no parameters (an empty .params file)")
    if not isinstance(loaded, dict):
        raise ValueError(f"model.weights={path!r}: holds unnamed arrays, not a Gluon .params "
                         "file (Block.save_parameters)")
    if any(k.startswith(("arg:", "aux:")) for k in loaded):
        raise ValueError(f"model.weights={path!r} holds an exported model's parameters "
                         f"(HybridBlock.export: arg:/aux: names): {use}")
    return loaded


def load_weights(net, path: str, backbone: str, *, apply: bool = True) -> list:
    """Load the Gluon ``.params`` file ``path`` into the initialised ``net``.

    Names are structural (``Block.save_parameters``: ``features.0.weight``). Every
    parameter outside the head must be in the file with its exact shape. The head
    (``head.*``) is loaded when all of it is present with its shapes, else left as
    initialised (a shape that differs is warned of); the file's ``output.*`` (a model-zoo
    classifier, which the head replaces) is ignored.

    Args:
        net: the network, initialised (its shapes known).
        path: the file (``model.weights``).
        backbone: ``model.backbone``, for messages.
        apply: False checks only (``dist_triplet.check``), setting nothing.

    Returns:
        The names of the head parameters left as initialised.

    Raises:
        ValueError (one line): an unreadable file; a parameter missing from the file; a
            shape mismatch (names the parameter and both shapes); NaN or infinite values;
            an entry of the file that is no parameter of the network.
    """
    saved = _read_params(path)
    ours = net._collect_params_with_prefix()
    fresh, other = [], []
    for name, param in ours.items():
        shape = tuple(param.shape)
        if name not in saved:
            if name.startswith(HEAD):
                fresh.append(name)
                continue
            raise ValueError(f"model.weights={path!r}: parameter {name!r} of model.backbone="
                             f"{backbone} (shape {shape}) is missing from the file")
        got = tuple(saved[name].shape)
        if got != shape:
            if name.startswith(HEAD):
                fresh.append(name)
                other.append(f"{name} is {got} in the file, {shape} here")
                continue
            raise ValueError(f"model.weights={path!r}: parameter {name!r} has shape {got} in "
                             f"the file but {shape} in model.backbone={backbone} for these "
                             "images (channels, sizes or model.channels differ)")
        if bad := int(np.count_nonzero(~np.isfinite(saved[name].asnumpy()))):
            raise ValueError(f"model.weights={path!r}: parameter {name!r} holds {bad} NaN or "
                             "infinite values (a diverged or damaged file)")
    if fresh:               # the head is taken whole or not at all: no half-loaded layer
        fresh = [name for name in ours if name.startswith(HEAD)]
    if other:
        log.warning("model.weights=%s: %s: the whole head is initialised", path, "; ".join(other))
    extra = sorted(k for k in saved if k not in ours and not k.startswith(CLASSIFIER))
    if extra:
        raise ValueError(f"model.weights={path!r}: {len(extra)} entries are no parameter of "
                         f"model.backbone={backbone} (first: {extra[0]!r}); is it a file of "
                         "another architecture?")
    if apply:
        for name, param in ours.items():
            if name not in fresh:
                param.set_data(saved[name].astype(param.dtype))
        log.info("loaded %d parameters from %s%s", len(ours) - len(fresh), path,
                 f"; head initialised: {', '.join(fresh)}" if fresh else "")
    return fresh


def check_network(model_cfg, in_units: int, image_shape) -> None:
    """Everything about ``model_cfg`` that can fail before training, as training would
    fail (``dist_triplet.check`` calls it before any rank starts): :func:`check_backbone`
    and, with ``model.weights``, the file against a network built and initialised on the
    CPU (:func:`load_weights` without applying).

    Raises:
        ValueError: one line naming the key, value, parameter and shapes.
    """
    check_backbone(model_cfg, image_shape)
    if model_cfg.weights:
        net = build_network(model_cfg, in_units, image_shape)
        initialize_network(net, dataclasses.replace(model_cfg, weights=None), mx.cpu(), 0,
                           in_units)
        load_weights(net, model_cfg.weights, model_cfg.backbone, apply=False)
