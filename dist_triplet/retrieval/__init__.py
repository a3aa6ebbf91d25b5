"""Retrieval with a trained embedding: the Python API (docs/search.md), which :mod:`.cli`
wraps. Modules, lowest first: ``neighbours`` (:func:`knn`), ``metrics``, ``specs``, ``model``,
``index``, ``search``, ``calibrate``, ``cli``. It imports ``data``, ``config``, ``model``,
``export``; none of them imports it."""
from .calibrate import calibrate
from .index import Index
from .model import Model
from .neighbours import knn
from .specs import read_items

__all__ = ["Index", "Model", "calibrate", "knn", "read_items"]
