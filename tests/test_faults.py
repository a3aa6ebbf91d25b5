"""A rank dies mid-epoch under Horovod: real 2-process jobs, ``horovodrun -np 2 -H
localhost:2 --gloo``, on the CPU.

Rank 1 exits with status 17 (``os._exit``, as a crash), or rank 0, the checkpoint writer,
is SIGKILLed, just before step 3 of epoch 2 (tests/_fault_train.py). Then:

* horovodrun exits non-zero and does not hang: it must return within the subprocess
  timeout (Horovod's gloo launcher terminates the surviving rank when one fails);
* the last checkpoint (epoch 1's) is complete, loadable and finite, and no later one exists;
* ``checkpoint.resume=auto`` into the same ``output.dir`` completes the run, and its final
  parameters equal those of an uninterrupted 2-rank run to 1e-6.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mxnet")
pytest.importorskip("horovod.mxnet", reason="horovod built with MXNet support is needed")
if shutil.which("horovodrun") is None:
    pytest.skip("horovodrun is not on PATH (source launch/_env.sh)", allow_module_level=True)

from _ckpt_util import (FAULT_TRAIN, ROOT, load_params, max_abs_diff,  # noqa: E402
                        run_args, subprocess_env, write_dataset)
from dist_triplet import checkpoint as ckpt  # noqa: E402

TIMEOUT = 120  # seconds; a hang fails the test through subprocess.TimeoutExpired
EPOCHS = "train.epochs=3"
HVD = ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
# launch/horovod.sh's horovodrun: a failed job ends with one line, not horovodrun's traceback.
OURS = [sys.executable, os.path.join(ROOT, "launch", "_horovodrun.py")] + HVD[1:]


def horovodrun(script, data_root, out_dir, *extra, fault=None, launcher=HVD):
    """Run a 2-rank job; returns the CompletedProcess (raises TimeoutExpired on a hang)."""
    env = subprocess_env(**({"DIST_TRIPLET_FAULT": fault} if fault else {}))
    # 40 triplets per rank per epoch, batch 4: 10 steps per epoch on each rank.
    args = run_args(data_root, out_dir, EPOCHS, "train.batch_size=4",
                    "distributed.backend=horovod", *extra)
    return subprocess.run(launcher + [sys.executable, *script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    proc = horovodrun(["-m", "dist_triplet.train"], data_root, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault, code", [
    ("rank=1,epoch=2,step=3,code=17", "error: rank 1 exited with code 17; the run directory "
     "keeps its last complete checkpoint if one was written, and the same command with "
     "checkpoint.resume=auto"),
    ("rank=0,epoch=2,step=3,how=kill", "error: rank 0 exited with code 137 (killed by signal "
     "9); the run directory keeps its last complete checkpoint if one was written"),
], ids=["rank1_exits", "rank0_sigkilled"])
def test_dying_rank_stops_the_job_and_resume_completes(fault, code, data_root, uninterrupted,
                                                       tmp_path):
    """Through launch/horovod.sh's horovodrun (launch/_horovodrun.py): the job ends with one
    line naming the rank and how to resume (it was horovodrun's traceback), exit 1."""
    out = str(tmp_path / "run")
    ck_dir = os.path.join(out, "checkpoints")
    proc = horovodrun([FAULT_TRAIN], data_root, out, fault=fault, launcher=OURS)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert code in proc.stderr and "Traceback" not in proc.stderr, log[-3000:]

    # The last checkpoint is the one of epoch 1, complete and usable; nothing later.
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0]
    assert [n for n in os.listdir(ck_dir) if not n.startswith(".")] == ["epoch-0001"]
    good = os.path.join(ck_dir, "epoch-0001")
    meta = ckpt.read_meta(good).to_json()
    assert (meta["epoch"], meta["world_size"], meta["processes"], meta["steps"]) == (0, 2, 2, 10)
    params = load_params(good)
    assert all(np.isfinite(v).all() for v in params.values())
    ref_ep1 = load_params(os.path.join(uninterrupted, "checkpoints", "epoch-0001"))
    assert max_abs_diff(params, ref_ep1) <= 1e-6

    proc = horovodrun(["-m", "dist_triplet.train"], data_root, out, "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after epoch 1" in proc.stderr
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0, 1, 2]
    final = load_params(os.path.join(ck_dir, "epoch-0003"))
    assert max_abs_diff(final, load_params(
        os.path.join(uninterrupted, "checkpoints", "epoch-0003"))) <= 1e-6
    with open(os.path.join(out, "metrics.json")) as fh:
        assert [r["epoch"] for r in json.load(fh)["epochs"]] == [1, 2, 3]


def test_resume_with_another_world_size_is_refused(data_root, uninterrupted, tmp_path):
    """A 2-rank checkpoint resumed by a single process: refused, naming the world size."""
    out = str(tmp_path / "run")
    shutil.copytree(uninterrupted, out)
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "dist_triplet.train",
                           *run_args(data_root, out, EPOCHS, "train.batch_size=4",
                                     "checkpoint.resume=auto", "train.epochs=4")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert "world size was 2 there (2 process(es) x 1 device(s)), is 1 now" in proc.stderr


def test_two_ranks_refusing_a_resume_each_print_one_line(data_root, tmp_path):
    """adv1 finding: a refusal every rank raised on its own after a collective (here: a
    1-process checkpoint resumed by 2 ranks) let rank 0's Horovod shutdown catch rank 1
    still in a collective: "Horovod has been shut down" tracebacks. Rank 0 now decides
    (dist.decide_on_rank0: broadcast, barrier), so each rank prints its one error line."""
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "dist_triplet.train",
                           *run_args(data_root, out, "train.epochs=1", "train.batch_size=4",
                                     "eval.report=false")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = horovodrun(["-m", "dist_triplet.train"], data_root, out, "checkpoint.resume=auto")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    errors = [ln for ln in text.splitlines() if "error: " in ln]
    assert len(errors) == 2, text[-3000:]
    assert {ln.split("]")[0] for ln in errors} == {"[0", "[1"}, errors
    assert all("world size was 1 there" in ln for ln in errors), errors
    # horovodrun itself ends with its RuntimeError traceback (README: direct horovodrun
    # users get each rank's line and horovodrun's exit 1); the ranks' output has none.
    ranks = "\n".join(ln for ln in text.splitlines() if ln.startswith(("[0]", "[1]")))
    assert "Traceback" not in ranks and "has been shut down" not in text, ranks[-3000:]


def test_a_ranks_one_line_error_ends_the_job_with_exit_2_and_no_traceback(data_root, tmp_path):
    """A refusal after the ranks started (a 1-process checkpoint resumed by 2 ranks) under
    launch/horovod.sh's horovodrun: each rank's one "error:" line and exit 2, as without
    Horovod (it was horovodrun's 25-line RuntimeError traceback and exit 1)."""
    out = str(tmp_path / "run")
    assert subprocess.run([sys.executable, "-m", "dist_triplet.train",
                           *run_args(data_root, out, "train.epochs=1", "train.batch_size=4",
                                     "eval.report=false")], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, timeout=TIMEOUT).returncode == 0
    proc = horovodrun(["-m", "dist_triplet.train"], data_root, out, "checkpoint.resume=auto",
                      launcher=OURS)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    assert errors and all("world size was 1 there" in ln for ln in errors), errors
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr
