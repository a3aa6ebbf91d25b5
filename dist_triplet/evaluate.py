"""Rank-0 evaluation: Precision@1 every evaluation, R-Precision and MAP@R when full, the
seed article's triplet accuracy, the collapse check, and the raw-pixel baseline.

Called by the training loop (``train.train``) every ``eval.every`` epochs and after the
last; it calls no collective. The metric definitions are :mod:`dist_triplet.metrics`,
the neighbour search :mod:`dist_triplet.knn`.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from .config import Config
from .data import Split
from .triplets import create_pairs

log = logging.getLogger("dist_triplet")

_P1 = ("precision_at_1",)


class Evaluator:
    """Rank-0 evaluation on the test set; calls no collective.

    Every evaluation embeds the test set and computes, exactly: Precision@1 of the test
    queries (``eval.max_queries``, ``eval.query_seed``) against the gallery
    (``eval.gallery``: the other test items, or the training set), the seed article's
    triplet accuracy on fixed test triplets (``eval.triplet_seed``; 9,990 on
    Fashion-MNIST) and the collapse check. *Full* evaluations -- every ``eval.full_every``
    epochs, after the last epoch, and any call without an epoch -- add R-Precision and
    MAP@R (their R nearest neighbours cost ~10x the P@1 search).

    The raw-pixel baseline (the same retrieval on pixels / 255) is ``raw``: Precision@1
    at construction, for the epoch log line; the first full evaluation adds R-Precision
    and MAP@R to that same dict, which the run's Recorder writes to metrics.json at the
    end (``raw_pixels``).

    Args:
        cfg: the run's config (section ``eval``).
        test: the test split (queries; and the gallery with ``eval.gallery=test``).
        train: the training split; required with ``eval.gallery=train``.

    Raises:
        ValueError: ``eval.gallery=train`` without ``train``.
    """

    def __init__(self, cfg: Config, test: Split, train: Optional[Split] = None):
        from .metrics import retrieval_metrics
        if cfg.eval.gallery == "train" and train is None:
            raise ValueError("eval.gallery=train needs the training split")
        self.cfg = cfg
        self.test = test
        self.gallery = train if cfg.eval.gallery == "train" else None
        self.triplets = create_pairs(test.labels, seed=cfg.eval.triplet_seed)
        t0 = time.perf_counter()
        self.raw = retrieval_metrics(test.images, test.labels, *self._gallery_pixels(),
                                     metrics=_P1, **self._search_options())
        log.info("raw pixels: P@1 %.4f (%d queries%s, %.2f s; R-Prec and MAP@R at the "
                 "first full evaluation)", self.raw["precision_at_1"], self.raw["queries"],
                 ", gallery: training set" if self.gallery is not None else "",
                 time.perf_counter() - t0)

    def _gallery_pixels(self) -> tuple:
        g = self.gallery
        return (g.images, g.labels) if g is not None else (None, None)

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
        from .metrics import RETRIEVAL_METRICS, evaluate_embeddings, retrieval_metrics
        from .model import embed
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
        if full and "r_precision" not in self.raw:
            t0 = time.perf_counter()
            self.raw.update(retrieval_metrics(self.test.images, self.test.labels,
                                              *self._gallery_pixels(), **self._search_options()))
            log.info("raw pixels: P@1 %.4f  R-Prec %.4f  MAP@R %.4f  (%d queries, %.2f s)",
                     self.raw["precision_at_1"], self.raw["r_precision"], self.raw["map_at_r"],
                     self.raw["queries"], time.perf_counter() - t0)
        if res["collapsed"]:
            log.warning("embeddings collapsed (spread %.3g <= eval.collapse_eps %.3g): the "
                        "metrics below are not meaningful", res["spread"],
                        self.cfg.eval.collapse_eps)
        elif not res["valid"]:
            log.warning("no test query has an item of its class in the gallery: the "
                        "retrieval metrics are undefined (NaN)")
        return res, emb
