"""Retrieval with a trained embedding: neighbours, metrics, a saved index, search, calibrate.

Python API (the commands of :mod:`.cli` are thin wrappers around it)::

    from dist_triplet.retrieval import Index, Model, calibrate, knn, read_items
    model = Model("RUN/model")                       # an export, its input (meta.json)
    gallery = read_items("RUN:train", model.input)   # any data spec (specs.py)
    index = Index.build(model.embed(gallery.x), gallery.labels, gallery.ids,
                        gallery.class_names, kind="flat")
    index.save("IX")                                 # atomic; Index.load("IX") verifies it
    dist, pos = index.search(model.embed(queries.x), k=5)   # squared L2, ties: lower index
    doc = calibrate(index, model, read_items("RUN:test", model.input))   # a threshold

Modules, lowest first: ``neighbours`` (:func:`knn`), ``metrics``, ``specs``, ``model``,
``index``, ``search``, ``calibrate``, ``cli``. The package imports ``data``, ``config``,
``model`` and ``export``; none of them imports it.
"""
from .calibrate import calibrate
from .index import Index
from .model import Model
from .neighbours import knn
from .specs import read_items

__all__ = ["Index", "Model", "calibrate", "knn", "read_items"]
