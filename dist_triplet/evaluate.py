"""Rank-0 evaluation: Precision@1 every evaluation, R-Precision and MAP@R when full, the
seed article's triplet accuracy, the collapse check, and the raw-pixel baseline.

Called by the training loop (``loop.train``) every ``eval.every`` epochs and after the
last; it calls no collective. The retrieval metrics and the neighbour search are
:mod:`dist_triplet.retrieval.metrics` (:func:`dist_triplet.retrieval.neighbours.knn`),
triplet accuracy and the collapse check :mod:`dist_triplet.metrics`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Optional

import numpy as np

from .config import Config
from .data import Split, anchor_rows, as_float
from .triplets import create_pairs

log = logging.getLogger("dist_triplet")

_P1 = ("precision_at_1",)
# Share of all-zero test embeddings (dead final ReLU) that is warned of. Measured: resnet18_v1
# from a weights file with the seed's final ReLU left 10 of 24 test items at 0 (P@1 0.125,
# below chance, tie_share 0.15: not collapsed). A trained seed MLP has none.
ZERO_SHARE = 0.1
# Part of the raw-pixel cache key: change it when the metrics' definition or search changes
# (v3: the cache holds all three metrics, computed together).
_RAW_CACHE_VERSION = "raw-v3"


def raw_cache_path(cfg: Config, test: Split, gallery: Optional[Split]) -> str:
    """Where the raw-pixel baseline of ``test`` (against ``gallery``) is cached.

    ``<output.root>/.cache/raw-<hash>.json``, or ``output.dir``'s parent instead of
    output.root: beside the run directories, so every run on the same data finds it. The
    hash (BLAKE2b, 128 bits) covers the pixels' and labels' bytes, shapes and dtypes, the
    evaluation keys that change the numbers and ``_RAW_CACHE_VERSION``.
    """
    h = hashlib.blake2b(digest_size=16)
    for split in (test, gallery) if gallery is not None else (test,):
        for arr in (split.images, split.labels):
            arr = np.ascontiguousarray(arr)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
    e = cfg.eval
    h.update(json.dumps([_RAW_CACHE_VERSION, e.gallery, e.max_queries, e.query_seed,
                         e.exact_max_gallery, e.nprobe]).encode())
    out = cfg.output
    base = os.path.dirname(os.path.abspath(out.dir)) if out.dir else out.root
    return os.path.join(base, ".cache", f"raw-{h.hexdigest()}.json")


class Evaluator:
    """Rank-0 evaluation on the test set; calls no collective.

    Every evaluation embeds the test set and computes, exactly: Precision@1 of the test
    queries (``eval.max_queries``, ``eval.query_seed``) against the gallery
    (``eval.gallery``: the other test items, or the training set), the seed article's
    triplet accuracy on fixed test triplets (``eval.triplet_seed``; 9,990 on
    Fashion-MNIST) and the collapse check. *Full* evaluations -- every ``eval.full_every``
    epochs, after the last epoch, and any call without an epoch -- add R-Precision and
    MAP@R (their R nearest neighbours cost ~10x the P@1 search).
    ``test.images`` may be uint8 images (scaled / 255 batch by batch when embedded) or
    float32 features.

    The raw-pixel baseline (the same retrieval on pixels / 255) is ``raw``: Precision@1,
    R-Precision and MAP@R from one search at construction (the R nearest hold the
    nearest: one search of k = R costs about what the two, k = 1 then k = R, cost
    apart, less the k = 1 one), for the epoch log line and metrics.json (``raw_pixels``).
    With ``eval.raw_cache`` they come from :func:`raw_cache_path` when an earlier run
    stored them; a cache that cannot be read or written only logs a warning.

    Args:
        cfg: the run's config (section ``eval``).
        test: the test split (queries; and the gallery with ``eval.gallery=test``).
        train: the training split; required with ``eval.gallery=train``.

    Raises:
        ValueError: ``eval.gallery=train`` without ``train``.
    """

    def __init__(self, cfg: Config, test: Split, train: Optional[Split] = None):
        from .retrieval.metrics import retrieval_metrics
        if cfg.eval.gallery == "train" and train is None:
            raise ValueError("eval.gallery=train needs the training split")
        self.cfg = cfg
        self.test = test
        self.gallery = train if cfg.eval.gallery == "train" else None
        # Rows of 1-sample classes (by-class protocol, data/split.py) are queries, never
        # anchors: triplets come from the other rows (all of them otherwise).
        rows = anchor_rows(test.labels)
        self.triplets = rows[create_pairs(test.labels[rows], seed=cfg.eval.triplet_seed)]
        t0 = time.perf_counter()
        self._cache = raw_cache_path(cfg, test, self.gallery) if cfg.eval.raw_cache else None
        self.raw = self._read_cache()
        if self.raw is None:
            self.raw = retrieval_metrics(as_float(test.images), test.labels,
                                         *self._gallery_pixels(), **self._search_options())
            self._write_cache()
            how = f"{time.perf_counter() - t0:.2f} s"
        else:
            how = f"cached in {self._cache}"
        log.info("raw pixels: P@1 %.4f  R-Prec %.4f  MAP@R %.4f  (%d queries%s; %s)",
                 self.raw["precision_at_1"], self.raw["r_precision"], self.raw["map_at_r"],
                 self.raw["queries"],
                 ", gallery: training set" if self.gallery is not None else "", how)

    def _read_cache(self) -> Optional[dict]:
        if self._cache is None or not os.path.exists(self._cache):
            return None
        from .retrieval.metrics import RETRIEVAL_METRICS
        n, most = len(self.test.labels), self.cfg.eval.max_queries or len(self.test.labels)
        try:
            with open(self._cache) as fh:
                doc = json.load(fh, parse_constant=lambda c: None)   # bare NaN: not ours
            q, ex = (doc.get(k) if isinstance(doc, dict) else None
                     for k in ("queries", "excluded_queries"))
            if not (type(q) is int and type(ex) is int and 0 <= ex <= n
                    and 0 <= q <= min(n - ex, most)):
                raise ValueError(f"queries {q!r} and excluded_queries {ex!r} do not fit the "
                                 f"{n} test items")
            for m in RETRIEVAL_METRICS:     # in [0, 1] with queries; null (undefined) without
                v = doc.get(m)
                if not (type(v) is float and 0 <= v <= 1 and q > 0 or v is None and q == 0):
                    raise ValueError(f"{m} is {v!r} with {q} queries")
            out = {k: float("nan") if doc[k] is None else doc[k]
                   for k in RETRIEVAL_METRICS + ("queries", "excluded_queries")}
            return dict(out, approximate=True) if doc.get("approximate") is True else out
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("raw-pixel cache %s unreadable (%s): computing it again", self._cache,
                        exc)
            return None

    def _write_cache(self) -> None:
        if self._cache is None:
            return
        from .fsutil import write_json
        try:
            os.makedirs(os.path.dirname(self._cache), exist_ok=True)
            write_json(self._cache, self.raw)
        except OSError as exc:
            log.warning("raw-pixel cache %s not written: %s", self._cache, exc)

    def _gallery_pixels(self) -> tuple:
        g = self.gallery
        # Raw inputs as the network sees them (uint8 / 255 for images, features as they are).
        return (as_float(g.images), g.labels) if g is not None else (None, None)

    def _search_options(self) -> dict:
        e = self.cfg.eval
        return {"max_queries": e.max_queries, "seed": e.query_seed,
                "exact_max_gallery": e.exact_max_gallery, "nprobe": e.nprobe}

    def is_full(self, epoch: Optional[int]) -> bool:
        """Whether the evaluation after 0-based ``epoch`` (None: a final one) is full."""
        e, epochs = self.cfg.eval, self.cfg.train.epochs
        return (epoch is None or epoch + 1 >= epochs
                or (e.full_every > 0 and (epoch + 1) % e.full_every == 0))

    def __call__(self, net, ctx, epoch: Optional[int] = None) -> tuple:
        """``(results, embeddings)``: the flat dict of
        :func:`dist_triplet.metrics.evaluate_embeddings` (``r_precision`` and ``map_at_r``
        only when full; ``full``: bool) and the (N, D) float32 test embeddings."""
        from .metrics import evaluate_embeddings
        from .model import embed
        from .retrieval.metrics import RETRIEVAL_METRICS
        full = self.is_full(epoch)
        metrics = RETRIEVAL_METRICS if full else _P1
        emb = embed(net, self.test.images, ctx, self.cfg.eval.batch_size)
        g_emb = g_lab = None
        if self.gallery is not None:
            g_emb = embed(net, self.gallery.images, ctx, self.cfg.eval.batch_size)
            g_lab = self.gallery.labels
        res = evaluate_embeddings(emb, self.test.labels, self.triplets,
                                  collapse_eps=self.cfg.eval.collapse_eps, metrics=metrics,
                                  gallery_emb=g_emb, gallery_labels=g_lab,
                                  **self._search_options())
        res["full"] = full
        if not np.isfinite(res["spread"]):     # diverged, not collapsed: loop.train stops
            return res, emb
        if res["collapsed"]:
            eps = self.cfg.eval.collapse_eps
            why = (f"spread {res['spread']:.3g} <= eval.collapse_eps {eps:.3g}"
                   if res["spread"] <= eps else f"{res['tie_share']:.1%} of the test triplets "
                   "tie, d(a,p) == d(a,n): many inputs share one point")
            log.warning("embeddings collapsed (%s): the metrics below are not meaningful", why)
        elif not res["valid"]:
            log.warning("no test query has an item of its class in the gallery: the "
                        "retrieval metrics are undefined (NaN)")
        elif (zero := int(np.count_nonzero(~emb.any(axis=1)))) >= ZERO_SHARE * len(emb):
            log.warning("%d of %d test embeddings are all zero (a ReLU on the embedding, "
                        "model.final_relu, switched every unit off): they tie with each other "
                        "at distance 0, so the metrics mix ties with retrieval; "
                        "model.final_relu=false avoids it", zero, len(emb))
        return res, emb
