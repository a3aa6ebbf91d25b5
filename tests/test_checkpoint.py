"""Checkpoints and resume (dist_triplet/checkpoint.py and its use in train.py).

* the checkpoint directory: what counts as complete, last-K retention, atomic replace;
* resume equivalence: a run interrupted during epoch 3 (an exception in-process, a SIGKILL
  it sends itself, a SIGKILL from outside) and resumed ends with the parameters of an
  uninterrupted run to 1e-6, for SGD with momentum and for Adam, both with a cosine
  schedule and warm-up, so the learning rate by global step is exercised;
* resume refused when a key that changes the computation differs (names the key);
* a non-finite loss stops the run naming epoch and step, and the last good checkpoint
  stays byte-for-byte intact and loadable.

Everything runs on the CPU with the 84-row data set of tests/_ckpt_util.py.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from _ckpt_util import (FAULT_TRAIN, digest_tree, load_params, max_abs_diff,  # noqa: E402
                        net_params, run_args, subprocess_env, write_dataset)
from _ckpt_util import _fresh_logging  # noqa: E402,F401  (autouse fixture)
from dist_triplet import checkpoint as ckpt  # noqa: E402
from dist_triplet import loop  # noqa: E402
from dist_triplet import rundir  # noqa: E402
from dist_triplet import train as train_mod  # noqa: E402
from dist_triplet.config import load_config  # noqa: E402

SGD = ["optim.optimizer=sgd", "optim.lr=0.05", "optim.momentum=0.9",
       "optim.schedule=cosine", "optim.warmup_epochs=0.5"]
ADAM = ["optim.optimizer=adam", "optim.lr=0.01", "optim.schedule=cosine",
        "optim.warmup_epochs=0.5"]
KVSTORE2 = ["distributed.backend=kvstore", "distributed.devices=cpu:2"]
# name -> overrides; kvstore over 2 CPU contexts checks that every device's updater gets
# the optimizer state back.
OPTIMIZERS = {"sgd_momentum": SGD, "adam": ADAM, "adam_kvstore2": ADAM + KVSTORE2}
TOL = 1e-6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """Uninterrupted 4-epoch runs, one per optimizer: {name: (run dir, final params)}."""
    out = {}
    for name, opt in OPTIMIZERS.items():
        run_dir = str(tmp_path_factory.mktemp(f"ref_{name}"))
        result = loop.train(load_config(None, run_args(data_root, run_dir, *opt)))
        out[name] = (run_dir, net_params(result.net))
    return out


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return json.load(fh)["epochs"]


def _assert_same_run(run_dir, ref_dir, ref_params):
    """The resumed run's final checkpoint and metrics equal the uninterrupted run's."""
    final = os.path.join(run_dir, "checkpoints", "epoch-0004")    # after "epoch 4/4"
    assert max_abs_diff(load_params(final), ref_params) <= TOL
    assert max_abs_diff(load_params(final), load_params(
        os.path.join(ref_dir, "checkpoints", "epoch-0004"))) <= TOL
    hist, ref_hist = _history(run_dir), _history(ref_dir)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in hist], [r["loss"] for r in ref_hist],
                               rtol=0, atol=TOL)
    np.testing.assert_allclose([r["lr"] for r in hist], [r["lr"] for r in ref_hist], rtol=1e-12)
    meta = ckpt.read_meta(final).to_json()
    ref_meta = ckpt.read_meta(os.path.join(ref_dir, "checkpoints", "epoch-0004")).to_json()
    assert meta["epoch"] == 3 and [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4]
    for key in ("world_size", "processes", "devices", "steps"):
        assert meta[key] == ref_meta[key], key
    for section in ("data", "model", "loss", "sampler", "optim", "train", "distributed"):
        assert meta["config"][section] == ref_meta["config"][section], section


# ----------------------------------------------------------------------------- directory

class _Interrupt(Exception):
    pass


def _meta(epoch, line=None):
    return ckpt.CheckpointMeta(epoch=epoch, config={}, world_size=1,
                               history=[{"line": line}] if line else [])


def _tiny_net_and_trainer(optimizer="sgd"):
    net = mx.gluon.nn.Dense(3, in_units=2)
    net.initialize(mx.init.Constant(0.5))
    trainer = mx.gluon.Trainer(net.collect_params(), optimizer, {"learning_rate": 0.1})
    with mx.autograd.record():
        loss = net(mx.nd.ones((4, 2))).sum()
    loss.backward()
    trainer.step(4)  # creates optimizer state, so save_states has something to save
    return net, trainer


def test_list_checkpoints_ignores_incomplete(tmp_path):
    d = tmp_path / "checkpoints"
    for name, files in [("epoch-0001", ckpt.FILES), ("epoch-0002", ckpt.FILES),
                        (".epoch-0003.tmp-1234", ckpt.FILES),     # killed before the rename
                        ("epoch-0004", ("params", "trainer.states")),  # no meta.json
                        ("epoch-0005", ("meta.json",)),           # meta without params
                        ("notes", ckpt.FILES)]:
        (d / name).mkdir(parents=True)
        for f in files:
            (d / name / f).write_text("{}")
    # 0-based epochs: meta.json "{}" has none, so the name's number minus 1.
    assert ckpt.list_checkpoints(str(d)) == [(0, str(d / "epoch-0001")),
                                             (1, str(d / "epoch-0002"))]
    assert ckpt.latest_checkpoint(str(d)) == str(d / "epoch-0002")
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None


def test_save_keeps_last_k_and_cleans_leftovers(tmp_path):
    net, trainer = _tiny_net_and_trainer()
    d = str(tmp_path / "checkpoints")
    os.makedirs(os.path.join(d, ".epoch-0000.tmp-99999"))  # a killed save's leftover
    for epoch in range(5):
        path = ckpt.save_checkpoint(d, net, trainer, _meta(epoch), keep=2)
        assert path == os.path.join(d, f"epoch-{epoch + 1:04d}")  # the log's "epoch 1/N"
    assert sorted(os.listdir(d)) == ["epoch-0004", "epoch-0005"]
    meta = ckpt.read_meta(os.path.join(d, "epoch-0005")).to_json()
    assert meta == {"config": {}, "world_size": 1, "epoch": 4}


def test_save_replaces_epoch_and_drops_abandoned_later_ones(tmp_path):
    net, trainer = _tiny_net_and_trainer()
    d = str(tmp_path / "checkpoints")
    for epoch in range(4):
        ckpt.save_checkpoint(d, net, trainer, _meta(epoch, line="old"), keep=5)
    # Resumed from epoch 1: the new epoch 2 replaces the old one, and the old epoch 3
    # (a continuation that was abandoned) must not outlive it for resume=auto.
    ckpt.save_checkpoint(d, net, trainer, _meta(2, line="new"), keep=5)
    assert [e for e, _ in ckpt.list_checkpoints(d)] == [0, 1, 2]
    assert ckpt.read_meta(os.path.join(d, "epoch-0003")).history == [{"line": "new"}]
    assert not [n for n in os.listdir(d) if n.startswith(".")]


def test_save_interrupted_mid_write_leaves_no_checkpoint(tmp_path):
    """A save that dies after the parameters, before the rest: the previous checkpoint
    stays the latest, the leftover is ignored, and the next save removes it."""
    net, trainer = _tiny_net_and_trainer()
    d = str(tmp_path / "checkpoints")
    first = ckpt.save_checkpoint(d, net, trainer, _meta(0), keep=3)

    class Dying:
        def save_states(self, fname):
            with open(fname, "wb") as fh:
                fh.write(b"half")
            raise _Interrupt

    with pytest.raises(_Interrupt):
        ckpt.save_checkpoint(d, net, Dying(), _meta(1), keep=3)
    assert [n for n in os.listdir(d) if n.startswith(".epoch-0002.tmp-")]
    assert ckpt.latest_checkpoint(d) == first
    ckpt.save_checkpoint(d, net, trainer, _meta(1), keep=3)
    assert sorted(os.listdir(d)) == ["epoch-0001", "epoch-0002"]


def test_save_load_round_trip_restores_params_and_optimizer(tmp_path):
    net, trainer = _tiny_net_and_trainer("adam")
    path = ckpt.save_checkpoint(str(tmp_path), net, trainer, _meta(0), keep=1)
    net2, trainer2 = _tiny_net_and_trainer("adam")
    net2.weight.set_data(mx.nd.zeros((3, 2)))
    ckpt.load_checkpoint(path, net2, trainer2, mx.cpu())
    np.testing.assert_array_equal(net2.weight.data().asnumpy(), net.weight.data().asnumpy())
    assert trainer2._optimizer._index_update_count == trainer._optimizer._index_update_count


def test_read_meta_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="epoch-0007.*missing params, trainer.states, "
                                                "meta.json"):
        ckpt.read_meta(str(tmp_path / "epoch-0007"))
    bad = tmp_path / "epoch-0001"
    bad.mkdir()
    for f in ckpt.FILES:
        (bad / f).write_text("{not json")
    with pytest.raises(ValueError, match=r"epoch-0001/meta.json: not valid JSON"):
        ckpt.read_meta(str(bad))
    (bad / "meta.json").write_text('{"epoch": 1}')
    with pytest.raises(ValueError, match="meta.json: not a dist_triplet checkpoint "
                                         r"\(missing config, world_size\)"):
        ckpt.read_meta(str(bad))


@pytest.mark.parametrize("meta, needle", [
    ({"epoch": 1, "config": [], "world_size": 1}, "config must be a mapping of config sections"),
    ({"epoch": "1", "config": {}, "world_size": 1}, "epoch must be an integer >= 0, found '1'"),
    ({"epoch": 1, "config": {"model": 3}, "world_size": 1}, "config must be a mapping"),
    ({"epoch": 1, "config": {}, "world_size": "2"}, "world_size must be an integer >= 1"),
    ({"epoch": 1, "config": {}, "world_size": 1, "history": {}}, "history must be a list"),
    ({"epoch": 5, "config": {}, "world_size": 1},
     "epoch 5 (0-based) does not match the directory name epoch-0001"),
])
def test_read_meta_rejects_wrong_types_naming_file_and_key(meta, needle, tmp_path):
    bad = tmp_path / "epoch-0001"
    bad.mkdir()
    for f in ckpt.FILES:
        (bad / f).write_text("x")
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="epoch-0001/meta.json: ") as info:
        ckpt.read_meta(str(bad))
    assert needle in str(info.value)


def test_load_checkpoint_keeps_the_meaningful_line_of_mxnets_message(tmp_path):
    net, trainer = _tiny_net_and_trainer()
    path = ckpt.save_checkpoint(str(tmp_path / "checkpoints"), net, trainer, _meta(0), keep=1)
    with open(os.path.join(path, "params"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError) as info:
        ckpt.load_checkpoint(path, net, trainer, mx.cpu())
    msg = str(info.value)
    assert "params: cannot load (MXNetError: " in msg and "Traceback" not in msg, msg
    assert "Invalid NDArray file format" in msg


def test_check_compatible_names_key_world_size_and_steps():
    cfg = load_config(None, ["data.dataset=idx", "data.root=/x"]).to_dict()
    meta = ckpt.CheckpointMeta.from_json(
        {"config": cfg, "world_size": 2, "processes": 2, "devices": 1, "steps": 10, "epoch": 0},
        "ck")
    assert ckpt.check_compatible(meta, cfg, "ck", processes=2, devices=1, steps=10) == []
    wider = load_config(None, ["data.dataset=idx", "data.root=/x", "model.hidden=[512,128]"])
    with pytest.raises(ValueError, match=r"ck: model.hidden was \[256, 128\] there, is "
                                         r"\[512, 128\] now"):
        ckpt.check_compatible(meta, wider.to_dict(), "ck", processes=2, devices=1)
    with pytest.raises(ValueError, match=r"world size was 2 there \(2 process\(es\) x 1 "
                                         r"device\(s\)\), is 2 now \(1 x 2\): the same world "
                                         r"size, but processes x devices differ; .* resume "
                                         r"with 2 process\(es\) x 1 device\(s\)$"):
        ckpt.check_compatible(meta, cfg, "ck", processes=1, devices=2)
    with pytest.raises(ValueError, match=r"is 3 now \(3 x 1\): a different world size; "):
        ckpt.check_compatible(meta, cfg, "ck", processes=3, devices=1)
    with pytest.raises(ValueError, match="10 steps per epoch there, 12 now"):
        ckpt.check_compatible(meta, cfg, "ck", processes=2, devices=1, steps=12)
    lower = load_config(None, ["data.dataset=idx", "data.root=/x", "optim.lr=0.01",
                               "train.epochs=20"])
    assert ckpt.check_compatible(meta, lower.to_dict(), "ck", processes=2, devices=1) == [
        "optim.lr: 0.05 -> 0.01", "train.epochs: 10 -> 20"]


def test_find_resume(tmp_path):
    d = str(tmp_path / "run" / "checkpoints")
    assert rundir.find_resume(None, d) is None and rundir.find_resume("auto", d) is None
    net, trainer = _tiny_net_and_trainer()
    path = ckpt.save_checkpoint(d, net, trainer, _meta(0), keep=1)
    assert rundir.find_resume("auto", d) == path
    assert rundir.find_resume(path, d) == path
    assert rundir.find_resume("/elsewhere/epoch-0001", str(tmp_path / "new" / "checkpoints")) \
        == "/elsewhere/epoch-0001"
    # Another run's checkpoint into a directory holding checkpoints: saving would prune them.
    with pytest.raises(ValueError, match=r"checkpoint.resume='/elsewhere/epoch-0001' is not a "
                                         r"checkpoint of output.dir '.*run', which holds"):
        rundir.find_resume("/elsewhere/epoch-0001", d)
    with pytest.raises(ValueError, match=r"output.dir '.*run' already holds checkpoints "
                                         r"\(latest .*epoch-0001\); pass checkpoint.resume=auto"):
        rundir.find_resume(None, d)


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_resume_after_interrupt_in_epoch_3_matches_uninterrupted(opt, data_root, reference,
                                                                 tmp_path):
    run_dir = str(tmp_path / "run")
    args = run_args(data_root, run_dir, *OPTIMIZERS[opt])

    def interrupt(epoch, step):  # engine.run_epoch's hook, before each step (0-based)
        if (epoch, step + 1) == (2, 4):  # 0-based epoch 2 = the third
            raise _Interrupt

    with pytest.raises(_Interrupt):
        loop.train(load_config(None, args), on_step=interrupt)
    ck_dir = os.path.join(run_dir, "checkpoints")
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0, 1]
    assert [r["epoch"] for r in _history(run_dir)] == [1, 2]

    result = loop.train(load_config(None, args + ["checkpoint.resume=auto"]))
    ref_dir, ref_params = reference[opt]
    assert max_abs_diff(net_params(result.net), ref_params) <= TOL
    _assert_same_run(run_dir, ref_dir, ref_params)
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [1, 2, 3]  # keep=3


def test_resume_after_sigkill_in_epoch_3_matches_uninterrupted(data_root, reference, tmp_path):
    """The process SIGKILLs itself before step 4 of epoch 3: no handler, no cleanup."""
    run_dir = str(tmp_path / "run")
    args = run_args(data_root, run_dir, *ADAM)
    proc = subprocess.run([sys.executable, FAULT_TRAIN, *args], capture_output=True, text=True,
                          timeout=120, env=subprocess_env(
                              DIST_TRIPLET_FAULT="epoch=3,step=4,how=kill"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck_dir = os.path.join(run_dir, "checkpoints")
    assert [e for e, _ in ckpt.list_checkpoints(ck_dir)] == [0, 1]
    proc = subprocess.run([sys.executable, "-m", "dist_triplet.train", *args,
                           "checkpoint.resume=auto"], capture_output=True, text=True,
                          timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming after epoch 2" in proc.stderr
    _assert_same_run(run_dir, *reference["adam"])


def test_resume_after_external_sigkill_matches_uninterrupted(data_root, reference, tmp_path):
    """SIGKILL from outside as soon as epoch 2's checkpoint exists (steps slowed to 50 ms
    so that the kill lands during epoch 3, or wherever it lands: any point must resume)."""
    run_dir = str(tmp_path / "run")
    args = run_args(data_root, run_dir, *SGD)
    proc = subprocess.Popen([sys.executable, FAULT_TRAIN, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(DIST_TRIPLET_FAULT="sleep=0.05"))
    marker = os.path.join(run_dir, "checkpoints", "epoch-0002", "meta.json")
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(marker), proc.stderr.read()[-2000:] if proc.poll() else "no ckpt"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    done = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))
    assert done and done[-1][0] < 3  # killed before the end
    res = subprocess.run([sys.executable, "-m", "dist_triplet.train", *args,
                          "checkpoint.resume=auto"], capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_run(run_dir, *reference["sgd_momentum"])


# ----------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def two_epoch_run(data_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("two_epochs") / "run")
    assert train_mod.main(run_args(data_root, run_dir, "train.epochs=2")) == 0
    return run_dir


@pytest.mark.parametrize("change, named", [
    (["model.hidden=[16,4]"], "model.hidden was [16, 8] there, is [16, 4] now"),
    (["train.batch_size=4"], "train.batch_size was 8 there, is 4 now"),
    (["optim.momentum=0.5"], "optim.momentum was 0.0 there, is 0.5 now"),
    (["train.seed=7"], "train.seed was 42 there, is 7 now"),
    (["distributed.backend=kvstore", "distributed.devices=cpu:2"],
     "world size was 1 there (1 process(es) x 1 device(s)), is 2 now (1 x 2)"),
])
def test_resume_with_incompatible_config_is_refused(change, named, two_epoch_run, data_root,
                                                    capsys):
    before = digest_tree(two_epoch_run)
    args = run_args(data_root, two_epoch_run, "checkpoint.resume=auto", *change)
    assert train_mod.main(args) == 2
    err = capsys.readouterr().err
    assert "error: cannot resume from" in err and named in err
    assert digest_tree(two_epoch_run) == before  # nothing written


@pytest.mark.parametrize("change, first_step", [
    # two_epoch_run: constant lr 0.05, no warm-up, 10 steps/epoch of 8; 2 epochs done, so
    # global steps 20.. remain.
    (["train.epochs=4"], None),                          # constant: every rate is 0.05
    (["train.epochs=4", "optim.warmup_epochs=1"], None),  # warm-up lies in the past
    (["train.epochs=4", "optim.lr=0.01"], 20),
    (["train.epochs=4", "optim.schedule=cosine"], 20),    # 0.5 * (1 + cos(pi/2)) * 0.05
    # warm-up over 3 epochs: steps 20..29 ramp, step 30 on is 0.05 again.
    (["train.epochs=4", "optim.warmup_epochs=3"], 20),
    (["train.epochs=4", "optim.scale_lr=true", "optim.base_batch=8"], None),  # 0.05 * 8/8
])
def test_resume_warns_only_when_a_remaining_step_rate_changes(change, first_step, two_epoch_run,
                                                              data_root, caplog):
    from dist_triplet.plan import JobShape, read_resume_meta
    cfg = load_config(None, run_args(data_root, two_epoch_run, "checkpoint.resume=auto",
                                     *change))
    path = ckpt.latest_checkpoint(os.path.join(two_epoch_run, "checkpoints"))
    caplog.set_level(logging.INFO, logger="dist_triplet")
    meta = read_resume_meta(cfg, path, JobShape(1, 1), 10, 8)
    assert meta.epoch == 1
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("resuming with changed schedule keys: ")
               and "train.epochs: 2 -> 4" in m for m in infos), infos
    if first_step is None:
        assert warnings == []
    else:
        assert len(warnings) == 1, warnings
        assert f"global step {first_step} (epoch {first_step // 10 + 1})" in warnings[0]
        assert "will not match an uninterrupted one" in warnings[0]


def test_first_difference_against_a_plain_loop():
    from dist_triplet import schedule
    old = lambda s: schedule.learning_rate(s, lr=0.1, epochs=3, steps_per_epoch=4,  # noqa: E731
                                           warmup_epochs=1)
    new = lambda s: schedule.learning_rate(s, lr=0.1, epochs=5, steps_per_epoch=4,  # noqa: E731
                                           schedule="cosine", warmup_epochs=1)
    # warm-up steps 0..3 agree (0.025, 0.05, 0.075, 0.1); cosine at step 4 is 0.1 * 0.5 *
    # (1 + cos(0)) = 0.1 too; step 5 is below 0.1.
    assert [old(s) == new(s) for s in range(6)] == [True] * 5 + [False]
    assert schedule.first_difference(old, new, 0, 20) == 5
    assert schedule.first_difference(old, new, 0, 5) is None
    assert schedule.first_difference(old, old, 0, 20) is None


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(two_epoch_run, data_root,
                                                                capsys):
    before = digest_tree(two_epoch_run)
    assert train_mod.main(run_args(data_root, two_epoch_run)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert digest_tree(two_epoch_run) == before


def test_resume_of_a_finished_run_does_nothing_new(two_epoch_run, data_root, tmp_path):
    """Resuming after the last epoch trains nothing and leaves the checkpoints alone."""
    before = {k: v for k, v in digest_tree(two_epoch_run).items() if k.startswith("checkpoints")}
    res = loop.train(load_config(None, run_args(data_root, two_epoch_run, "train.epochs=2",
                                                     "checkpoint.resume=auto")))
    after = {k: v for k, v in digest_tree(two_epoch_run).items() if k.startswith("checkpoints")}
    assert after == before
    assert res.metrics["epoch"] == 2 and "precision_at_1" in res.metrics
    with open(os.path.join(two_epoch_run, "metrics.json")) as fh:
        assert json.load(fh)["final"]["epoch"] == 2


def test_resume_from_a_corrupt_checkpoint_names_the_file(two_epoch_run, data_root, tmp_path,
                                                         capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_epoch_run, run_dir)
    params = os.path.join(run_dir, "checkpoints", "epoch-0002", "params")
    with open(params, "r+b") as fh:  # a disk that filled up during the save
        fh.truncate(100)
    assert train_mod.main(run_args(data_root, run_dir, "checkpoint.resume=auto")) == 2
    err = capsys.readouterr().err
    assert f"error: {params}: cannot load" in err and "older checkpoint" in err


# ----------------------------------------------------------------------------- non-finite

def test_non_finite_loss_names_epoch_and_step_and_keeps_checkpoint(data_root, tmp_path,
                                                                   capsys):
    run_dir = str(tmp_path / "run")
    assert train_mod.main(run_args(data_root, run_dir, "train.epochs=2")) == 0
    ck_dir = os.path.join(run_dir, "checkpoints")
    good = ckpt.latest_checkpoint(ck_dir)
    before = digest_tree(ck_dir)
    capsys.readouterr()
    # Continue with a learning rate that overflows: optim.lr may change on resume (the
    # way out of a divergence is to lower it), so this resumes and diverges in epoch 3.
    code = train_mod.main(run_args(data_root, run_dir, "checkpoint.resume=auto",
                                   "optim.lr=1e30"))
    err = capsys.readouterr().err
    assert code == 2
    assert "error: non-finite loss in epoch 3, step 2 of 10" in err
    assert "optim.lr: 0.05 -> 1e+30" in err  # the schedule-change warning
    assert digest_tree(ck_dir) == before       # unchanged, byte for byte
    assert ckpt.latest_checkpoint(ck_dir) == good
    params = load_params(good)
    assert all(np.isfinite(v).all() for v in params.values())
    assert [r["epoch"] for r in _history(run_dir)] == [1, 2]
    # ... and the run continues from it with a sane learning rate.
    assert train_mod.main(run_args(data_root, run_dir, "checkpoint.resume=auto",
                                   "train.epochs=3")) == 0
    assert [r["epoch"] for r in _history(run_dir)] == [1, 2, 3]


# ----------------------------------------------------------------------------- more refusals

@pytest.mark.parametrize("kept, held", [
    ("train.epochs=4", "checkpoints up to"),      # saving epoch 2 there would prune its later
    ("checkpoint.keep=0", "config.yaml, metrics.json")])  # adversarial trial: replaced, exit 0
def test_resume_of_another_runs_checkpoint_into_a_run_is_refused(
        two_epoch_run, data_root, tmp_path, capsys, kept, held):
    """A run directory that holds another run, with or without checkpoints, is not
    continued from this run's checkpoint: that run's files would be replaced."""
    other = str(tmp_path / "other")
    assert train_mod.main(run_args(data_root, other, kept)) == 0
    before = digest_tree(other)
    src = os.path.join(two_epoch_run, "checkpoints", "epoch-0001")
    capsys.readouterr()
    assert train_mod.main(run_args(data_root, other, f"checkpoint.resume={src}")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.resume={src!r} is not a checkpoint of output.dir" in err
    assert f"holds another run ({held}" in err
    assert digest_tree(other) == before
    if kept == "checkpoint.keep=0":     # resume=auto starts that run again, and says so
        assert train_mod.main(run_args(data_root, other, "checkpoint.resume=auto",
                                       "checkpoint.keep=0")) == 0
        assert "holds a run (config.yaml, metrics.json) but no checkpoint: starting it " \
            "again" in capsys.readouterr().err


def test_resume_with_fewer_epochs_than_done_is_refused(two_epoch_run, data_root, capsys):
    before = digest_tree(two_epoch_run)
    assert train_mod.main(run_args(data_root, two_epoch_run, "checkpoint.resume=auto",
                                   "train.epochs=1")) == 2
    err = capsys.readouterr().err
    assert "checkpoint is after epoch 2; train.epochs=1 leaves nothing to train" in err
    assert digest_tree(two_epoch_run) == before


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(data_root, tmp_path,
                                                                      capsys):
    code = train_mod.main(run_args(data_root, str(tmp_path / "run"), "optim.lr=1e30"))
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss in epoch 1" in err
    assert "No checkpoint was written before it" in err and "intact" not in err


def test_key_added_after_the_checkpoint_counts_as_its_default():
    # A checkpoint written before sampler.scope existed (its config lacks the key) resumes
    # under the default 'local', and is refused under 'global', naming the default.
    cfg = load_config(None, ["data.dataset=idx", "data.root=/x", "sampler.kind=pk"]).to_dict()
    old = {s: dict(v) for s, v in cfg.items()}
    del old["sampler"]["scope"]
    meta = ckpt.CheckpointMeta.from_json(
        {"config": old, "world_size": 1, "processes": 1, "devices": 1, "steps": 10, "epoch": 0},
        "ck")
    assert ckpt.check_compatible(meta, cfg, "ck", processes=1, devices=1, steps=10) == []
    glob = load_config(None, ["data.dataset=idx", "data.root=/x", "sampler.kind=pk",
                              "sampler.scope=global"]).to_dict()
    with pytest.raises(ValueError, match=r"sampler.scope was 'local' there, is 'global' now"):
        ckpt.check_compatible(meta, glob, "ck", processes=1, devices=1, steps=10)


def test_channels_saved_by_an_mlp_run_do_not_block_its_resume():
    """Adversarial trial: an mlp run saved before model.channels was refused outside the
    convnet (it set channels, which did nothing) could be resumed neither with the saved
    value (refused as an mlp key) nor without it (refused as a changed fixed key)."""
    cfg = load_config(None, ["data.dataset=idx", "data.root=/x"]).to_dict()
    old = {s: dict(v) for s, v in cfg.items()}
    old["model"]["channels"] = [16]
    meta = ckpt.CheckpointMeta.from_json(
        {"config": old, "world_size": 1, "processes": 1, "devices": 1, "steps": 10, "epoch": 0},
        "ck")
    assert ckpt.check_compatible(meta, cfg, "ck", processes=1, devices=1, steps=10) == []
    conv = {s: dict(v) for s, v in cfg.items()}        # on the convnet they are its blocks
    conv["model"]["backbone"] = old["model"]["backbone"] = "convnet"
    with pytest.raises(ValueError, match=r"model.channels was \[16\] there, is \[32, 64, "):
        ckpt.check_compatible(meta, conv, "ck", processes=1, devices=1, steps=10)


def test_runs_with_0_based_checkpoint_names_still_resume(two_epoch_run, data_root, tmp_path):
    """Checkpoints written before the names matched the log (epoch-0000 after "epoch 1/N")
    resume as before: the epoch comes from meta.json, and the next save is named as the log
    numbers it."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_epoch_run, run_dir)
    d = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(d)) == ["epoch-0001", "epoch-0002"]
    for name in sorted(os.listdir(d)):          # back to the old names: epoch-0000, epoch-0001
        os.rename(os.path.join(d, name), os.path.join(d, f"epoch-{int(name[6:]) - 1:04d}"))
    assert [e for e, _ in ckpt.list_checkpoints(d)] == [0, 1]
    assert ckpt.latest_checkpoint(d) == os.path.join(d, "epoch-0001")
    assert ckpt.read_meta(os.path.join(d, "epoch-0001")).epoch == 1
    res = loop.train(load_config(None, run_args(data_root, run_dir, "train.epochs=3",
                                                "checkpoint.resume=auto")))
    assert res.metrics["epoch"] == 3
    assert [r["epoch"] for r in _history(run_dir)] == [1, 2, 3]
    # keep=3: the two old checkpoints and the new epoch-0003, in epoch order.
    assert [os.path.basename(p) for _, p in ckpt.list_checkpoints(d)] == [
        "epoch-0000", "epoch-0001", "epoch-0003"]
    assert ckpt.read_meta(os.path.join(d, "epoch-0003")).epoch == 2


