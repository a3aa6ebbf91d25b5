"""Bad input through the command-line entry point ``main([...])``: each case exits with
status 2, prints ``error: ...`` naming the offending file, key or value, and writes
nothing: the run directory is not even created (train() reads and checks the data and the
config before it makes the run directory). Gzip under a raw name and the reverse just work.

Batch-size divisibility: no requirement exists. ``train.batch_size`` is per worker (a rank
or a kvstore device), so it never has to divide over devices, and a P x K batch is
``sampler.p x sampler.k`` by construction; what is checked is that a batch fits in a
worker's shard, that sizes are positive integers, and that k >= 2 for P x K.
"""
import gzip
import json
import os

import numpy as np
import pytest

pytest.importorskip("mxnet")

from _ckpt_util import run_args, write_dataset  # noqa: E402
from _ckpt_util import _fresh_logging, data  # noqa: E402,F401  (fixtures; _fresh_logging is autouse)
from dist_triplet.data import write_idx  # noqa: E402
from dist_triplet.train import main  # noqa: E402

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"


def fails(capsys, args, *needles, out_dir=None, fn=None):
    """(fn or train's) main(args) returns 2, its error names every needle, and out_dir
    was not created."""
    capsys.readouterr()
    assert (fn or main)(args) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line, err[-2000:]
    for needle in needles:
        assert needle in line[-1], (needle, line[-1])
    if out_dir is not None:
        assert not os.path.exists(out_dir), os.listdir(out_dir)
    return line[-1]


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("layout", ["gzip_under_raw_names", "raw_under_gz_names"])
def test_compression_by_content_not_name_just_works(layout, tmp_path):
    plain = write_dataset(tmp_path / "plain")
    odd = str(tmp_path / "odd")
    os.makedirs(odd)
    for name in os.listdir(plain):
        with open(os.path.join(plain, name), "rb") as src:
            raw = src.read()
        if layout == "gzip_under_raw_names":
            name, raw = name, gzip.compress(raw)
        else:
            name = name + ".gz"
        with open(os.path.join(odd, name), "wb") as dst:
            dst.write(raw)
    losses = []
    for root, out in ((plain, tmp_path / "run_plain"), (odd, tmp_path / "run_odd")):
        assert main(run_args(root, out, "train.epochs=1")) == 0
        with open(out / "metrics.json") as fh:
            losses.append(json.load(fh)["final"]["loss"])
    assert losses[0] == losses[1]  # the same data, whatever the file names say


def _corrupt(root, how):
    """Break the training images (or labels) file of ``root`` in the way named ``how``."""
    path = os.path.join(root, TRAIN_IMAGES)
    raw = open(path, "rb").read()
    if how == "wrong_magic":
        raw = b"\x00\x00\x08\x04" + raw[4:]                  # 2052: 4 dimensions
    elif how == "short_header":
        raw = raw[:6]                                        # magic + half a dimension
    elif how == "truncated_payload":
        raw = raw[:-10]
    elif how == "html_as_gz":
        os.remove(path)
        path += ".gz"
        raw = b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"
    elif how == "count_mismatch":
        path = os.path.join(root, TRAIN_LABELS)
        write_idx(path, np.arange(80) % 4)
        return path
    elif how == "corrupt_gzip":
        raw = gzip.compress(raw)[:-20]
    with open(path, "wb") as fh:
        fh.write(raw)
    return path


@pytest.mark.parametrize("how, needles", [
    ("wrong_magic", ["not an IDX file", "magic found = 2052"]),
    ("short_header", ["expected an IDX header of 16 bytes for 3 dimensions, found 6 bytes"]),
    ("truncated_payload", ["expected 1344 payload bytes", "found 1334 (truncated)"]),
    ("html_as_gz", ["not an IDX file", "<!DOCTYP"]),
    ("corrupt_gzip", ["corrupt or truncated"]),
    ("count_mismatch", ["count mismatch", "holds 84 images but", "holds 80 labels"]),
])
def test_broken_idx_file(how, needles, data, tmp_path, capsys):
    path = _corrupt(data, how)
    out = tmp_path / "run"
    fails(capsys, run_args(data, out), path, *needles, out_dir=out)


