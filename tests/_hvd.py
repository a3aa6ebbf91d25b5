"""Shared by the tests that start real processes: ``horovodrun --gloo`` jobs and CLIs.

One place says when Horovod is usable (else the test is skipped with the reason) and what
environment a child process gets: the project importable and one OpenMP thread, because
the CI machine has 2 cores and the jobs run 2 ranks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOROVODRUN_2 = ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]


def require_horovod() -> None:
    """Skip the calling test unless horovodrun is on PATH and horovod.mxnet imports."""
    if shutil.which("horovodrun") is None:
        pytest.skip("horovodrun is not on PATH (build Horovod with launch/setup.sh)")
    try:
        import horovod.mxnet  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"horovod.mxnet does not import: {exc}")


def child_env(**extra) -> dict:
    """Environment for a child process: one OpenMP thread, the project importable, no
    inherited fault-injection spec unless given in ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("DIST_TRIPLET_FAULT", None)
    env.update(extra)
    return env


def run_two_rank_worker(script: str, out_dir) -> list:
    """Run ``tests/<script> OUT_DIR`` as a 2-rank ``horovodrun --gloo`` job (skipping when
    Horovod is unusable) and return each rank's ``OUT_DIR/rank<r>.npz``, in rank order.
    Fails the test with the job's output when it exits non-zero."""
    import numpy as np
    require_horovod()
    proc = subprocess.run(
        HOROVODRUN_2 + [sys.executable, os.path.join(ROOT, "tests", script), str(out_dir)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [np.load(os.path.join(str(out_dir), f"rank{r}.npz")) for r in range(2)]


def store_steps(arrays: dict, prefix: str, per_step) -> None:
    """``arrays[f"{prefix}{step}:{name}"] = value`` for every ``{name: value}`` of
    ``per_step`` (one mapping per step): how the 2-rank workers save a run's parameters
    into their npz, and how the tests find them again."""
    for step, values in enumerate(per_step):
        for name, value in values.items():
            arrays[f"{prefix}{step}:{name}"] = value
