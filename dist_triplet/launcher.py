"""What the launcher (``horovodrun``, ``mpirun``) tells a process through its environment,
read without MXNet or Horovod: how many processes it started, this one's rank, how many
share its host, and from that the backend ``distributed.backend: auto`` means.

horovodrun sets ``HOROVOD_RANK`` / ``HOROVOD_SIZE`` / ``HOROVOD_LOCAL_SIZE`` on every
rank; Open MPI's mpirun ``OMPI_COMM_WORLD_*``; MPICH / Intel MPI / Slurm's PMI
``PMI_RANK`` / ``PMI_SIZE``. Horovod itself reads the same variables at ``hvd.init()``.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

__all__ = ["launcher_size", "launcher_rank", "local_size", "choose_backend", "BACKENDS"]

#: The values of ``distributed.backend``; ``auto`` is resolved by :func:`choose_backend`.
BACKENDS = ("auto", "local", "horovod", "kvstore")

_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def _first_int(names, environ: Optional[Mapping[str, str]], default: int, least: int) -> int:
    environ = os.environ if environ is None else environ
    for var in names:
        try:
            return max(least, int(environ[var]))
        except (KeyError, ValueError):
            continue
    return default


def launcher_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """Processes the launcher started (``HOROVOD_SIZE``, ``OMPI_COMM_WORLD_SIZE`` or
    ``PMI_SIZE``); 1 when no launcher started this process."""
    return _first_int(_SIZE_VARS, environ, 1, 1)


def launcher_rank(environ: Optional[Mapping[str, str]] = None) -> int:
    """This process's rank among them (``HOROVOD_RANK``, ...); 0 without a launcher."""
    return _first_int(_RANK_VARS, environ, 0, 0)


def local_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """Processes of this job on this host (``HOROVOD_LOCAL_SIZE``, ...); 1 without."""
    return _first_int(_LOCAL_SIZE_VARS, environ, 1, 1)


def choose_backend(requested: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The backend to run: ``requested`` (``distributed.backend``), with ``auto`` meaning
    ``horovod`` when a launcher started several processes and ``local`` otherwise.

    Raises:
        ValueError: ``local`` or ``kvstore`` asked for in a process that horovodrun or
            mpirun started as one of several (each would train alone and write the same
            run directory); the message names the key and the way out.
    """
    n = launcher_size(environ)
    if requested == "auto":
        return "horovod" if n > 1 else "local"
    if requested in ("local", "kvstore") and n > 1:
        raise ValueError(f"distributed.backend={requested} but this process is one of {n} "
                         "started by horovodrun/mpirun: each would train alone and write the "
                         "same run directory; remove the key (distributed.backend=auto) or add "
                         "distributed.backend=horovod")
    return requested
