"""The backbone names ``model.backbone`` accepts, without importing MXNet (config.py
validates them; backbone.py builds them).

``ZOO``: the architectures of ``mxnet.gluon.model_zoo.vision.get_model`` in MXNet 1.9.1
(tests/test_backbone.py builds every one, offline: ``pretrained=False``).
"""
ZOO = (tuple(f"resnet{d}_v{v}" for v in (1, 2) for d in (18, 34, 50, 101, 152))
       + tuple(f"vgg{d}{bn}" for bn in ("", "_bn") for d in (11, 13, 16, 19))
       + ("alexnet", "densenet121", "densenet161", "densenet169", "densenet201",
          "squeezenet1.0", "squeezenet1.1", "inceptionv3")
       + tuple(f"mobilenet{w}" for w in ("1.0", "0.75", "0.5", "0.25"))
       + tuple(f"mobilenetv2_{w}" for w in ("1.0", "0.75", "0.5", "0.25")))
BACKBONES = ("mlp", "convnet") + ZOO
