"""Retrieval with a trained embedding: neighbours, metrics, a saved index, search, calibrate.

The Python API (docs/search.md, "Python API"); the commands of :mod:`.cli` wrap it.
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
