"""The job's plan (dist_triplet/plan.py): the same shape for the pre-flight check and the
ranks, computed without MXNet."""
import subprocess
import sys

import pytest

from _ckpt_util import run_args, write_dataset
from _hvd import ROOT, child_env
from dist_triplet.config import load_config
from dist_triplet.plan import JobShape, batch_note, make_plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 4 classes x 21 train / 10 test images of 4 x 4.
    return write_dataset(tmp_path_factory.mktemp("plan") / "data")


def test_plan_of_a_launched_job(data, tmp_path):
    cfg = load_config(None, run_args(data, tmp_path / "run"))   # offline, batch 8 per worker
    plan = make_plan(cfg, processes=2)
    assert plan.backend == "horovod"                   # auto under a 2-process launcher
    assert (len(plan.train), len(plan.test)) == (84, 40)
    assert plan.job.num_workers == 2 and plan.global_batch == 2 * 8
    # Each rank's shard: 84 rows / 2 ranks, triplets per class limited by the smallest
    # class share (21 // 2 = 10 per class) -> 40 triplets per rank, 5 steps of 8.
    assert plan.steps == 5
    assert plan.run_dir == str(tmp_path / "run")
    alone = make_plan(cfg, processes=1)
    assert (alone.backend, alone.global_batch, alone.steps) == ("local", 8, 10)


def test_the_plan_of_each_rank_has_the_same_shape(data, tmp_path):
    cfg = load_config(None, run_args(data, tmp_path / "run"))
    shapes = {(p.steps, p.global_batch) for p in
              (make_plan(cfg, JobShape(2, 1, rank=r), environ={"HOROVOD_SIZE": "2"})
               for r in range(2))}
    assert shapes == {(5, 16)}


def test_kvstore_devices_count_as_workers(data, tmp_path):
    cfg = load_config(None, run_args(data, tmp_path / "run", "distributed.backend=kvstore",
                                     "distributed.devices=cpu:2"))
    plan = make_plan(cfg, processes=1)
    assert (plan.backend, plan.job.num_workers, plan.global_batch) == ("kvstore", 2, 16)


def test_a_conflicting_backend_is_refused_by_the_plan(data, tmp_path):
    cfg = load_config(None, run_args(data, tmp_path / "run", "distributed.backend=local"))
    with pytest.raises(ValueError, match="distributed.backend=local but this process is one "
                                         "of 3"):
        make_plan(cfg, processes=3)


def test_batch_note_only_when_the_global_batch_grows_at_a_fixed_rate():
    cfg = load_config(None, [])
    assert batch_note(cfg, 1, 256) is None
    assert batch_note(cfg, 4, 1024) == (
        "global batch 1024 triplets (4 workers x 256) at lr 0.05; optim.scale_lr is off: "
        "the same config on another number of workers trains with another global batch at "
        "this rate (optim.scale_lr=true scales lr by global batch / optim.base_batch=256)")
    assert batch_note(load_config(None, ["optim.scale_lr=true"]), 4, 1024) is None
    pk = load_config(None, ["sampler.kind=pk", "sampler.p=4", "sampler.k=2"])
    assert batch_note(pk, 2, 16).startswith("global batch 16 images (2 workers x 8)")


def test_planning_imports_neither_mxnet_nor_horovod(data, tmp_path):
    code = ("import sys; from dist_triplet.config import load_config; "
            "from dist_triplet.plan import make_plan; import dist_triplet.check; "
            f"make_plan(load_config(None, {run_args(data, tmp_path / 'run')!r}), processes=2); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mxnet', 'horovod')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_by_class_split_over_a_given_test_split_with_seen_classes_warns(tmp_path, caplog):
    """New-user trial: data.split=classes on a CSV with a split column trained on its own
    rows, test classes seen in training, without a word."""
    pytest.importorskip("PIL")
    from _data_util import make_images, write_folder
    from dist_triplet.plan import load_splits
    images, labels = make_images(6, 4, 4, 4, 3)
    paths = write_folder(tmp_path / "d", images, labels)
    rows = [f"{p},{lab},{'test' if i % 3 == 0 else 'train'}"
            for i, (p, lab) in enumerate(zip(paths, labels))]
    (tmp_path / "d.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, [f"data.path={tmp_path / 'd.csv'}", "data.split=classes"])
    with caplog.at_level("WARNING", logger="dist_triplet"):
        load_splits(cfg)
    assert "data.split=classes, but 4 of the 4 test classes are training classes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dist_triplet"):
        load_splits(load_config(None, [f"data.path={tmp_path / 'd'}", "data.split=classes",
                                       "data.test_fraction=0.5"]))
    assert "data.split=classes" not in caplog.text     # split by class here: nothing seen
