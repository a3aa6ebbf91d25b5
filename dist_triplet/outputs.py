"""The end of a run on rank 0: final metrics, the exported model, the projector and the
report, written into the run directory from one place (:func:`finish_run`).

Called by the training loop on rank 0 only, after the last epoch; calls no collective.
metrics.json is written first (the numbers are safe before the exports) and again at the
end with ``end_of_run_s``, the seconds of each part (the benchmark reads them).
"""
from __future__ import annotations

import logging
import os
import time

from .data import Split, as_float
from .export import export_model
from .projector import LEARNED_TAG, RAW_TAG, export_projector
from .report import write_report

__all__ = ["finish_run"]

log = logging.getLogger("dist_triplet")


def input_meta(test: Split) -> dict:
    """What the exported model's input is: uint8 images scaled by 1/255 (with their
    (H, W, C)), or features used as they are. Every backbone takes the flat (B, H*W*C)
    rows; a convolutional one reshapes them to (B, C, H, W) inside its graph."""
    if test.is_image:
        return {"image_shape": list(test.image_shape)}
    return {"input_scaling": "none (features, used as they are)", "image_shape": None}


def finish_run(recorder, final: dict, net, ctx, test: Split, embeddings, extra: dict) -> dict:
    """Rank 0's end of run: final metrics.json, raw-pixel scalars, the projector of
    ``embeddings`` ((N, D) float32 of the test set; ``eval.projector``), the model export
    (``<run>/model``, for ``python -m dist_triplet.embed``), the report (``eval.report``),
    and the run directory's path on stdout. Closes ``recorder`` (a ``recorder.Recorder``).

    Args:
        final: the last epoch's row (with the final evaluation).
        net, ctx: the trained network and the context it is exported from.
        test: the test split the embeddings are of.
        extra: more top-level keys for metrics.json (world size, backend).

    Returns:
        ``final``.
    """
    cfg, run_dir, baseline = recorder.cfg, recorder.run_dir, recorder.baseline
    t_start = time.perf_counter()
    extra = dict(extra, raw_pixels=baseline)
    doc = recorder.write_metrics(final=final, extra=extra)
    recorder.scalars(cfg.train.epochs - 1, {f"eval/raw_{k}": v for k, v in baseline.items()
                                            if isinstance(v, float)})
    spent = {}
    if cfg.eval.projector:
        t = time.perf_counter()
        n = cfg.eval.projector_points or len(test.labels)
        # Sprites only for images (padded to squares); feature data get none.
        export_projector(os.path.join(run_dir, "tensorboard"),
                         {RAW_TAG: as_float(test.images[:n]), LEARNED_TAG: embeddings[:n]},
                         test.labels[:n], test.class_names,
                         images=test.images[:n] if test.is_image else None,
                         image_shape=test.image_shape)
        spent["projector_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model_dir = export_model(net, os.path.join(run_dir, "model"), ctx, test.images.shape[1],
                             meta={"run_dir": os.path.abspath(run_dir),
                                   "epochs": cfg.train.epochs, "backbone": cfg.model.backbone,
                                   **input_meta(test)})
    spent["export_s"] = time.perf_counter() - t
    if cfg.eval.report:
        t = time.perf_counter()
        report(run_dir, doc, test, embeddings)
        spent["report_s"] = time.perf_counter() - t
    recorder.close()
    spent["total_s"] = time.perf_counter() - t_start
    recorder.write_metrics(final=final, extra=dict(extra, end_of_run_s=spent))
    log.info("exported model to %s; end of run %.2f s (%s)", model_dir, spent["total_s"],
             ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in spent.items() if k != "total_s"))
    log.info("run directory: %s", os.path.abspath(run_dir))
    print(os.path.abspath(run_dir), flush=True)
    return final


def report(run_dir: str, doc: dict, test: Split, embeddings) -> None:
    """RUN/report/ (``report.write_report``) from metrics.json's document, the test split
    and its (N, D) embeddings. A failure is logged, not raised: the run's results are
    already written, and a picture must not turn them into an error."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        path = write_report(run_dir, doc, test.images, embeddings, test.labels,
                            test.class_names, test.image_shape)
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("report not written: %s", exc)
        return
    # CPU seconds too: on a shared machine the wall time mostly measures the others.
    log.info("report %s (%.2f s, %.2f s CPU)", os.path.join(path, "report.html"),
             time.perf_counter() - t0, time.process_time() - c0)