def test_non_finite_embeddings_after_a_finite_loss_stop_the_run(data_root, tmp_path,
                                                                 monkeypatch, capsys):
    """New-user trial: resnet18_v1 on 32x32 images kept a finite loss while its evaluation
    (BatchNorm's running statistics) gave NaN embeddings; the run called that a collapse,
    wrote its checkpoint and model, and crashed in the report."""
    import dist_triplet.model as model_mod
    real = model_mod.embed
    calls = []

    def embed(net, x, ctx, batch_size):   # the second evaluation diverges
        out = real(net, x, ctx, batch_size)
        calls.append(1)
        return out * np.float32(np.nan) if len(calls) >= 2 else out

    monkeypatch.setattr(model_mod, "embed", embed)
    run_dir = str(tmp_path / "run")
    code = train_mod.main(run_args(data_root, run_dir, "train.epochs=3"))
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite test embedding values after epoch 2, whose loss was finite" in err
    assert "The last good checkpoint (epoch 1) is intact" in err and "collapsed" not in err
    ck_dir = os.path.join(run_dir, "checkpoints")
    assert os.path.basename(ckpt.latest_checkpoint(ck_dir)) == "epoch-0001"
    assert [r["epoch"] for r in _history(run_dir)] == [1]
    assert not os.path.exists(os.path.join(run_dir, "model"))


