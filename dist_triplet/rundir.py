"""The run directory: where a run writes, and which checkpoint it resumes from.

* ``requested_run_dir`` / ``make_run_dir``: ``output.dir`` or a generated
  ``<root>/<name>-<timestamp>``, created and locked by rank 0 (training shares the
  decision with ``dist.decide_on_rank0``; the pre-flight check only checks the path).
* ``find_resume`` / ``resume_for``: the checkpoint to continue from, and the refusals
  that keep one run from overwriting another.

What a run writes there is recorder.py's (metrics, scalars, checkpoints) and
outputs.py's (model export, projector, report). No MXNet, no collective.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import IO, Dict, Optional, Tuple

from . import checkpoint as ckpt
from .config import Config, flat_dict, resume_policies

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- run directory

def check_run_config(path: Optional[str], cfg: Config, overrides=()) -> None:
    """ValueError when ``--config`` is a run's own config.yaml (beside its ``checkpoints/``)
    whose ``output.dir`` names another directory and no override sets one: the run was
    copied or moved, and it would continue at its old place (or start afresh there)."""
    home = os.path.dirname(os.path.abspath(path or ""))
    if (path is None or os.path.basename(path) != "config.yaml" or cfg.output.dir is None
            or not os.path.isdir(os.path.join(home, "checkpoints"))
            or any(o.strip().startswith("output.dir=") for o in overrides)
            or os.path.realpath(cfg.output.dir) == os.path.realpath(home)):
        return
    raise ValueError(f"{path} is the config of the run in {home}, but its output.dir is "
                     f"{cfg.output.dir} (the run was copied or moved): pass output.dir={home} "
                     "to continue it here")


def check_dir_path(run_dir: str) -> None:
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
        _try_lock(fh, run_dir)
    except (OSError, ValueError):
        fh.close()
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _locks[key] = (fh, created)


def _try_lock(fh: IO, run_dir: str) -> None:
    """flock ``fh`` (``run_dir``'s lock file) exclusively without waiting; ValueError
    naming output.dir and the holder's pid when another process holds it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise ValueError(f"output.dir={run_dir!r}: another run (pid "
                         f"{fh.read().strip() or 'unknown'}) is using it; wait for it to "
                         "finish or choose another output.dir") from None


def check_unlocked(run_dir: str) -> None:
    """The pre-flight form of :func:`lock_run_dir`: the same ValueError when another
    process holds ``run_dir``'s lock; takes no lock (closing the file releases a probe's)
    and writes nothing."""
    if os.path.isfile(path := os.path.join(run_dir, LOCK_FILE)):
        with open(path) as fh:
            _try_lock(fh, run_dir)


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


def make_run_dir(cfg: Config) -> str:
    """Create the run directory and take its lock; rank 0 calls it, and shares the result
    (``dist.decide_on_rank0``: timestamps differ across ranks).

    The directory is ``output.dir`` (or the run directory of an explicit
    ``checkpoint.resume``), or a new ``<root>/<name>-<timestamp>`` made exclusively; its
    lock (:func:`lock_run_dir`) is held for the run's life. A run that fails before writing
    anything removes a directory it created (:func:`release_run_dir`). Calls no collective.

    Raises:
        ValueError: ``output.dir=...: reason`` (a file is in the way, the directory cannot
            be created or written, another run uses it).
    """
    run_dir = requested_run_dir(cfg)
    named = cfg.output.root if run_dir is None else run_dir
    try:
        if run_dir is None:
            check_dir_path(cfg.output.root)
            run_dir = _make_unique_dir(os.path.join(
                cfg.output.root, f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
            created = True
        else:
            check_dir_path(run_dir)
            created = not os.path.isdir(run_dir)
            os.makedirs(run_dir, exist_ok=True)
        lock_run_dir(run_dir, created)
        return run_dir
    except OSError as exc:
        key = "output.root" if requested_run_dir(cfg) is None else "output.dir"
        reason = exc.strerror or str(exc)
        raise ValueError(f"{key}={named!r}: cannot create or write the run directory: "
                         f"{reason}") from None


# ----------------------------------------------------------------------------- resume

def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


# Files that mark a directory as some run's directory (recorder.Recorder writes them first).
RUN_FILES = ("config.yaml", "metrics.json")


def find_resume(resume: Optional[str], ckpt_dir: str,
                config: Optional[dict] = None) -> Optional[str]:
    """The checkpoint to resume from, for ``checkpoint.resume`` and the run's ``ckpt_dir``.

    ``None`` (start fresh) refuses a run directory (``dirname(ckpt_dir)``) that already
    holds a run: checkpoints (the new run's saves and the last-K retention would mix with
    the old run's: an old epoch-0009 outlives a new epoch-0002), or a ``config.yaml`` /
    ``metrics.json`` that the new run would overwrite. ``'auto'`` gives the newest complete
    checkpoint, or None (a fresh start, with a warning when the directory holds a run's
    files) unless the directory holds another run's ``config.yaml`` whose "fixed" keys
    (config.py's resume policies) differ from ``config``. A path is returned as given
    (``read_meta`` checks it), unless the run directory holds a run (checkpoints, or its
    ``RUN_FILES``) and the path is not one of its checkpoints: continuing there would
    replace that run's files and prune its later epochs. Rank 0 decides; it calls no
    collective.

    Raises:
        ValueError: any refusal above (names the directory, the file or key, and the ways
            out).
    """
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    latest = ckpt.latest_checkpoint(ckpt_dir)
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if resume == "auto":
        if latest is None and config is not None:
            _check_same_run(run_dir, config)
            if present:         # e.g. checkpoint.keep=0, or checkpoints/ deleted
                log.warning("checkpoint.resume=auto: output.dir %r holds a run (%s) but no "
                            "checkpoint: starting it again from epoch 1; its files will be "
                            "replaced", run_dir, ", ".join(present))
        return latest
    if resume:
        held = f"checkpoints up to {latest}" if latest else ", ".join(present)
        if held and not _inside(resume, ckpt_dir):
            raise ValueError(
                f"checkpoint.resume={resume!r} is not a checkpoint of output.dir {run_dir!r}, "
                f"which holds another run ({held}); continuing there would replace it. "
                "Choose another output.dir (or output.dir=null to continue in the "
                "checkpoint's own run directory)")
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


def resume_for(cfg: Config, run_dir: str) -> Optional[str]:
    """:func:`find_resume` for ``cfg`` in ``run_dir`` (its ``checkpoints/``); rank 0
    decides (``dist.decide_on_rank0``), as it alone writes checkpoints."""
    return find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"),
                       cfg.to_dict())