def test_labels_out_of_range_for_class_names(tmp_path, capsys):
    """fashion_mnist has 10 class names: a label 12 in its directory is refused."""
    root = write_dataset(tmp_path / "fmnist")
    labels = np.arange(84) % 4
    labels[5] = 12
    write_idx(os.path.join(root, TRAIN_LABELS), labels)
    out = tmp_path / "run"
    args = run_args(root, out)
    args[0] = "data.dataset=fashion_mnist"
    fails(capsys, args, os.path.join(root, TRAIN_LABELS), "labels in [0, 10)", "found label 12",
          out_dir=out)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_one_class(split, data, tmp_path, capsys):
    n = 84 if split == "train" else 40
    write_idx(os.path.join(data, f"{split}-labels-idx1-ubyte"), np.zeros(n, np.uint8))
    out = tmp_path / "run"
    what = "training" if split == "train" else "test"
    fails(capsys, run_args(data, out), f"{what} split ({data})", "at least 2 classes",
          "found 1 class(es): [0]", out_dir=out)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_class_with_one_sample(split, data, tmp_path, capsys):
    n = 84 if split == "train" else 40
    labels = np.arange(n) % 3
    labels[7] = 3                                   # class 3: a single sample
    write_idx(os.path.join(data, f"{split}-labels-idx1-ubyte"), labels)
    out = tmp_path / "run"
    what = "training" if split == "train" else "test"
    fails(capsys, run_args(data, out), f"{what} split ({data})", "class 3 has 1 sample(s)",
          out_dir=out)


def test_train_and_test_image_sizes_differ(tmp_path, capsys):
    root = write_dataset(tmp_path / "data")
    other = write_dataset(tmp_path / "big", side=5)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.replace(os.path.join(other, name), os.path.join(root, name))
    out = tmp_path / "run"
    fails(capsys, run_args(root, out), "test images", "25 pixels", "16", out_dir=out)


@pytest.mark.parametrize("extra, needles", [
    # 84 rows, 4 classes of 21 -> 80 triplets per epoch for the single worker.
    # The message says where the 80 come from (second trial: it blamed the data size alone
    # when one small class cut the epoch).
    (["train.batch_size=100"], ["train.batch_size=100", "only 80 triplets per epoch",
                                "an epoch is 4 classes x (smallest class - 1) and the "
                                "smallest has 21"]),
    # kvstore over 2 CPU devices: 2 workers x 48 = 96 triplets per step > 80.
    (["train.batch_size=48", "distributed.backend=kvstore", "distributed.devices=cpu:2"],
     ["train.batch_size=48 x 2 device(s) = 96", "only 80 triplets"]),
    (["sampler.kind=pk", "sampler.p=5", "sampler.k=2"], ["sampler.p=5", "only 4 classes"]),
])
def test_fewer_samples_than_workers_times_batch(extra, needles, data, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, run_args(data, out, *extra), *needles, out_dir=out)


# ----------------------------------------------------------------------------- data directory

