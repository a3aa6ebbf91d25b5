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

import fcntl
import logging
import math
import os
import time
from typing import IO, Dict, List, Optional, Sequence, Tuple

from . import checkpoint as ckpt
from .config import Config, flat_dict, resume_policies, save_config
from .data import Split
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


def requested_run_dir(cfg: Config) -> Optional[str]:
    """The run directory the config names: ``output.dir``, or, without one, the run
    directory of an explicit ``checkpoint.resume`` path (``<run>/checkpoints/epoch-NNNN``);
    None for a new generated one. Creates and checks nothing."""
    if cfg.output.dir is None and cfg.checkpoint.resume not in (None, "auto"):
        # Resuming from an explicit checkpoint continues that run's directory.
        return os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint.resume)))
    return cfg.output.dir


LOCK_FILE = ".lock"
# run directory -> (open file holding its flock, whether this process created the
# directory), for the runs of this process (rank 0).
_locks: Dict[str, Tuple[IO, bool]] = {}


def lock_run_dir(run_dir: str, created: bool = False) -> None:
    """Take the exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` for this process
    (released by :func:`release_run_dir`, or by the kernel when the process dies, so a
    killed run leaves no stale lock). Our own lock on ``run_dir`` is kept as it is.
    ``created``: this run made ``run_dir`` (release removes it again if nothing else was
    written there).

    Raises:
        ValueError: another process holds the lock (names output.dir and its pid).
        OSError: the lock file cannot be created.
    """
    key = os.path.realpath(run_dir)
    if key in _locks:
        return
    fh = open(os.path.join(run_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "unknown"
        fh.close()
        raise ValueError(f"output.dir={run_dir!r}: another run (pid {pid}) is using it; "
                         "wait for it to finish or choose another output.dir") from None
    except OSError:
        fh.close()
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _locks[key] = (fh, created)


def release_run_dir(run_dir: Optional[str] = None) -> None:
    """Release this process's lock on ``run_dir`` (all its locks when None). A directory
    this run created that holds nothing but the lock file (the run failed on bad input
    before writing anything) is removed again."""
    keys = list(_locks) if run_dir is None else [os.path.realpath(run_dir)]
    for key in keys:
        fh, created = _locks.pop(key, (None, False))
        if fh is None:
            continue
        try:
            if created and os.listdir(key) == [LOCK_FILE]:
                os.remove(os.path.join(key, LOCK_FILE))
                os.rmdir(key)
        except OSError:
            pass  # best effort: an empty run directory is harmless
        finally:
            fh.close()  # closing the file releases the flock


def resolve_run_dir(cfg: Config, backend) -> str:
    """The run directory, decided by rank 0 and broadcast (timestamps differ across ranks).
    Rank 0 creates it (a generated ``<root>/<name>-<timestamp>`` exclusively) and holds its
    lock (:func:`lock_run_dir`) for the run's life, before the model is built; a run that
    fails before writing anything removes a directory it created (:func:`release_run_dir`,
    called by ``train.main``). Rank 0's
    error (output.dir is a file, cannot be created or written, another run uses it) is
    raised on every rank as ``ValueError("output.dir=...: reason")``. Every rank must call
    it."""
    from .dist import decide_on_rank0  # here: dist imports MXNet; dist_triplet.check must not

    def decide() -> str:
        run_dir = requested_run_dir(cfg)
        named = cfg.output.root if run_dir is None else run_dir
        try:
            if run_dir is None:
                _check_dir_path(cfg.output.root)
                run_dir = _make_unique_dir(os.path.join(
                    cfg.output.root, f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
                created = True
            else:
                _check_dir_path(run_dir)
                created = not os.path.isdir(run_dir)
                os.makedirs(run_dir, exist_ok=True)
            lock_run_dir(run_dir, created)
            return run_dir
        except OSError as exc:
            key = "output.root" if requested_run_dir(cfg) is None else "output.dir"
            reason = exc.strerror or str(exc)
            raise ValueError(f"{key}={named!r}: cannot create or write the run directory: "
                             f"{reason}") from None
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
    from .dist import decide_on_rank0
    return decide_on_rank0(
        backend, lambda: find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"),
                                     cfg.to_dict()),
        "resume")


# ----------------------------------------------------------------------------- recorder

def _input_meta(test: Split) -> dict:
    """What the exported model's input is: uint8 images scaled by 1/255 (with their
    (H, W, C)), or features used as they are."""
    if test.is_image:
        return {"image_shape": list(test.image_shape)}
    return {"input_scaling": "none (features, used as they are)", "image_shape": None}


def timing_text(sample_s: float, train_s: float, wait_s: float, allreduce_s: float) -> str:
    """The timing part of the epoch log line (:class:`Recorder`), seconds of wall time;
    ``record_epoch`` closes the bracket (after ``eval``, when the epoch evaluated)."""
    return (f"[sample {sample_s:.2f}s train {train_s:.2f}s (host-wait {wait_s:.2f}s) "
            f"allreduce {allreduce_s:.2f}s")


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
    * ``triplets/s``: training throughput of the whole job (global batch x steps / train s).
    * ``sample``: drawing the epoch's triplets; ``train``: the optimizer steps (with the
      epoch's index copy); ``host-wait``: of ``train``, the time the host sat waiting for the
      device (near ``train``: device-bound; near 0: host-bound); ``allreduce``: the
      end-of-epoch loss allreduce, which also waits for the slowest rank; ``eval``: the
      evaluation on rank 0 (seconds of wall time).
    * ``COLLAPSED``: the embedding's spread is at or below ``eval.collapse_eps``; a
      collapsed embedding's seed-acc counts ties as correct, so it is not a success.
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

    def write_metrics(self, final: Optional[dict], extra: Optional[dict] = None) -> dict:
        """metrics.json: per-epoch rows and the final values, so scripts need not parse logs.
        Returns the document written ({} off rank 0)."""
        if not self.active:
            return {}
        doc = {"run_dir": os.path.abspath(self.run_dir), "epochs": self.history,
               "final": final}
        doc.update(extra or {})
        write_json(os.path.join(self.run_dir, "metrics.json"), doc)
        return doc

    def record_epoch(self, epoch: int, row: dict, timing: str) -> None:
        """Log the epoch line, add a copy of ``row`` to the history and metrics.json, and
        write its scalars. ``row`` holds the evaluation results when the loop evaluated."""
        if not self.active:
            return
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
                     "(raw %.4f)  %s%s  %s triplets/s  %s eval %.2fs]",
                     epoch + 1, epochs, row["loss"], row["seed_accuracy"],
                     row["correct"], row["total"],
                     ", COLLAPSED: not a success" if row["collapsed"] else "",
                     row["precision_at_1"], self.baseline["precision_at_1"], ranked,
                     "  COLLAPSED" if row["collapsed"] else "",
                     f"{row['triplets_per_s']:,.0f}", timing, row["time_eval_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  %s triplets/s  %s]", epoch + 1, epochs,
                     row["loss"], f"{row['triplets_per_s']:,.0f}", timing)
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
        ((N, D) float32 of the test set), model export, the report (``eval.report``), and
        the run directory's path on stdout. metrics.json is written first (the numbers are
        safe before the exports) and again at the end with ``end_of_run_s``, the seconds of
        each part (the benchmark reads them). Returns ``final`` ({} off rank 0)."""
        if not self.active:
            return {}
        cfg = self.cfg
        t_start = time.perf_counter()
        extra = dict(extra, raw_pixels=self.baseline)
        doc = self.write_metrics(final=final, extra=extra)
        self.scalars(cfg.train.epochs - 1, {f"eval/raw_{k}": v for k, v in self.baseline.items()
                                            if isinstance(v, float)})
        spent = {}
        if cfg.eval.projector:
            from .projector import LEARNED_TAG, RAW_TAG, export_projector
            t = time.perf_counter()
            n = cfg.eval.projector_points or len(test.labels)
            from .data import as_float
            # Sprites only for images (padded to squares); feature data get none.
            export_projector(os.path.join(self.run_dir, "tensorboard"),
                             {RAW_TAG: as_float(test.images[:n]), LEARNED_TAG: embeddings[:n]},
                             test.labels[:n], test.class_names,
                             images=test.images[:n] if test.is_image else None,
                             image_shape=test.image_shape)
            spent["projector_s"] = time.perf_counter() - t
        # The trained network as symbol + params, for `python -m dist_triplet.embed`.
        from .export import export_model
        t = time.perf_counter()
        model_dir = export_model(net, os.path.join(self.run_dir, "model"), ctx,
                                 test.images.shape[1],
                                 meta={"run_dir": os.path.abspath(self.run_dir),
                                       "epochs": cfg.train.epochs,
                                       **_input_meta(test)})
        spent["export_s"] = time.perf_counter() - t
        if cfg.eval.report:
            t = time.perf_counter()
            self.write_report(doc, test, embeddings)
            spent["report_s"] = time.perf_counter() - t
        self.close()
        spent["total_s"] = time.perf_counter() - t_start
        self.write_metrics(final=final, extra=dict(extra, end_of_run_s=spent))
        log.info("exported model to %s; end of run %.2f s (%s)", model_dir, spent["total_s"],
                 ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in spent.items() if k != "total_s"))
        log.info("run directory: %s", os.path.abspath(self.run_dir))
        print(os.path.abspath(self.run_dir), flush=True)
        return final

    def write_report(self, doc: dict, test: Split, embeddings) -> None:
        """RUN/report/ (dist_triplet.report.write_report) from metrics.json's document, the
        test split and its (N, D) embeddings. A failure is logged, not raised: the run's
        results are already written, and a picture must not turn them into an error."""
        if not self.active:
            return
        from .report import write_report
        t0, c0 = time.perf_counter(), time.process_time()
        shape = getattr(test, "image_shape", None)  # issue 10's Split carries it
        if shape is None and not hasattr(test, "image_shape"):
            side = int(round(math.sqrt(test.images.shape[1])))
            shape = (side, side) if side * side == test.images.shape[1] else None
        try:
            path = write_report(self.run_dir, doc, test.images, embeddings, test.labels,
                                test.class_names, shape)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("report not written: %s", exc)
            return
        # CPU seconds too: on a shared machine the wall time mostly measures the others.
        log.info("report %s (%.2f s, %.2f s CPU)", os.path.join(path, "report.html"),
                 time.perf_counter() - t0, time.process_time() - c0)

    def close(self) -> None:
        if self.active and self.writer is not None:
            self.writer.close()
