"""Two hosts under horovodrun on one machine: ranks started over ssh, and a host that dies.

``horovodrun --gloo -np 4 -H localhost:2,127.0.0.2:2``: ranks 0-1 start directly on host A
(localhost), ranks 2-3 on host B through ``ssh 127.0.0.2`` to an sshd the test starts for
itself (tests/_sshd.py: own config, keys and port, stopped afterwards; nothing in /etc or
~/.ssh is touched). So ranks 2-3 get only what horovodrun carries to a remote host (its
``env VAR=...`` command line and ``cd``), rank != local rank, and cross rank 1, as on a real
second machine. Every rank runs tests/multihost_worker.py, which trains through
``dist_triplet.loop.train`` and reports what it saw.

Asserted:

* placement: (rank, local rank, cross rank, host) is (0,0,0,A) (1,1,0,A) (2,0,1,B) (3,1,1,B)
  as Horovod and the launcher report it; local ranks restart at 0 on host B; only ranks 2-3
  came through ssh, to 127.0.0.2; each rank's context, and with 2 GPUs per host
  ``gpu(local rank)``, not ``gpu(rank)``; host B's ranks run the same interpreter, the
  same checkout of dist_triplet, in the same directory, with the same OMP_NUM_THREADS;
* all 4 ranks end with bit-identical parameters;
* rank 0 alone writes under the run directory (an audit hook in every rank records every
  mkdir, open for writing, rename and remove there);
* a host dies: host B's two ranks are SIGKILLed mid-epoch (epoch 2, before step 3, while
  host A's ranks wait in that step's allreduce). horovodrun exits non-zero within
  KILL_TIMEOUT and no rank is left running; the last checkpoint (epoch 1) is complete,
  finite and equal to the uninterrupted run's; ``checkpoint.resume=auto`` with the same
  command completes, every rank (host B's too) reads the checkpoint it resumes from, and
  the final parameters equal the uninterrupted run's to 1e-6.

Data: tests/_ckpt_util.py's 84-row set (4 x 4 pixels): 20 triplets per rank per epoch,
batch 4, so 5 steps per epoch; 3 epochs. One OpenMP thread per rank (4 ranks, 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _ckpt_util import load_params, max_abs_diff, run_args, write_dataset
from _hvd import ROOT, child_env, require_horovod
import _sshd

HOSTS = "localhost:2,127.0.0.2:2"
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
EPOCHS, STEPS = 3, 5          # 5 steps per epoch: 84 rows / 4 ranks -> 20 triplets, batch 4
RUN_TIMEOUT = 180             # seconds; a hang fails through subprocess.TimeoutExpired
KILL_TIMEOUT = 60             # seconds horovodrun may take to stop after host B dies
TOL = 1e-6


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    require_horovod()
    reason = _sshd.skip_reason()
    if reason:
        pytest.skip(reason)
    with _sshd.loopback_sshd(str(tmp_path_factory.mktemp("sshd"))) as host:
        yield host


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def command(host, data_root, report_dir, out_dir, *extra):
    """The job: what a user runs on host A, plus horovodrun's ssh options for host B."""
    return ["horovodrun", "--gloo", "-np", "4", "-H", HOSTS, *host.horovodrun_args(),
            "--network-interface", "lo", sys.executable, WORKER, str(report_dir),
            *run_args(data_root, out_dir, f"train.epochs={EPOCHS}", "train.batch_size=4",
                      "eval.report=false", "distributed.backend=horovod", *extra)]


def environment(host, **extra):
    env = child_env(PATH=host.path, **extra)
    for var in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY"):  # only host B's ranks may have them
        env.pop(var, None)
    return env