def test_a_copied_runs_config_does_not_continue_the_original(two_epoch_run, tmp_path, capsys):
    """Verification trial: config.yaml records output.dir absolute, so resuming a copy with
    --config COPY/config.yaml wrote the next epoch into the original run, exit 0."""
    from dist_triplet import check as check_mod
    copy = str(tmp_path / "copy")
    shutil.copytree(two_epoch_run, copy)
    before = digest_tree(two_epoch_run)
    conf = os.path.join(copy, "config.yaml")
    for main in (train_mod.main, check_mod.main):
        assert main(["--config", conf, "checkpoint.resume=auto", "train.epochs=3"]) == 2
        err = capsys.readouterr().err
        assert f"but its output.dir is {two_epoch_run}" in err and f"output.dir={copy}" in err
    # As the line says: the copy continues where it is; the original is untouched.
    assert train_mod.main(["--config", conf, "checkpoint.resume=auto", "train.epochs=3",
                           f"output.dir={copy}"]) == 0
    assert [r["epoch"] for r in _history(copy)] == [1, 2, 3]
    assert digest_tree(two_epoch_run) == before


def test_resumed_xbm_run_says_it_differs(data_root, tmp_path, capsys):
    """Adversarial trial: the cross-batch memory is not checkpointed, so a resumed XBM run
    ends elsewhere than an uninterrupted one (0.0099 in the trial) while the docs promised
    the same parameters; the run said nothing."""
    run = str(tmp_path / "xbm")
    xbm = ("sampler.kind=pk", "sampler.scope=global", "sampler.memory=2", "sampler.p=3",
           "sampler.k=2", "sampler.steps_per_epoch=3")
    assert train_mod.main(run_args(data_root, run, "train.epochs=1", *xbm)) == 0
    assert "not checkpointed" not in capsys.readouterr().err
    assert train_mod.main(run_args(data_root, run, "train.epochs=2", "checkpoint.resume=auto",
                                   *xbm)) == 0
    assert "sampler.memory=2: the cross-batch memory is not checkpointed" in \
        capsys.readouterr().err