def test_missing_data_directory_says_how_to_get_the_data(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    out = tmp_path / "run"
    args = run_args(missing, out)
    args[0] = "data.dataset=fashion_mnist"
    fails(capsys, args, f"data directory {missing} does not exist",
          "apt-get install dataset-fashion-mnist", "data.root=DIR", out_dir=out)
    fails(capsys, run_args(missing, out), f"data directory {missing} does not exist",
          "train-images-idx3-ubyte", out_dir=out)


def test_missing_file_in_data_directory(data, tmp_path, capsys):
    os.remove(os.path.join(data, "t10k-labels-idx1-ubyte"))
    out = tmp_path / "run"
    fails(capsys, run_args(data, out), os.path.join(data, "t10k-labels-idx1-ubyte"),
          out_dir=out)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, needles", [
    ("train.epoch=3", ["unknown key 'train.epoch'", "epochs"]),
    ("trian.epochs=3", ["unknown section 'trian'"]),
    ("train.epochs=two", ["train.epochs must be an integer, got 'two'"]),
    ("train.batch_size=2.5", ["train.batch_size must be an integer, got 2.5"]),
    ("train.batch_size=0", ["train.batch_size=0 must be > 0"]),
    ("model.hidden=16", ["model.hidden must be a list, got 16"]),
    ("loss.margin=-1", ["loss.margin=-1.0 must be >= 0"]),
    ("optim.lr=0", ["optim.lr=0.0 must be > 0"]),
    ("optim.lr=-0.1", ["optim.lr=-0.1 must be > 0"]),
    ("optim.lr=nan", ["optim.lr must be a finite number"]),
    ("optim.optimizer=adagrad", ["optim.optimizer='adagrad' is not one of sgd, adam"]),
    ("sampler.k=1", ["sampler.k=1 must be >= 2"]),
    ("checkpoint.keep=-1", ["checkpoint.keep=-1 must be >= 0"]),
])
def test_bad_config_value_names_the_key(override, needles, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(data, out, override)
    if override.startswith("sampler.k"):
        args.append("sampler.kind=pk")
    fails(capsys, args, *needles, out_dir=out)


def test_exponent_floats_parse(data, tmp_path):
    """YAML 1.1 leaves 1e-3 a string; the config still reads it as a number."""
    out = tmp_path / "run"
    assert main(run_args(data, out, "optim.lr=1e-3", "train.epochs=1")) == 0
    assert "lr: 0.001" in (out / "config.yaml").read_text()


def test_data_file_that_is_a_directory_says_so(tmp_path, capsys):
    """adv1 cosmetic: a directory in place of an IDX file was reported as missing."""
    root = write_dataset(tmp_path / "data")
    os.remove(os.path.join(root, TRAIN_LABELS))
    os.mkdir(os.path.join(root, TRAIN_LABELS))
    fails(capsys, run_args(root, tmp_path / "run"),
          f"{os.path.join(root, TRAIN_LABELS)}: is a directory", out_dir=tmp_path / "run")


def test_missing_config_file(tmp_path, capsys):
    fails(capsys, ["--config", str(tmp_path / "nope.yaml")],
          f"config file '{tmp_path / 'nope.yaml'}' does not exist")


@pytest.mark.parametrize("text, needles", [
    ("train: [epochs: 3\n", ["not valid YAML"]),
    ("train:\n  epoch: 3\n", ["unknown key 'train.epoch'"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("train: 3\n", ["section 'train' must be a mapping"]),
])
def test_malformed_config_file_names_the_file(text, needles, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    fails(capsys, ["--config", str(path)], str(path), *needles)


def test_config_file_that_is_a_directory_or_not_utf8_or_bad_yaml_is_one_line(tmp_path, capsys):
    """adv1 cosmetics: --config DIR said "does not exist"; a non-UTF-8 file gave a codec
    message naming no file; a YAML syntax error spread over four lines."""
    fails(capsys, ["--config", str(tmp_path)], f"config file '{tmp_path}' is a directory")
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train: {epochs: 3}  # caf\xe9\n".encode("latin-1"))
    fails(capsys, ["--config", str(path)], str(path), "not UTF-8 text")
    path = tmp_path / "syntax.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    capsys.readouterr()
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # PyYAML reports the unclosed flow sequence at the end of the stream: line 4, column 1.
    assert err[0].startswith(f"error: {path}: not valid YAML: line 4, column 1: "), err


def test_empty_resume_is_refused(data, tmp_path, capsys):
    """checkpoint.resume= (empty) used to mean a fresh start, silently."""
    fails(capsys, run_args(data, tmp_path / "run", "checkpoint.resume="),
          "checkpoint.resume='' is empty", out_dir=tmp_path / "run")


def test_override_values_lose_surrounding_whitespace(data, tmp_path):
    """output.dir=" DIR " is DIR (as a plain YAML scalar in a file would be)."""
    out = tmp_path / "run"
    assert main(run_args(data, f"  {out}  ", "train.epochs= 1 ", "eval.report=false")) == 0
    assert (out / "config.yaml").exists()


def test_resume_auto_needs_an_output_dir(data, capsys):
    args = [a for a in run_args(data, "x") if not a.startswith("output.dir")]
    fails(capsys, args + ["checkpoint.resume=auto"], "checkpoint.resume='auto' needs output.dir")


def test_resume_from_a_path_that_is_not_a_checkpoint(data, tmp_path, capsys):
    bogus = tmp_path / "old" / "checkpoints" / "epoch-0003"
    bogus.mkdir(parents=True)
    out = tmp_path / "run"
    fails(capsys, run_args(data, out, f"checkpoint.resume={bogus}"), str(bogus),
          "not a complete checkpoint directory", out_dir=out)


# ----------------------------------------------------------------------------- run directory

def test_output_dir_that_is_a_file(data, tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    fails(capsys, run_args(data, path), f"output.dir={str(path)!r} is an existing file")
    fails(capsys, run_args(data, path / "run"), f"output.dir={str(path / 'run')!r} is inside",
          "an existing file")
    assert path.read_text() == "not a directory"


@pytest.mark.parametrize("out", ["/proc/dist_triplet_test/run", "/sys/dist_triplet_test_run"])
def test_output_dir_that_cannot_be_created_is_one_line_before_the_model(out, data, capsys):
    """adv1 finding: an output.dir that cannot be made (here: under /proc or /sys, where
    mkdir fails for root too) was a PermissionError traceback from the Recorder, after the
    model was built and the raw-pixel baseline evaluated. Rank 0 now makes the directory
    in rundir.make_run_dir (shared by dist.decide_on_rank0), so every rank gets the same one line."""
    top = "/" + out.split("/")[1]
    if not os.path.isdir(top):
        pytest.skip(f"{top} does not exist here")
    try:
        os.makedirs(out)
    except OSError:
        pass
    else:
        os.rmdir(out)
        pytest.skip(f"{out} can be created here")
    line = fails(capsys, run_args(data, out), f"error: output.dir={out!r}: cannot create")
    assert "Traceback" not in line


def test_run_dir_in_use_by_another_run_is_refused(data, tmp_path, capsys):
    """Two runs in one output.dir would overwrite each other's checkpoints: the run holds
    an exclusive flock on RUN/.lock; a second run gets exit 2 naming the holder's pid.
    The lock dies with its process, and this run's failure leaves the directory as it was."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("424242\n")
        holder.flush()
        fails(capsys, run_args(data, out, "checkpoint.resume=auto"),
              f"error: output.dir={str(out)!r}: another run (pid 424242) is using it")
        assert os.listdir(out) == [".lock"]
        # The pre-flight check says so too (it passed, and the ranks then failed).
        from dist_triplet.check import main as check_main
        fails(capsys, run_args(data, out, "checkpoint.resume=auto"),
              f"error: output.dir={str(out)!r}: another run (pid 424242) is using it",
              fn=check_main)
        assert os.listdir(out) == [".lock"] and (out / ".lock").read_text() == "424242\n"
    # Released (as when the holder dies): the same run now trains.
    assert main(run_args(data, out, "checkpoint.resume=auto", "train.epochs=1",
                         "eval.report=false")) == 0
    assert "config.yaml" in os.listdir(out)


def test_run_failing_after_making_its_run_dir_removes_it(data, tmp_path, capsys):
    """The run directory is made before resume is resolved; a refusal after that (here:
    resume from a path that is no checkpoint) must not leave an empty directory behind."""
    out = tmp_path / "new" / "run"
    fails(capsys, run_args(data, out, f"checkpoint.resume={tmp_path}"), out_dir=out)


def test_empty_output_dir_names_the_key(data, capsys):
    fails(capsys, run_args(data, ""), "output.dir='' is empty")


def test_fresh_run_into_a_directory_holding_a_run_is_refused(data, tmp_path, capsys):
    """A run that died before its first checkpoint still owns its directory."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {hidden: [32]}\n")
    fails(capsys, run_args(data, out), "already holds a run (config.yaml)",
          "checkpoint.resume=auto")
    assert sorted(os.listdir(out)) == [".lock", "config.yaml"]  # + the run lock
    # resume=auto with no checkpoint restarts only a run of the same architecture.
    fails(capsys, run_args(data, out, "checkpoint.resume=auto"), "holds no checkpoint",
          "model.hidden was [32], is [16, 8] now")
    assert sorted(os.listdir(out)) == [".lock", "config.yaml"]  # + the run lock


def test_generated_run_dirs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    from dist_triplet import rundir
    from dist_triplet.config import load_config
    from dist_triplet.dist import decide_on_rank0, make_backend
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20240101-000000")
    cfg = load_config(None, [f"output.root={tmp_path}", "output.name=x"])
    backend = make_backend("local", "cpu")
    dirs = [decide_on_rank0(backend, lambda: rundir.make_run_dir(cfg), "run_dir")
            for _ in range(3)]
    assert dirs == [str(tmp_path / "x-20240101-000000"), str(tmp_path / "x-20240101-000000-2"),
                    str(tmp_path / "x-20240101-000000-3")]
    assert all(os.path.isdir(d) for d in dirs)


@pytest.mark.parametrize("backend", ["local", "kvstore"])
def test_non_horovod_backend_under_horovodrun_is_refused(backend, data, tmp_path, capsys,
                                                         monkeypatch):
    """horovodrun -np 2 with backend local would start two independent 'rank 0' runs."""
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    monkeypatch.setenv("HOROVOD_RANK", "0")
    out = tmp_path / "run"
    extra = ["distributed.backend=kvstore", "distributed.devices=cpu:1"] if backend == "kvstore" \
        else ["distributed.backend=local"]
    fails(capsys, run_args(data, out, *extra), f"distributed.backend={backend}", "one of 2",
          "add distributed.backend=horovod", out_dir=out)
    # The other ranks find the same error and exit with the same status, silently.
    monkeypatch.setenv("HOROVOD_RANK", "1")
    assert main(run_args(data, out, *extra)) == 2
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- P x K, seeds

@pytest.mark.parametrize("extra, needles", [
    (["sampler.p=1"], ["sampler.p=1 must be >= 2"]),
    (["sampler.p=5"], ["sampler.p=5 but the training set has only 4 classes"]),
    (["distributed.backend=kvstore", "distributed.devices=cpu:4"],
     ["world size 1 x 4 device(s) = 4 workers", "smallest training class has only 3"]),
])
def test_pk_sampler_checks_before_the_run_dir(extra, needles, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", per_class=3)
    out = tmp_path / "run"
    line = fails(capsys, run_args(data, out, "sampler.kind=pk", "sampler.p=2", "sampler.k=2",
                                  *extra), *needles, out_dir=out)
    assert "batch-hard" not in line


@pytest.mark.parametrize("key", ["train.seed", "eval.triplet_seed"])
def test_negative_seed_names_the_key(key, data, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, run_args(data, out, f"{key}=-1"), f"{key}=-1 must be >= 0", out_dir=out)


def test_main_leaves_horovod_after_an_error(data, tmp_path, capsys, monkeypatch):
    """main() shuts Horovod down itself, so its atexit hook has nothing to complain about."""
    from dist_triplet import dist
    calls = []
    monkeypatch.setattr(dist, "shutdown", lambda: calls.append(1))
    out = tmp_path / "run"
    fails(capsys, run_args(tmp_path / "nowhere", out), "nowhere", out_dir=out)
    assert calls == [1]