def start(host, data_root, report_dir, out_dir, *extra, pause=None):
    """Start a 4-rank two-host job; returns (Popen, path of its combined log)."""
    os.makedirs(report_dir, exist_ok=True)
    log = os.path.join(report_dir, "horovodrun.log")
    env = environment(host, **({"MULTIHOST_PAUSE": pause} if pause else {}))
    with open(log, "w") as fh:
        proc = subprocess.Popen(command(host, data_root, report_dir, str(out_dir), *extra),
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return proc, log


def kill_job(proc, log):
    """SIGKILL horovodrun and every rank that wrote its pid beside ``log`` (ours only)."""
    report_dir = os.path.dirname(log)
    for name in os.listdir(report_dir):
        if name.startswith("pid_rank"):
            try:
                os.kill(int(open(os.path.join(report_dir, name)).read().split()[0]),
                        signal.SIGKILL)
            except (ProcessLookupError, ValueError, IndexError):
                pass
    proc.kill()
    proc.wait()


def finish(proc, log, timeout=RUN_TIMEOUT):
    """Wait for the job; returns (exit status, its log). Kills it on a hang and fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc, log)
        pytest.fail(f"horovodrun still running after {timeout} s:\n{open(log).read()[-3000:]}")
    return proc.returncode, open(log).read()


def reports(report_dir):
    out = []
    for r in range(4):
        with open(os.path.join(report_dir, f"report_rank{r}.json")) as fh:
            out.append(json.load(fh))
    return out


def rank_params(report_dir):
    return [dict(np.load(os.path.join(report_dir, f"params_rank{r}.npz"))) for r in range(4)]


@pytest.fixture(scope="module")
def uninterrupted(ssh_host, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    proc, log = start(ssh_host, data_root, tmp / "report", tmp / "run")
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    return tmp / "report", tmp / "run"


def test_placement_over_two_hosts(uninterrupted, ssh_host):
    rep = reports(uninterrupted[0])
    host_of = {0: "localhost", 1: _sshd.HOST_B}
    for r, expect in enumerate([(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]):
        rank, local, cross = expect
        h = rep[r]["hvd"]
        assert (rep[r]["rank"], rep[r]["local_rank"]) == (rank, local), rep[r]
        assert (rep[r]["num_processes"], rep[r]["num_workers"]) == (4, 4), rep[r]
        assert (h["rank"], h["local_rank"], h["cross_rank"]) == expect, h
        assert (h["size"], h["local_size"], h["cross_size"]) == (4, 2, 2), h
        assert rep[r]["env"]["HOROVOD_CROSS_RANK"] == str(cross)
        assert rep[r]["env"]["HOROVOD_HOSTNAME"] == host_of[cross]
        ssh = rep[r]["env"]["SSH_CONNECTION"]
        if cross == 0:
            assert ssh is None, (r, ssh)   # started directly by horovodrun
        else:                              # started by our sshd: server address and port
            assert ssh is not None and ssh.split()[2:] == [_sshd.HOST_B, str(ssh_host.port)]
        assert rep[r]["context"] == "cpu(0)"   # CPU-only build: every rank on the CPU
        assert rep[r]["context_with_2_gpus"] == f"gpu({local})"
    assert len({r["pid"] for r in rep}) == 4
    assert len({r["run_dir"] for r in rep}) == 1
    # What the ssh command line must carry to host B: this interpreter (the venv), this
    # checkout (PYTHONPATH; the worker does not set sys.path, so without it a rank would
    # import the venv's installed copy), the working directory and the thread count.
    for r in rep:
        assert r["python"] == sys.executable, r
        assert r["package"] == os.path.join(ROOT, "dist_triplet"), r
        assert r["cwd"] == ROOT and r["env"]["OMP_NUM_THREADS"] == "1", r


def test_ranks_end_with_identical_parameters(uninterrupted):
    params = rank_params(uninterrupted[0])
    assert params[0] and all(sorted(p) == sorted(params[0]) for p in params)
    for r in (1, 2, 3):
        for name in params[0]:
            assert np.array_equal(params[r][name], params[0][name]), (r, name)
    # ... and they are the ones rank 0 checkpointed last.
    last = load_params(os.path.join(uninterrupted[1], "checkpoints", f"epoch-{EPOCHS:04d}"))
    assert max_abs_diff(last, {k: params[0][k] for k in last}) == 0.0


def test_only_rank0_writes_the_run_directory(uninterrupted):
    rep = reports(uninterrupted[0])
    run_dir = rep[0]["run_dir"]
    written = {os.path.relpath(p, run_dir) for p in rep[0]["writes"]}
    for must in ("config.yaml", "metrics.json", "checkpoints/epoch-0001",
                 f"checkpoints/epoch-{EPOCHS:04d}"):
        assert must in written, sorted(written)
    for r in (1, 2, 3):
        assert rep[r]["writes"] == [], (r, rep[r]["writes"][:5])
        assert rep[r]["reads"] == [], (r, rep[r]["reads"][:5])  # a fresh run reads nothing


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(paths, proc, log, timeout=RUN_TIMEOUT):
    """Wait until every path exists; fail if the job ends first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None:
            pytest.fail(f"horovodrun exited ({proc.returncode}) before {paths} existed:\n"
                        f"{open(log).read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_job(proc, log)
            pytest.fail(f"{paths} did not appear in {timeout} s:\n{open(log).read()[-3000:]}")
        time.sleep(0.05)


def test_host_dies_mid_epoch_then_resume_matches(uninterrupted, ssh_host, data_root, tmp_path):
    from dist_triplet import checkpoint as ckpt
    report, out = tmp_path / "report", tmp_path / "run"
    ck_dir = os.path.join(out, "checkpoints")
    proc, log = start(ssh_host, data_root, report, out, pause="cross_rank=1,epoch=2,step=3")
    _wait_for([os.path.join(report, f"paused_rank{r}") for r in (2, 3)], proc, log)
    pids = {}
    for r in range(4):
        pid, cross = map(int, open(os.path.join(report, f"pid_rank{r}")).read().split())
        pids[r] = pid
        assert cross == (r >= 2)
    # Host A's ranks are in epoch 2, which they cannot finish without host B's step-3
    # gradients: wait for rank 0's checkpoint of epoch 1 (written after the epoch's
    # allreduce, so possibly after host B paused; MXNet runs steps asynchronously) ...
    _wait_for([os.path.join(ck_dir, "epoch-0001", "meta.json")], proc, log)
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0]
    for r in (2, 3):                                     # ... when host B dies
        os.kill(pids[r], signal.SIGKILL)
    code, text = finish(proc, log, timeout=KILL_TIMEOUT)
    assert code != 0, text[-3000:]
    # ssh reports a remote command killed by a signal as status 255.
    for r in (2, 3):
        assert f"Process {r} exit with status code 255" in text, text[-3000:]
    assert "Process 0 exit with status code 0" not in text, text[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [r for r, p in pids.items() if _alive(p)], "ranks left running"

    # The last checkpoint is epoch 1's, complete, finite, equal to the uninterrupted run's.
    assert [n for n in os.listdir(ck_dir) if not n.startswith(".")] == ["epoch-0001"]
    good = os.path.join(ck_dir, "epoch-0001")
    meta = ckpt.read_meta(good)
    assert (meta.epoch, meta.world_size, meta.processes, meta.steps_per_epoch) == (0, 4, 4, STEPS)
    params = load_params(good)
    assert all(np.isfinite(v).all() for v in params.values())
    ref_dir = os.path.join(uninterrupted[1], "checkpoints")
    assert max_abs_diff(params, load_params(os.path.join(ref_dir, "epoch-0001"))) <= TOL

    # The same command with checkpoint.resume=auto completes and matches.
    resumed = tmp_path / "report_resumed"
    proc, log = start(ssh_host, data_root, resumed, out, "checkpoint.resume=auto")
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    assert "resuming after epoch 1" in text
    rep = reports(resumed)
    for r in range(4):  # every rank, on both hosts, read the checkpoint it resumed from
        for name in ("meta.json", "trainer.states"):
            assert os.path.join(good, name) in rep[r]["reads"], (r, name, rep[r]["reads"])
        if r:
            assert rep[r]["writes"] == [], (r, rep[r]["writes"][:5])
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0, 1, 2]
    final = rank_params(resumed)
    ref = rank_params(uninterrupted[0])
    for r in range(4):
        assert max_abs_diff(final[r], ref[r]) <= TOL, r
    with open(os.path.join(out, "metrics.json")) as fh:
        assert [row["epoch"] for row in json.load(fh)["epochs"]] == [1, 2, 3]