def test_ctrl_c_is_one_line_and_the_run_resumes(data_root, tmp_path, capsys):
    """Adversarial trial: Ctrl-C printed a 20-line KeyboardInterrupt traceback."""
    run = str(tmp_path / "run")

    def interrupt(epoch, step):
        if (epoch, step) == (1, 3):
            raise KeyboardInterrupt
    capsys.readouterr()
    assert train_mod.main(run_args(data_root, run), on_step=interrupt) == 130
    err = capsys.readouterr().err
    assert "interrupted: the run directory keeps its last complete checkpoint" in err
    assert "Traceback" not in err
    assert os.path.basename(ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))) == \
        "epoch-0001"
    assert train_mod.main(run_args(data_root, run, "checkpoint.resume=auto")) == 0
    assert [r["epoch"] for r in _history(run)] == [1, 2, 3, 4]
    # Resuming the finished run trains nothing, and says so (new-user trial).
    capsys.readouterr()
    assert train_mod.main(run_args(data_root, run, "checkpoint.resume=auto")) == 0
    assert "the run has done all 4 epochs: nothing to train" in capsys.readouterr().err
    assert [r["epoch"] for r in _history(run)] == [1, 2, 3, 4]


def test_resume_on_other_data_of_the_same_shape_is_refused(two_epoch_run, data_root, tmp_path,
                                                         capsys):
    """data.root (or data.path) is free on resume, so that data may move; other data of the
    same size passed the steps-per-epoch check and trained on, exit 0, the history mixing
    both. The checkpoint's data digest refuses them; the same data moved still resumes."""
    import shutil
    other = write_dataset(tmp_path / "other", seed=1)          # same shapes, other pixels
    before = digest_tree(two_epoch_run)
    args = run_args(other, two_epoch_run, "checkpoint.resume=auto", "train.epochs=3")
    assert train_mod.main(args) == 2
    err = capsys.readouterr().err
    assert "error: cannot resume from" in err and "the training data differ" in err
    assert f"data.root {data_root!r} there, {other!r} now" in err and "digest" in err
    assert digest_tree(two_epoch_run) == before                      # nothing written
    moved = shutil.copytree(data_root, tmp_path / "moved")           # the same data, moved
    run = shutil.copytree(two_epoch_run, tmp_path / "run")
    assert train_mod.main(run_args(moved, str(run), "checkpoint.resume=auto",
                                   "train.epochs=3")) == 0
    meta = ckpt.read_meta(ckpt.latest_checkpoint(str(run / "checkpoints")))
    assert meta.epoch == 2 and len(meta.data) == 32


