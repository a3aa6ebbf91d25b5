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
                                  ["1.5"], ["--config", "x.yaml"], ["", "--"], ["2x"]])
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
