"""Rank-0 evaluation: the fixed test triplets (the seed article's metric), retrieval
metrics on the whole test set (P@1, R-Precision, MAP@R) and the raw-pixel baseline.

Called by the training loop (``train.train``) every ``eval.every`` epochs and after the
last; it calls no collective.
"""
from __future__ import annotations

import logging
import time

from .config import Config
from .data import Split
from .triplets import create_pairs

log = logging.getLogger("dist_triplet")


class Evaluator:
    """Rank-0 evaluation on the test set; calls no collective.

    Test triplets are made once with ``eval.triplet_seed`` (the seed article's metric:
    9,990 on Fashion-MNIST), retrieval metrics on the whole test set, and the raw-pixel
    baseline once per run."""

    def __init__(self, cfg: Config, test: Split):
        from .metrics import retrieval_metrics
        self.cfg = cfg
        self.test = test
        self.triplets = create_pairs(test.labels, seed=cfg.eval.triplet_seed)
        t0 = time.perf_counter()
        self.raw = retrieval_metrics(test.images, test.labels)
        log.info("raw pixels: P@1 %.4f  R-Prec %.4f  MAP@R %.4f  (%d queries, %.1f s)",
                 self.raw["precision_at_1"], self.raw["r_precision"], self.raw["map_at_r"],
                 self.raw["queries"], time.perf_counter() - t0)

    def __call__(self, net, ctx) -> tuple:
        from .metrics import evaluate_embeddings
        from .model import embed
        emb = embed(net, self.test.images, ctx, self.cfg.eval.batch_size)
        res = evaluate_embeddings(emb, self.test.labels, self.triplets,
                                  collapse_eps=self.cfg.eval.collapse_eps)
        if res["collapsed"]:
            log.warning("embeddings collapsed (spread %.3g <= eval.collapse_eps %.3g): the "
                        "metrics below are not meaningful", res["spread"],
                        self.cfg.eval.collapse_eps)
        return res, emb