def test_dropout_masks_are_a_function_of_seed_epoch_and_worker():
    """adv finding: a squeezenet1.1 run resumed after epoch 1 ended 0.0028 away from the
    uninterrupted one, exit 0: Dropout drew from MXNet's generator, seeded once at start-up,
    so the resumed epoch 2 reused epoch 1's masks. loop.seed_layers seeds it per epoch."""
    from mxnet import autograd
    from mxnet.gluon import nn

    class OneWorker:
        contexts = [mx.cpu()]

        def __init__(self, worker=0):
            self.worker = worker

        def worker_rank(self, device):
            return self.worker + device

    drop, x = nn.Dropout(0.5), mx.nd.ones(2000)

    def mask(seed, epoch, worker=0, before=0):
        if before:
            mx.nd.random.uniform(shape=before).wait_to_read()   # what earlier epochs drew
        loop.seed_layers(OneWorker(worker), seed, epoch)
        with autograd.train_mode():
            return drop(x).asnumpy() > 0

    first = mask(42, 3)
    assert 0.4 < first.mean() < 0.6
    assert np.array_equal(first, mask(42, 3, before=12345))     # resumed = uninterrupted
    assert not np.array_equal(first, mask(42, 4))
    assert not np.array_equal(first, mask(42, 3, worker=1))
    assert not np.array_equal(first, mask(7, 3))


