"""launch/horovod.sh and launch/kvstore.sh refuse a bad first argument (NP, DEVICES) with
their one usage line and exit 2, before anything starts (adv1 finding: ``horovod.sh 0``
divided by zero in _env.sh's threads_per_proc and exited 0 having trained nothing;
``abc``, ``-1`` and ``--config x.yaml`` gave unbound-variable messages or tracebacks)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from _hvd import ROOT, child_env

LAUNCH = os.path.join(ROOT, "launch")


def run_script(name, *args):
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    # No horovodrun or python must be reached: a PATH without them makes sure the script
    # stops on its own check (otherwise the run would fail later for another reason).
    env = child_env(DIST_TRIPLET_VENV="/nonexistent", PATH="/usr/bin:/bin")
    return subprocess.run(["bash", os.path.join(LAUNCH, name), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def assert_usage(proc, script):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"usage: launch/{script} "), proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args", [[], ["0"], ["0", "--", "train.epochs=1"], ["abc"], ["-1"],
                                  ["1.5"], ["--config", "x.yaml"], ["", "--"], ["2x"],
                                  ["18446744073709551617"], ["1234567"]])   # would wrap round
def test_horovod_sh_bad_np_is_usage_and_exit_2(args):
    assert_usage(run_script("horovod.sh", *args), "horovod.sh")


@pytest.mark.parametrize("args", [[], ["cpu:0"], ["cpu:"], ["cpu:-1"], ["gpu"],
                                  ["--config", "x.yaml"], ["0,,1"], [""]])
def test_kvstore_sh_bad_devices_is_usage_and_exit_2(args):
    assert_usage(run_script("kvstore.sh", *args), "kvstore.sh")


@pytest.mark.parametrize("hosts", ["train.epochs=1", "localhost", "localhost:0", "localhost:x",
                                   "localhost:2,", ",localhost:2", "a:1,,b:1", "a:1,b",
                                   "host one:2", "a:-1"])
def test_horovod_sh_bad_hosts_is_usage_and_exit_2(hosts):
    """``horovod.sh 2 train.epochs=1`` (the ``--`` forgotten) took the override as HOSTS and
    horovodrun died later with a traceback; now every bad HOSTS is the usage line."""
    proc = run_script("horovod.sh", "2", hosts, "--", "train.epochs=1")
    assert_usage(proc, "horovod.sh")
    assert f"got '{hosts}'" in proc.stderr
    assert ("did you forget --?" in proc.stderr) == ("=" in hosts)


def test_horovod_sh_forgotten_double_dash_hints():
    proc = run_script("horovod.sh", "2", "train.epochs=1")
    assert_usage(proc, "horovod.sh")
    assert "did you forget --?" in proc.stderr


@pytest.mark.parametrize("hosts", ["localhost:2", "host1:4,host2:4", "127.0.0.2:1,h-3.x:02"])
def test_horovod_sh_good_hosts_get_past_the_check(hosts):
    proc = run_script("horovod.sh", "2", hosts, "--", "train.epochs=1")
    assert "usage:" not in proc.stderr, proc.stderr


def test_horovod_sh_good_np_gets_past_the_check():
    """NP=2 passes the check: the script goes on to the pre-flight (which fails here only
    because python is not on this test's PATH), so the refusal above is the NP check's."""
    proc = run_script("horovod.sh", "2", "--", "train.epochs=1")
    assert "usage:" not in proc.stderr


# --- launch/run.sh: the main job's ranks and threads, chosen from the host (issue 18)

def env_fn(call: str, path: str = "/usr/bin:/bin") -> str:
    """stdout of ``source launch/_env.sh; CALL`` in bash."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    proc = subprocess.run(["bash", "-c", f"source {LAUNCH}/_env.sh; {call}"],
                          env=child_env(DIST_TRIPLET_VENV="/nonexistent", PATH=path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("gpus, sockets, cores, ranks, why", [
    (0, 1, 2, 1, "CPU host, 1 socket(s), 2 core(s): one rank per socket"),   # this machine
    (0, 2, 16, 2, "CPU host, 2 socket(s), 16 core(s): one rank per socket"),
    (4, 1, 2, 4, "4 GPU(s): one rank per GPU"),                              # the design card
    (1, 2, 16, 1, "1 GPU(s): one rank per GPU"),
])
def test_main_job_ranks_one_per_gpu_else_one_per_socket(gpus, sockets, cores, ranks, why):
    out = env_fn(f"main_job_ranks {gpus} {sockets} {cores}")
    assert out.split(" ", 1)[0] == str(ranks) and why in out, out


def fake_bin(tmp_path, lscpu_out=None):
    """A directory with an ``lscpu`` printing ``lscpu_out`` (None: one that fails)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    body = f"cat <<'X'\n{lscpu_out}\nX" if lscpu_out is not None else "exit 1"
    (d / "lscpu").write_text(f"#!/bin/bash\n{body}\n")
    (d / "lscpu").chmod(0o755)
    return d


@pytest.mark.parametrize("lscpu_out, sockets", [
    ("Architecture: x86_64\nCore(s) per socket:  8\nSocket(s):           2\nNUMA node(s): 2", 2),
    ("Socket(s):  1", 1), ("Socket(s):           -", 1), ("Architecture: aarch64", 1), (None, 1)])
def test_host_sockets_reads_lscpu(tmp_path, lscpu_out, sockets):
    path = f"{fake_bin(tmp_path, lscpu_out)}:/usr/bin:/bin"
    assert env_fn("host_sockets", path) == str(sockets)


def test_host_gpus_is_0_without_nvidia_devices_and_without_mxnet():
    """No /dev/nvidia<N>: no GPU, answered without importing MXNet (no python on PATH)."""
    import glob
    if glob.glob("/dev/nvidia[0-9]*"):
        pytest.skip("this host has NVIDIA devices")
    assert env_fn("host_gpus") == "0"


FAKE_PYTHON = """#!/bin/bash
# --print-config is run.sh's own question: the real one answers. Anything else is recorded.
case " $* " in *" --print-config "*) exec {real} "$@" ;; esac
echo "OMP=$OMP_NUM_THREADS $*" >> {log}
"""


def run_main_job(tmp_path, args=(), sockets=1, np_=None):
    """launch/run.sh ARGS with a fake venv (its python records every command but
    ``--print-config``) and an lscpu saying ``sockets``: (process, recorded commands)."""
    import sys
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed (launch/setup.sh would install it)")
    venv = tmp_path / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    (venv / "bin" / "python").write_text(FAKE_PYTHON.format(real=sys.executable, log=log))
    (venv / "bin" / "python").chmod(0o755)
    shutil.copy(fake_bin(tmp_path, f"Socket(s): {sockets}") / "lscpu", venv / "bin" / "lscpu")
    key = subprocess.run(["bash", "-c", f"cat {ROOT}/setup.py | cksum"], capture_output=True,
                         text=True, check=True).stdout   # setup.sh's venv_key: no packages
    (venv / ".dist_triplet_setup_ok").write_text(key)
    env = child_env(DIST_TRIPLET_VENV=str(venv))
    env.pop("OMP_NUM_THREADS")
    env.pop("NP", None)
    if np_ is not None:
        env["NP"] = str(np_)
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "run.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines()


def chose_line(proc):
    lines = [x for x in proc.stderr.splitlines() if x.startswith("[run.sh]")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_run_sh_one_socket_is_one_local_process_with_the_recipes_global_batch(tmp_path):
    proc, calls = run_main_job(tmp_path, ["train.epochs=1"])
    assert proc.returncode == 0, proc.stderr
    cores = os.cpu_count()
    assert f"[run.sh] 1 process(es) x {cores} thread(s) (CPU host, 1 socket(s)" in chose_line(proc)
    assert "global batch 1024 = 1 x 1024 (the recipe: 4 workers x 256)" in chose_line(proc)
    assert calls == [f"OMP={cores} -m dist_triplet.train --config {LAUNCH}/../configs/"
                     "fashion_mnist.yaml train.epochs=1 train.batch_size=1024 "
                     "distributed.backend=local"]


def test_run_sh_refuses_a_backend_it_would_override(tmp_path):
    """Second adversarial trial: run.sh appended distributed.backend=local after the user's
    distributed.backend=kvstore, which was dropped silently."""
    proc, calls = run_main_job(tmp_path, ["distributed.backend=kvstore"])
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == (
        "launch/run.sh: the main job's backend follows the host (its [run.sh] line says "
        "which); for distributed.backend=kvstore use launch/kvstore.sh, launch/horovod.sh "
        "or launch/debug.sh")


def test_run_sh_keeps_the_users_per_worker_batch_as_the_recipes(tmp_path):
    """train.batch_size given: the recipe is 4 workers of it; one process takes all four."""
    proc, calls = run_main_job(tmp_path, ["train.batch_size=64"])
    assert proc.returncode == 0, proc.stderr
    assert "global batch 256 = 1 x 256 (the recipe: 4 workers x 64)" in chose_line(proc)
    assert calls[0].endswith("train.batch_size=64 train.batch_size=256 distributed.backend=local")


@pytest.mark.parametrize("sockets, per, text", [(2, 512, "global batch 1024 = 2 x 512"),
                                                (3, 341, "global batch 1023 = 3 x 341")])
def test_run_sh_several_sockets_are_horovod_ranks_of_the_same_global_batch(tmp_path, sockets,
                                                                            per, text):
    proc, calls = run_main_job(tmp_path, sockets=sockets)
    assert proc.returncode == 0, proc.stderr
    assert f"[run.sh] {sockets} process(es)" in chose_line(proc) and text in chose_line(proc)
    assert f"[horovod.sh] {sockets} rank(s)" in proc.stderr
    check, run = calls
    assert check.split()[1:5] == ["-m", "dist_triplet.check", "--processes", str(sockets)]
    assert check.endswith(f"train.batch_size={per} distributed.backend=horovod")
    assert f"_horovodrun.py --gloo -np {sockets} " in run
    assert run.endswith(f"train.batch_size={per} distributed.backend=horovod")


def test_run_sh_np_is_todays_job_exactly(tmp_path):
    """NP=4: the design card's 4 ranks of train.batch_size each; run.sh adds no argument
    but says, as without NP, what was chosen and why (before: only the horovod.sh line)."""
    proc, calls = run_main_job(tmp_path, ["train.epochs=2"], np_=4)
    assert proc.returncode == 0, proc.stderr
    assert chose_line(proc) == ("[run.sh] 4 Horovod rank(s) (NP=4 given); global batch 1024 "
                                "= 4 x 256 (train.batch_size per rank, not rescaled)")
    assert "[horovod.sh] 4 rank(s)" in proc.stderr
    assert calls[1].endswith(f"-np 4 -H localhost:4 python -m dist_triplet.train --config "
                             f"{LAUNCH}/../configs/fashion_mnist.yaml train.epochs=2 "
                             "distributed.backend=horovod")


def test_run_sh_np_says_the_batch_it_runs(tmp_path):
    """NP=2 with the user's per-rank batch: 2 ranks of 64, global batch 128."""
    proc, calls = run_main_job(tmp_path, ["train.batch_size=64"], np_=2)
    assert proc.returncode == 0, proc.stderr
    assert chose_line(proc) == ("[run.sh] 2 Horovod rank(s) (NP=2 given); global batch 128 "
                                "= 2 x 64 (train.batch_size per rank, not rescaled)")
    assert calls[1].endswith("train.batch_size=64 distributed.backend=horovod")


@pytest.mark.parametrize("np_", ["0", "abc", "18446744073709551617"])
def test_run_sh_bad_np_is_horovod_sh_usage_alone(tmp_path, np_):
    """A bad NP gets horovod.sh's one usage line, exit 2, and no [run.sh] line before it."""
    proc, calls = run_main_job(tmp_path, np_=np_)
    assert proc.returncode == 2 and calls == []
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage: launch/horovod.sh "), proc.stderr


def test_run_sh_bad_override_is_one_line_and_exit_2(tmp_path):
    proc, calls = run_main_job(tmp_path, ["train.epochs=two"])
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: command line: train.epochs must be an integer, got 'two'"


@pytest.mark.parametrize("flag", ["--conf", "--con=configs/debug.yaml"])
def test_run_sh_abbreviated_config_is_not_read_as_config(tmp_path, flag):
    """Adversarial trial: argparse took --conf for --config, so a user's config slipped past
    run.sh's refusal and had its batch rescaled as the recipe's. Now it is an unknown
    argument: training's one usage error, exit 2, nothing run."""
    args = [flag] + ([] if "=" in flag else ["configs/debug.yaml"])
    proc, calls = run_main_job(tmp_path, ["train.epochs=1", *args])
    assert proc.returncode == 2 and calls == [] and "[run.sh]" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [                 # one line, no usage block
        f"error: python -m dist_triplet.train: unrecognized arguments: {' '.join(args)} "
        "(--help lists the options)"], proc.stderr


@pytest.mark.parametrize("args", [["--config", "configs/debug.yaml"], ["--config=x.yaml"]])
def test_run_sh_refuses_another_config(tmp_path, args):
    """A --config of the user's would replace the recipe and have its batch rescaled as the
    recipe's: one line naming launch/horovod.sh instead, exit 2, nothing run."""
    proc, calls = run_main_job(tmp_path, ["train.epochs=1", *args], np_=None)
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "launch/run.sh: the main job runs configs/fashion_mnist.yaml and takes overrides only")


