"""The run directory: where a run writes, which checkpoint it resumes from, and the
rank-0 Recorder of what it writes there.

* ``resolve_run_dir``: ``output.dir`` or a generated ``<root>/<name>-<timestamp>``,
  decided by rank 0 and shared (``dist.decide_on_rank0``).
* ``find_resume`` / ``resolve_resume``: the checkpoint to continue from, and the refusals
  that keep one run from overwriting another.
* ``Recorder``: config.yaml, metrics.json (the metrics history: the Recorder owns it;
  each checkpoint stores a copy), TensorBoard scalars, checkpoints, and the end-of-run
  projector and model export. Every method is a no-op off rank 0 and none calls a
  collective; it neither evaluates nor changes the rows it is given.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import List, Optional, Sequence

from . import checkpoint as ckpt
from .config import Config, flat_dict, resume_policies, save_config
from .data import Split
from .dist import decide_on_rank0
from .fsutil import write_json

log = logging.getLogger("dist_triplet")


# ----------------------------------------------------------------------------- run directory

def _check_dir_path(run_dir: str) -> None:
    """Raise ValueError naming output.dir when ``run_dir`` or one of its parents exists
    but is not a directory (the run directory could not be made there)."""
    path = os.path.abspath(run_dir)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                what = "is" if path == os.path.abspath(run_dir) else f"is inside {path!r}, which is"
                raise ValueError(f"output.dir={run_dir!r} {what} an existing file, not a "
                                 "directory; choose another output.dir")
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _make_unique_dir(base: str) -> str:
    """Create ``base`` (or ``base-2``, ``base-3``, ... if taken) exclusively; return it.
    ``os.mkdir`` fails if the directory exists, so two runs started in the same second
    never share one."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    n = 1
    while True:
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def resolve_run_dir(cfg: Config, backend) -> str:
    """The run directory, decided by rank 0 and broadcast (timestamps differ across ranks).
    A generated ``<root>/<name>-<timestamp>`` is created here by rank 0, exclusively. Rank
    0's error (output.dir is a file) is raised on every rank. Every rank must call it."""
    def decide() -> str:
        try:
            run_dir = cfg.output.dir
            if run_dir is None and cfg.checkpoint.resume not in (None, "auto"):
                # Resuming from an explicit checkpoint continues that run's directory.
                run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint.resume)))
            if run_dir is None:
                _check_dir_path(cfg.output.root)
                return _make_unique_dir(os.path.join(
                    cfg.output.root, f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
            _check_dir_path(run_dir)
            return run_dir
        except OSError as exc:
            raise ValueError(f"output.dir: {exc}") from None
    return decide_on_rank0(backend, decide, "run_dir")


# ----------------------------------------------------------------------------- resume

def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


# Files that mark a directory as some run's directory (Recorder writes them first).
RUN_FILES = ("config.yaml", "metrics.json")


def find_resume(resume: Optional[str], ckpt_dir: str,
                config: Optional[dict] = None) -> Optional[str]:
    """The checkpoint to resume from, for ``checkpoint.resume`` and the run's ``ckpt_dir``.

    ``None`` (start fresh) refuses a run directory (``dirname(ckpt_dir)``) that already
    holds a run: checkpoints (the new run's saves and the last-K retention would mix with
    the old run's: an old epoch-0009 outlives a new epoch-0002), or a ``config.yaml`` /
    ``metrics.json`` that the new run would overwrite. ``'auto'`` gives the newest complete
    checkpoint, or None (a fresh start) unless the directory holds another run's
    ``config.yaml`` whose "fixed" keys (config.py's resume policies) differ from ``config``. A path is returned as
    given (``read_meta`` checks it), unless ``ckpt_dir`` holds checkpoints and the path is
    not one of them: saving into ``ckpt_dir`` would then prune that other run's later
    epochs. Rank 0 decides; it calls no collective.

    Raises:
        ValueError: any refusal above (names the directory, the file or key, and the ways
            out).
    """
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if resume == "auto":
        if latest is None and config is not None:
            _check_same_run(run_dir, config)
        return latest
    if resume:
        if latest is not None and not _inside(resume, ckpt_dir):
            raise ValueError(
                f"checkpoint.resume={resume!r} is not a checkpoint of output.dir {run_dir!r}, "
                f"which holds another run's checkpoints (latest {latest}); saving there would "
                "remove them. Choose another output.dir (or output.dir=null to continue in "
                "the checkpoint's own run directory)")
        return resume
    if latest is not None:
        raise ValueError(
            f"output.dir {run_dir!r} already holds "
            f"checkpoints (latest {latest}); pass checkpoint.resume=auto to continue that run, "
            "or choose another output.dir for a fresh one")
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if present:
        raise ValueError(
            f"output.dir {run_dir!r} already holds a run ({', '.join(present)}) and a fresh "
            "run would overwrite it; choose another output.dir, or pass "
            "checkpoint.resume=auto to continue that run")
    return None


def _check_same_run(run_dir: str, config: dict) -> None:
    """Refuse ``resume=auto`` without a checkpoint when ``run_dir/config.yaml`` belongs to a
    run whose "fixed" keys differ: restarting would silently replace that run."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    import yaml
    try:
        with open(path) as fh:
            saved = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the run's config ({exc}); choose another "
                         "output.dir") from None
    saved = flat_dict(saved) if isinstance(saved, dict) else {}
    new = flat_dict(config)
    fixed = [k for k, p in resume_policies().items() if p == "fixed"]
    # A key the file gives that differs says more than one the file lacks: name it first.
    for key in sorted(fixed, key=lambda k: k not in saved):
        if saved.get(key) != new.get(key):
            raise ValueError(
                f"checkpoint.resume=auto: output.dir {run_dir!r} holds no checkpoint but "
                f"another run's config ({path}: {key} was {saved.get(key)!r}, is "
                f"{new.get(key)!r} now); choose another output.dir for a fresh run")


def resolve_resume(cfg: Config, run_dir: str, backend) -> Optional[str]:
    """The checkpoint to resume from (:func:`find_resume`), decided by rank 0, which alone
    writes checkpoints, and broadcast so every rank starts at the same epoch. Rank 0's
    error (a fresh start into a directory that holds checkpoints) is raised on every rank,
    so all exit alike. Every rank must call it."""
    return decide_on_rank0(
        backend, lambda: find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"),
                                     cfg.to_dict()),
        "resume")


# ----------------------------------------------------------------------------- recorder

class Recorder:
    """What rank 0 writes into the run directory; every method a no-op off rank 0.

    Args:
        active: True on rank 0.
        run_dir: the run directory (created here on rank 0, with its config.yaml).
        cfg: the run's config.
        history: per-epoch rows already recorded (a resumed run: the checkpoint's copy).
        baseline: the raw-pixel retrieval metrics (``Evaluator.raw``), for the epoch log
            line, metrics.json and scalars; {} off rank 0.

    The Recorder owns the metrics history (``history``); no method calls a collective,
    runs evaluation, or changes a row it is given.
    """

    def __init__(self, active: bool, run_dir: str, cfg: Config, history: Sequence[dict] = (),
                 baseline: Optional[dict] = None):
        self.active = active
        self.run_dir = run_dir
        self.cfg = cfg
        self.history: List[dict] = [dict(r) for r in history]
        self.baseline = baseline or {}
        self.writer = None
        if active:
            os.makedirs(run_dir, exist_ok=True)
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, epoch: int, values: dict) -> None:
        """TensorBoard scalars at step ``epoch + 1``; non-numbers and non-finite skipped."""
        if self.active:
            for key, val in values.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
                    self.writer.add_scalar(key, val, epoch + 1)
            self.writer.flush()

    def write_metrics(self, final: Optional[dict], extra: Optional[dict] = None) -> None:
        """metrics.json: per-epoch rows and the final values, so scripts need not parse logs."""
        if self.active:
            doc = {"run_dir": os.path.abspath(self.run_dir), "epochs": self.history,
                   "final": final}
            doc.update(extra or {})
            write_json(os.path.join(self.run_dir, "metrics.json"), doc)

    def record_epoch(self, epoch: int, row: dict, timing: str) -> None:
        """Log the epoch line, add a copy of ``row`` to the history and metrics.json, and
        write its scalars. ``row`` holds the evaluation results when the loop evaluated."""
        if not self.active:
            return
        epochs = self.cfg.train.epochs
        if "seed_accuracy" in row:
            # A collapsed embedding's seed accuracy counts ties as correct (1.0 for one
            # point): say so next to the number, not only at the end of the line.
            log.info("epoch %d/%d  loss %.4f  acc %.4f (%d / %d%s)  P@1 %.4f (raw %.4f)  R-Prec "
                     "%.4f  MAP@R %.4f%s  %.0f triplets/s  %s eval %.2fs]",
                     epoch + 1, epochs, row["loss"], row["seed_accuracy"],
                     row["correct"], row["total"],
                     ", COLLAPSED: not a success" if row["collapsed"] else "",
                     row["precision_at_1"], self.baseline["precision_at_1"],
                     row["r_precision"], row["map_at_r"],
                     "  COLLAPSED" if row["collapsed"] else "", row["triplets_per_s"], timing,
                     row["time_eval_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  %.0f triplets/s  %s]", epoch + 1, epochs,
                     row["loss"], row["triplets_per_s"], timing)
        self.history.append(dict(row))
        self.write_metrics(final=None)
        self.scalars(epoch, {f"train/{k}": row[k] for k in ("loss", "triplets_per_s", "lr")})
        self.scalars(epoch, {f"eval/{k}": v for k, v in row.items()
                             if k in ("seed_accuracy", "strict_accuracy", "precision_at_1",
                                      "r_precision", "map_at_r", "spread")})

    def save_checkpoint(self, epoch: int, net, trainer, *, steps_per_epoch: int,
                        processes: int, devices: int) -> None:
        """The checkpoint of 0-based ``epoch`` (unless ``checkpoint.keep`` is 0), with a
        copy of the history so far."""
        if self.active and self.cfg.checkpoint.keep > 0:
            meta = ckpt.CheckpointMeta(
                epoch=epoch, config=self.cfg.to_dict(), world_size=processes * devices,
                processes=processes, devices=devices, steps_per_epoch=steps_per_epoch,
                history=list(self.history))
            path = ckpt.save_checkpoint(os.path.join(self.run_dir, "checkpoints"), net, trainer,
                                        meta, self.cfg.checkpoint.keep)
            log.info("checkpoint %s", path)

    def finish(self, final: dict, net, ctx, test: Split, embeddings, extra: dict) -> dict:
        """End of run: final metrics.json, raw-pixel scalars, projector of ``embeddings``
        ((N, D) float32 of the test set), model export, and the run directory's path on
        stdout. Returns ``final`` ({} off rank 0)."""
        if not self.active:
            return {}
        cfg = self.cfg
        self.write_metrics(final=final, extra=dict(extra, raw_pixels=self.baseline))
        self.scalars(cfg.train.epochs - 1, {f"eval/raw_{k}": v for k, v in self.baseline.items()
                                            if isinstance(v, float)})
        if cfg.eval.projector:
            from .projector import export_projector
            n = cfg.eval.projector_points or len(test.labels)
            export_projector(os.path.join(self.run_dir, "tensorboard"),
                             {"origin": test.images[:n], "triplet": embeddings[:n]},
                             test.labels[:n], test.class_names, images=test.images[:n],
                             writer=self.writer)
        # The trained network as symbol + params, for `python -m dist_triplet.embed`.
        from .export import export_model
        model_dir = export_model(net, os.path.join(self.run_dir, "model"), ctx,
                                 test.images.shape[1],
                                 meta={"run_dir": os.path.abspath(self.run_dir),
                                       "epochs": cfg.train.epochs})
        log.info("exported model to %s", model_dir)
        self.close()
        log.info("run directory: %s", os.path.abspath(self.run_dir))
        print(os.path.abspath(self.run_dir), flush=True)
        return final

    def close(self) -> None:
        if self.active and self.writer is not None:
            self.writer.close()
