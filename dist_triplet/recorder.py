"""What rank 0 records while training: config.yaml, metrics.json (the metrics history:
the Recorder owns it; each checkpoint stores a copy), TensorBoard scalars, the epoch log
line and the epoch checkpoints.

:func:`make_recorder` gives rank 0 a :class:`Recorder` and every other rank a
:class:`NullRecorder` with the same methods doing nothing, so the training loop calls
them on every rank without asking which one it is. No method calls a collective, runs
evaluation, or changes a row it is given. The end-of-run exports (model, projector,
report) are outputs.py's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import List, Optional, Sequence

from tensorboardX import SummaryWriter

from . import checkpoint as ckpt
from .config import Config, save_config
from .fsutil import write_json

__all__ = ["Recorder", "NullRecorder", "make_recorder", "timing_text"]

log = logging.getLogger("dist_triplet")


def timing_text(sample_s: float, train_s: float, wait_s: float, allreduce_s: float) -> str:
    """The timing part of the epoch log line (:class:`Recorder`), seconds of wall time;
    ``record_epoch`` closes the bracket (after ``eval``, when the epoch evaluated)."""
    return (f"[sample {sample_s:.2f}s train {train_s:.2f}s (host-wait {wait_s:.2f}s) "
            f"allreduce {allreduce_s:.2f}s")


class Recorder:
    """What rank 0 writes into the run directory while training; :func:`make_recorder`
    gives the other ranks a :class:`NullRecorder`. The end-of-run exports are outputs.py's.

    Args:
        run_dir: the run directory (created here if missing, with its config.yaml).
        cfg: the run's config.
        history: per-epoch rows already recorded (a resumed run: the checkpoint's copy).
        baseline: the raw-pixel retrieval metrics (``Evaluator.raw``), for the epoch log
            line, metrics.json and scalars.

    The Recorder owns the metrics history (``history``); no method calls a collective,
    runs evaluation, or changes a row it is given.

    The epoch log line (rank 0; :meth:`record_epoch`), field by field (docs/results.md
    repeats this list)::

        epoch 3/10  loss 0.1234  seed-acc 0.9050 (9041/9990 triplets)  P@1 0.7960 (raw 0.8092)
          R-Prec 0.6515  MAP@R 0.5411  24,665 triplets/s
          [sample 0.10s train 3.50s (host-wait 3.39s) allreduce 0.01s eval 0.52s]

    * ``loss``: mean triplet loss over the epoch's steps (all ranks).
    * ``seed-acc``: the seed article's accuracy on the fixed test triplets: the share whose
      margin-0 triplet loss is 0 (d(a, p) <= d(a, n)), with the count (correct/total).
    * ``P@1``, ``R-Prec``, ``MAP@R``: leave-one-out retrieval on the test set (squared L2);
      ``raw``: P@1 of the raw pixels. R-Prec/MAP@R come with full evaluations only
      (``eval.full_every``; always the last epoch), else the line says when they come.
    * ``triplets/s`` (``images/s`` for P x K): training throughput of the whole job
      (global batch x steps / train s).
    * ``sample``: drawing the epoch's triplets; ``train``: the optimizer steps (with the
      epoch's index copy); ``host-wait``: of ``train``, the time the host sat waiting for the
      device (near ``train``: device-bound; near 0: host-bound); ``allreduce``: the
      end-of-epoch loss allreduce, which also waits for the slowest rank; ``eval``: the
      evaluation on rank 0 (seconds of wall time).
    * ``COLLAPSED``: the embedding's spread is at or below ``eval.collapse_eps``, or half
      of the test triplets tie (``metrics.evaluate_embeddings``); a collapsed embedding's
      seed-acc counts ties as correct, so it is not a success.
    """

    def __init__(self, run_dir: str, cfg: Config, history: Sequence[dict] = (),
                 baseline: Optional[dict] = None):
        self.run_dir = run_dir
        # What a row of the global batch is: a triplet (offline) or an image (P x K).
        self.unit = "triplets" if cfg.sampler.kind == "offline" else "images"
        self.history: List[dict] = [dict(r) for r in history]
        self.baseline = baseline or {}
        os.makedirs(run_dir, exist_ok=True)
        # Paths absolute (output.dir: this run): RUN:test (index, search) reads the same
        # files, and --config RUN/config.yaml checkpoint.resume=auto resumes it, from any cwd.
        d, m = cfg.data, cfg.model
        paths = {k: os.path.abspath(getattr(d, k)) for k in ("path", "root", "cache_dir")
                 if getattr(d, k)}
        self.cfg = dataclasses.replace(     # config.yaml and every checkpoint's record
            cfg, data=dataclasses.replace(d, **paths), model=dataclasses.replace(
                m, weights=m.weights and os.path.abspath(m.weights)),
            output=dataclasses.replace(cfg.output, dir=os.path.abspath(run_dir)))
        save_config(self.cfg, os.path.join(run_dir, "config.yaml"))
        # Resumed: TensorBoard drops the steps after the checkpoint's epochs (a resume from
        # an older checkpoint abandons them, as metrics.json and the checkpoints do).
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=len(self.history) + 1 if self.history else None)

    def scalars(self, epoch: int, values: dict) -> None:
        """TensorBoard scalars at step ``epoch + 1``; non-numbers and non-finite skipped."""
        for key, val in values.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
                self.writer.add_scalar(key, val, epoch + 1)
        self.writer.flush()

    def write_metrics(self, final: Optional[dict], extra: Optional[dict] = None) -> dict:
        """metrics.json: per-epoch rows and the final values, so scripts need not parse logs.
        Returns the document written."""
        doc = {"run_dir": os.path.abspath(self.run_dir), "epochs": self.history,
               "final": final}
        doc.update(extra or {})
        write_json(os.path.join(self.run_dir, "metrics.json"), doc)
        return doc

    def record_epoch(self, epoch: int, row: dict, timing: str) -> None:
        """Log the epoch line, add a copy of ``row`` to the history and metrics.json, and
        write its scalars. ``row`` holds the evaluation results when the loop evaluated."""
        epochs = self.cfg.train.epochs
        if "seed_accuracy" in row:
            # A collapsed embedding's seed accuracy counts ties as correct (1.0 for one
            # point): say so next to the number, not only at the end of the line.
            # R-Precision and MAP@R come with full evaluations only (eval.full_every; always
            # the last epoch): say where they are instead of leaving them out silently.
            ranked = (f"R-Prec {row['r_precision']:.4f}  MAP@R {row['map_at_r']:.4f}"
                      if "r_precision" in row else
                      "R-Prec/MAP@R: last epoch" + (f" and every {self.cfg.eval.full_every}"
                                                    if self.cfg.eval.full_every else ""))
            log.info("epoch %d/%d  loss %.4f  seed-acc %.4f (%d/%d triplets%s)  P@1 %.4f "
                     "(raw %.4f)%s  %s%s  %s %s/s  %s eval %.2fs]",
                     epoch + 1, epochs, row["loss"], row["seed_accuracy"],
                     row["correct"], row["total"],
                     ", COLLAPSED: not a success" if row["collapsed"] else "",
                     row["precision_at_1"], self.baseline["precision_at_1"],
                     " (approximate: faiss IVF, eval.exact_max_gallery)"
                     if row.get("approximate") else "", ranked,
                     "  COLLAPSED" if row["collapsed"] else "",
                     f"{row['triplets_per_s']:,.0f}", self.unit, timing, row["time_eval_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  %s %s/s  %s]", epoch + 1, epochs,
                     row["loss"], f"{row['triplets_per_s']:,.0f}", self.unit, timing)
        self.history.append(dict(row))
        self.write_metrics(final=None)
        self.scalars(epoch, {f"train/{k}": row[k] for k in ("loss", "triplets_per_s", "lr")})
        self.scalars(epoch, {f"eval/{k}": v for k, v in row.items()
                             if k in ("seed_accuracy", "strict_accuracy", "precision_at_1",
                                      "r_precision", "map_at_r", "spread")})

    def save_checkpoint(self, epoch: int, net, trainer, *, steps_per_epoch: int,
                        processes: int, devices: int, data: Optional[str] = None) -> None:
        """The checkpoint of 0-based ``epoch`` (unless ``checkpoint.keep`` is 0), with a
        copy of the history so far and the training data's digest ``data``."""
        if self.cfg.checkpoint.keep > 0:
            meta = ckpt.CheckpointMeta(
                epoch=epoch, config=self.cfg.to_dict(), world_size=processes * devices,
                processes=processes, devices=devices, steps_per_epoch=steps_per_epoch,
                history=list(self.history), data=data)
            path = ckpt.save_checkpoint(os.path.join(self.run_dir, "checkpoints"), net, trainer,
                                        meta, self.cfg.checkpoint.keep)
            log.info("checkpoint %s", path)

    def close(self) -> None:
        """Close the TensorBoard writer (end of run)."""
        self.writer.close()


class NullRecorder:
    """The recorder of ranks other than 0: the :class:`Recorder`'s methods, doing
    nothing; its history stays empty."""

    run_dir = None
    baseline: dict = {}

    def __init__(self):
        self.history: List[dict] = []

    def scalars(self, epoch: int, values: dict) -> None:
        pass

    def write_metrics(self, final: Optional[dict], extra: Optional[dict] = None) -> dict:
        return {}

    def record_epoch(self, epoch: int, row: dict, timing: str) -> None:
        pass

    def save_checkpoint(self, epoch: int, net, trainer, *, steps_per_epoch: int,
                        processes: int, devices: int, data: Optional[str] = None) -> None:
        pass

    def close(self) -> None:
        pass


def make_recorder(is_main: bool, run_dir: str, cfg: Config, history: Sequence[dict] = (),
                  baseline: Optional[dict] = None):
    """A :class:`Recorder` on rank 0 (``is_main``), else a :class:`NullRecorder`."""
    if is_main:
        return Recorder(run_dir, cfg, history, baseline)
    return NullRecorder()