def test_horovod_sh_hosts_with_fewer_slots_than_np_is_usage_and_exit_2():
    """adv finding: ``horovod.sh 3 localhost:2`` passed the pre-flight, then horovodrun died
    with "Requested more processes (3) than there are available slots (2)" and a traceback."""
    proc = run_script("horovod.sh", "3", "localhost:2", "--", "train.epochs=1")
    assert_usage(proc, "horovod.sh")
    assert "hold 2 slot(s), fewer than NP=3 ranks" in proc.stderr
    assert "slot" not in run_script("horovod.sh", "3", "a:2,b:1", "--").stderr  # 3 slots: ok


@pytest.mark.parametrize("script, args, key", [
    ("horovod.sh", ["2", "--", "distributed.backend=kvstore"], "distributed.backend=kvstore"),
    ("kvstore.sh", ["cpu:2", "--", "distributed.devices=cpu:3"], "distributed.devices=cpu:3"),
    ("kvstore.sh", ["cpu:2", "--", "distributed.backend=horovod"], "distributed.backend=horovod"),
])
def test_launch_scripts_refuse_a_key_they_would_override(script, args, key):
    """horovod.sh and kvstore.sh append their own backend (and devices) after the user's
    arguments, so another value trained silently on theirs; refused in one line, exit 2."""
    proc = run_script(script, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launch/{script}: {key}, but"), lines


def test_board_sh_picks_the_newest_run_not_a_data_cache(tmp_path):
    """New-user trial: configs/own_images.yaml caches under runs/data-cache, the newest
    directory there, and board.sh without an argument refused it ("not a run directory")."""
    import time
    (tmp_path / "runs" / "old-run" / "tensorboard").mkdir(parents=True)
    (tmp_path / "runs" / "new-run" / "tensorboard").mkdir(parents=True)
    old = time.time() - 100
    os.utime(tmp_path / "runs" / "old-run" / "tensorboard", (old, old))
    time.sleep(0.01)
    (tmp_path / "runs" / "data-cache" / "folder-x").mkdir(parents=True)   # newest of all
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho \"python $*\"\n")     # tensorboard stand-in
    (fake / "python").chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "board.sh")], cwd=tmp_path,
                          env=child_env(DIST_TRIPLET_VENV="/nonexistent",
                                        PATH=f"{fake}:/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[board] serving runs/new-run/tensorboard on http://127.0.0.1:6006" in proc.stdout
    assert "--logdir runs/new-run/tensorboard" in proc.stdout


def test_override_refusal_reads_keys_as_the_config_parser_does():
    """Re-check finding: "distributed.backend =kvstore" (the parser strips the space)
    trained on Horovod, and "distributed.backend='horovod'" was refused as another value."""
    proc = run_script("horovod.sh", "2", "--", "distributed.backend =kvstore")
    assert proc.returncode == 2 and "sets distributed.backend=horovod" in proc.stderr
    proc = run_script("kvstore.sh", "cpu:2", "--", "distributed.devices = 'cpu:3'")
    assert proc.returncode == 2 and "sets distributed.devices=cpu:2" in proc.stderr
    proc = run_script("horovod.sh", "2", "--", "distributed.backend='horovod'")
    assert "but launch/horovod.sh sets" not in proc.stderr        # the same value: on to the check