def test_a_run_started_from_weights_resumes_without_the_file(data_root, tmp_path, monkeypatch,
                                                             capsys):
    """adv finding: config.yaml kept model.weights relative (resume from another directory:
    "no such file"), the absolute path was refused as a changed fixed key, and a moved file
    stranded the run, though the checkpoint holds every parameter."""
    import shutil
    from dist_triplet.config import load_config
    first = str(tmp_path / "first")
    assert train_mod.main(run_args(data_root, first, "train.epochs=1")) == 0
    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(first, "checkpoints", "epoch-0001", "params"), "w.params")
    run = str(tmp_path / "run")
    assert train_mod.main(run_args(data_root, run, "train.epochs=1",
                                   "model.weights=w.params")) == 0
    saved = load_config(os.path.join(run, "config.yaml"), [])
    assert saved.model.weights == str(tmp_path / "w.params")              # absolute
    os.remove("w.params")                                                 # the file is gone
    monkeypatch.chdir(data_root)                                          # another directory
    from dist_triplet.check import main as check_main
    again = ["--config", os.path.join(run, "config.yaml"), "checkpoint.resume=auto",
             "train.epochs=2"]
    assert check_main(again) == 0
    assert train_mod.main(again) == 0
    assert ckpt.read_meta(ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))).epoch == 1
    # Another weights file on resume is not read, and a warning says so.
    shutil.copy(os.path.join(first, "checkpoints", "epoch-0001", "params"), "other.params")
    capsys.readouterr()
    assert train_mod.main(again[:-1] + ["train.epochs=3", "model.weights=other.params"]) == 0
    assert "WARNING model.weights=other.params is not read: a resume loads" in \
        capsys.readouterr().err
    for record in (os.path.join(run, "config.yaml"), ckpt.latest_checkpoint(
            os.path.join(run, "checkpoints")) + "/meta.json"):    # the run keeps its own start
        assert str(tmp_path / "w.params") in open(record).read()
        assert "other.params" not in open(record).read()
    # A new run still reads it: a missing file is refused there.
    assert train_mod.main(run_args(data_root, str(tmp_path / "new"), "train.epochs=1",
                                   "model.weights=w.params")) == 2
