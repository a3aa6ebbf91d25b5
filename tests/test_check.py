"""Pre-flight check (dist_triplet/check.py) and its use in launch/horovod.sh.

* for each kind of bad input, ``check`` exits 2 with the very line ``train`` prints, and
  writes nothing; a good config passes;
* the world size matters: a batch that fits one process's shard but not each of 4
  processes' is refused only with ``--processes 4``; a 1-process checkpoint is refused for
  a 2-process resume;
* it imports neither MXNet nor Horovod;
* ``launch/horovod.sh`` with bad input prints exactly one line, ``error: ...``, and exits 2
  (before: one error line per rank plus horovodrun's traceback, exit 1); with good input
  it still trains.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from _ckpt_util import run_args
from _ckpt_util import _fresh_logging, data  # noqa: F401  (fixtures; _fresh_logging is autouse)
from _hvd import ROOT, child_env, require_horovod
from dist_triplet.check import main as check_main
from dist_triplet.data import write_idx

HOROVOD_SH = os.path.join(ROOT, "launch", "horovod.sh")


def error_line(capsys, fn, args):
    """Run fn(args); it must return 2 and print one ``error: `` line; return that line."""
    capsys.readouterr()
    assert fn(args) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _one_class(root, out):
    write_idx(os.path.join(root, "train-labels-idx1-ubyte"), [0] * 84)


def _truncated(root, out):
    path = pathlib.Path(root, "train-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:-10])


def _file_as_output(root, out):
    pathlib.Path(out).write_text("not a directory")


def _old_run_in_output(root, out):
    os.makedirs(out)
    pathlib.Path(out, "config.yaml").write_text("model: {hidden: [32]}\n")


@pytest.mark.parametrize("breaks, extra", [
    (None, ["train.epochs=two"]),
    (None, ["model.hidden=16"]),
    (None, ["train.batch_size=100"]),
    (None, ["sampler.kind=pk", "sampler.p=5", "sampler.k=2"]),
    (_one_class, []),
    (_truncated, []),
    (_file_as_output, []),
    (_old_run_in_output, []),
    (_old_run_in_output, ["checkpoint.resume=auto"]),
    (None, ["model.backbone=convnet", "model.channels=[4,4,4,4]"]),
    (None, ["model.backbone=alexnet"]),
    (None, ["model.backbone=resnet19"]),
    (None, ["augment.pad=4"]),
    (None, ["model.pool=flatten"]),
    (None, ["model.channels=[4,8]"]),
], ids=["bad_value", "bad_type", "batch_too_big", "pk_p_too_big", "one_class",
        "truncated_idx", "output_is_a_file", "fresh_run_over_a_run", "resume_other_model",
        "convnet_too_deep", "zoo_input_too_small", "unknown_backbone", "crop_pad_too_big",
        "flatten_on_mlp", "channels_on_mlp"])
def test_check_fails_like_train_and_writes_nothing(breaks, extra, data, tmp_path, capsys):
    from dist_triplet.train import main as train_main
    out = str(tmp_path / "run")
    if breaks:
        breaks(data, out)
    before = sorted(os.walk(tmp_path))
    args = run_args(data, out, *extra)
    line = error_line(capsys, check_main, args)
    assert sorted(os.walk(tmp_path)) == before  # nothing written, nothing removed
    assert line == error_line(capsys, train_main, args)


def test_weights_that_do_not_fit_fail_before_training(data, tmp_path, capsys):
    """A weights file of a 3-channel network on 1-channel images: check and train both
    refuse it in one line naming the parameter and both shapes, before writing anything."""
    import mxnet as mx
    from dist_triplet.backbone import build_network, initialize_network
    from dist_triplet.config import load_config
    from dist_triplet.train import main as train_main
    net_args = ["model.backbone=convnet", "model.channels=[4,8]"]
    model = load_config(None, net_args).model
    net = build_network(model, 48, (4, 4, 3))
    initialize_network(net, model, mx.cpu(), 0, 48)
    weights = str(tmp_path / "rgb.params")
    net.save_parameters(weights)
    args = run_args(data, str(tmp_path / "run"), *net_args, f"model.weights={weights}")
    before = sorted(os.walk(tmp_path))
    line = error_line(capsys, check_main, args)
    assert "parameter 'features.0.weight' has shape (4, 3, 3, 3) in the file but (4, 1, 3, 3)" in line
    assert sorted(os.walk(tmp_path)) == before
    assert line == error_line(capsys, train_main, args)


def test_good_config_passes(data, tmp_path, capsys):
    assert check_main(run_args(data, tmp_path / "run")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    # 84 rows: 80 triplets per epoch on one process, batch 8 -> 10 steps.
    assert err == ["check: config and data ok (84 train / 40 test images, 1 process(es), "
                   "10 steps per epoch)"]
    assert not os.path.exists(tmp_path / "run")


def test_world_size_decides_whether_a_batch_fits(data, tmp_path, capsys):
    """80 triplets on 1 process; 20 per rank on 4: batch 24 fits the first only."""
    args = run_args(data, tmp_path / "run", "train.batch_size=24", "distributed.backend=horovod")
    assert check_main(args) == 0
    line = error_line(capsys, check_main, ["--processes", "4", *args])
    assert "train.batch_size=24" in line and "each of the 4 process(es) gets only 20 triplets" in line


def test_resume_with_another_world_size(data, tmp_path, capsys):
    from dist_triplet.train import main as train_main
    out = tmp_path / "run"
    assert train_main(run_args(data, out, "train.epochs=1")) == 0
    args = run_args(data, out, "checkpoint.resume=auto", "train.epochs=2",
                    "distributed.backend=horovod")
    assert check_main(args) == 0
    line = error_line(capsys, check_main, ["--processes", "2", *args])
    assert "world size was 1 there (1 process(es) x 1 device(s)), is 2 now" in line


def test_imports_neither_mxnet_nor_horovod(data, tmp_path):
    code = ("import sys; from dist_triplet.check import main; "
            f"status = main({run_args(data, tmp_path / 'run')!r}); "
            "print(status, sorted(m for m in ('mxnet', 'horovod') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "0 []", proc.stdout + proc.stderr


def horovod_sh(*args, np_=2):
    env = child_env(DIST_TRIPLET_VENV=os.environ.get("DIST_TRIPLET_VENV", sys.prefix))
    return subprocess.run(["bash", HOROVOD_SH, str(np_), "--", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("breaks, extra, needle", [
    (None, ["train.epochs=two"], "train.epochs must be an integer, got 'two'"),
    (_truncated, [], "train-images-idx3-ubyte: expected 1344 payload bytes"),
    (None, ["--config", "no-such.yaml"], "config file 'no-such.yaml' does not exist"),
], ids=["bad_value", "truncated_idx", "missing_config"])
def test_horovod_sh_bad_input_is_one_line_and_status_2(breaks, extra, needle, data, tmp_path):
    out = str(tmp_path / "run")
    if breaks:
        breaks(data, out)
    proc = horovod_sh(*run_args(data, out), *extra)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not os.path.exists(out)


def test_horovod_sh_good_input_trains(data, tmp_path):
    require_horovod()
    out = tmp_path / "run"
    proc = horovod_sh(*run_args(data, out, "train.epochs=1", "eval.report=false"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert text.count("check: config and data ok (84 train / 40 test images, 2 process(es), "
                      "5 steps per epoch)") == 1
    assert (out / "checkpoints" / "epoch-0001" / "meta.json").is_file()


def test_keys_the_job_does_not_read_are_named(data, tmp_path, capsys):
    """Adversarial trial: these were accepted and did nothing, silently (the epoch kept
    its 18 steps with sampler.steps_per_epoch=3, adam ignored optim.momentum, ...)."""
    unused = ["sampler.steps_per_epoch=3", "sampler.miner=batch_hard", "optim.optimizer=adam",
              "optim.momentum=0.9", "distributed.devices=cpu:4", "distributed.compression=fp16",
              "data.image_size=32", "optim.base_batch=512", "eval.query_seed=3"]
    capsys.readouterr()
    assert check_main(run_args(data, tmp_path / "run", *unused)) == 0
    out = capsys.readouterr().err
    for needle in ("sampler.steps_per_epoch=3 (read only with sampler.kind=pk)",
                   "sampler.miner='batch_hard' (read only with sampler.kind=pk)",
                   "optim.momentum=0.9 (read only with optim.optimizer=sgd)",
                   "distributed.devices='cpu:4' (read only with the kvstore backend)",
                   "distributed.compression='fp16' (read only with the horovod backend)",
                   "data.image_size=[32, 32] (read only with image files",
                   "optim.base_batch=512 (read only with optim.scale_lr=true)",
                   "eval.query_seed=3 (read only with eval.max_queries > 0)"):
        assert needle in out, out
    # A P x K job does not read train.batch_size; every key it sets, it reads.
    pk = ["sampler.kind=pk", "sampler.p=3", "sampler.k=2", "sampler.steps_per_epoch=3"]
    assert check_main(run_args(data, tmp_path / "run", *pk)) == 0
    out = capsys.readouterr().err
    assert "warning: keys this run does not read: train.batch_size=8 (read only with sampler.kind=offline" in out
    assert not any(f"sampler.{k}=" in out for k in ("p", "k", "steps_per_epoch")), out


def test_an_offline_epoch_bounded_by_one_small_class_is_named(tmp_path, capsys):
    """Adversarial trial: with one class of 5 among 3,203 rows an epoch was 2 steps of 4
    triplets, and nothing said so."""
    import numpy as np
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [60, 60, 4])
    np.savez(tmp_path / "imb.npz", x=rng.normal(size=(len(y), 6)).astype(np.float32), y=y,
             classes=np.array(["a", "b", "rare"]))
    args = [f"data.path={tmp_path / 'imb.npz'}", "data.test_fraction=0.25",
            f"output.dir={tmp_path / 'run'}", "train.batch_size=2"]
    capsys.readouterr()
    assert check_main(args) == 0
    line = capsys.readouterr().err.splitlines()[-1]
    # 'rare' keeps 2 of its 4 rows for training (the split's per-class rounding): an epoch
    # is 3 classes x (2 - 1) = 3 triplets of the 92 training rows.
    assert line.startswith("warning: an epoch makes 3 triplets from 92 training rows"), line
    assert "class 'rare' has 2 rows" in line
    assert check_main(args[:-1] + ["sampler.kind=pk", "sampler.p=2", "sampler.k=2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_ctrl_c_during_the_check_is_one_line_and_130(data, tmp_path, capsys, monkeypatch):
    """Ctrl-C while launch/horovod.sh's pre-flight read the data printed a KeyboardInterrupt
    traceback (the trainer and the launcher already said one line)."""
    import dist_triplet.check as check_mod

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(check_mod, "preflight", interrupted)
    assert check_main(run_args(data, str(tmp_path / "run"))) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: the check stopped; nothing was written"]
    assert not (tmp_path / "run").exists()


def test_pk_batches_drawn_with_replacement_are_named(tmp_path, capsys):
    """Adversarial trial: sampler.k=40 on 3 ranks over 32 rows a class drew each worker's
    k rows with replacement (160 rows, 43 distinct), silently. Named for the smallest
    class: a worker's share (local) or the class against workers x k (global)."""
    import numpy as np
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [40, 40, 16])        # training: 30, 30, 12 rows
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(len(y), 6)).astype(np.float32), y=y,
             classes=np.array(["a", "b", "small"]))
    args = [f"data.path={tmp_path / 'd.npz'}", "data.test_fraction=0.25",
            f"output.dir={tmp_path / 'run'}", "sampler.kind=pk", "sampler.p=2"]
    capsys.readouterr()
    assert check_main(args + ["sampler.k=4", "--processes", "3"]) == 0    # 12 // 3 = 4 >= 4
    assert "warning" not in capsys.readouterr().err
    assert check_main(args + ["sampler.k=5", "--processes", "3"]) == 0
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == ("warning: sampler.k=5: class 'small' has 12 rows, a worker's share 4 of 3 "
                    "workers: its k rows are drawn with replacement, so a positive can be the "
                    "anchor's own image (lower sampler.k)"), line
    assert check_main(args + ["sampler.k=5", "sampler.scope=global", "optim.optimizer=adam",
                              "--processes", "3"]) == 0
    assert "has 12 rows, fewer than the 15 a global batch takes" in capsys.readouterr().err


def test_augmentation_beyond_float32s_exact_indices_fails_in_the_check(tmp_path, capsys):
    """adv finding: 128x128x3 images with augment.pad=2 and train.batch_size=128 passed the
    check, then training failed after making the run directory, which blocked the corrected
    command. The limit (a device's rows a step x pixels < 2**24) is the check's too."""
    import numpy as np
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 80)              # 70 training rows a class: 138 triplets an epoch
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (160, 128, 128, 3), dtype=np.uint8),
             y=y)
    args = [f"data.path={tmp_path / 'd.npz'}", "data.test_fraction=0.125", "augment.pad=2",
            f"output.dir={tmp_path / 'run'}", "model.backbone=convnet", "train.batch_size=128"]
    capsys.readouterr()
    assert check_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: augmentation of 384 rows of (128, 128, 3) images per step: "
                          "18874368 pixels exceed float32's exact integers (2**24)"), err
    assert not (tmp_path / "run").exists()
    assert check_main(args + ["train.batch_size=64"]) == 0              # 9,437,184 pixels
    # Training alone (no launcher, no check) refuses it before making the run directory too.
    from dist_triplet.train import main as train_main
    assert train_main(args) == 2 and not (tmp_path / "run").exists()
