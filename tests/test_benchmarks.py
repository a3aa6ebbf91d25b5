"""The benchmark drivers (benchmarks/): their arithmetic by hand, and a ``--quick`` run.

The quick run checks the shape of what the benchmark reports, never how fast anything
was (no timed tests): every section's JSON has positive numbers, every target row is in
the one printed table with a status. It starts real ``horovodrun --gloo`` jobs (scaling,
the main job and the mining recipe on 2 ranks) on a tiny Fashion-MNIST-format data set
it writes, so it needs Horovod like tests/test_horovod_run.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _hvd import ROOT, child_env, require_horovod
from benchmarks.common import Row, table, target_row, time_windows
from benchmarks.scaling import summarise_timeline
from benchmarks.step import flops_per_triplet, gemm_shapes
from dist_triplet.config import Config
from dist_triplet.data import write_idx


def test_flops_per_triplet_by_hand():
    # Seed MLP 784 -> 256 -> 128: forward 2*(784*256 + 256*128) = 466,944 per row, weight
    # gradients the same, input gradient of layer 2 only 2*256*128 = 65,536; x 3 rows.
    assert flops_per_triplet([784, 256, 128]) == 3 * (2 * 466_944 + 65_536) == 2_998_272
    # The GEMMs the roofline times add up to the same count at any batch.
    for batch in (1, 7, 256):
        total = sum(2 * m * k * n for _, (m, k), (_, n) in gemm_shapes([784, 256, 128], batch))
        assert total == batch * flops_per_triplet([784, 256, 128])


def test_conv_flops_by_hand():
    from benchmarks.conv_step import conv_flops, conv_layers
    assert conv_layers([32, 64, 128]) == [(28, 28, 1, 32), (14, 14, 32, 64), (7, 7, 64, 128)]
    fwd = 2 * 9 * (28 * 28 * 1 * 32 + 14 * 14 * 32 * 64 + 7 * 7 * 64 * 128) + 2 * 128 * 128
    assert fwd == 14_935_040
    # Backward: input and weight gradients, but no input gradient for the first layer.
    import dataclasses
    avg = dataclasses.replace(Config().model, backbone="convnet", hidden=[128])
    assert conv_flops(avg) == 3 * fwd - 2 * 9 * 28 * 28 * 32 == 44_353_536
    # model.pool=flatten: the head reads 128 x 7 x 7 = 6,272 features instead of 128.
    flat = dataclasses.replace(avg, pool="flatten")
    assert conv_flops(flat) == 44_353_536 + 3 * 2 * (6272 - 128) * 128


def test_target_rows_and_table():
    assert target_row("s", "m", 0.8, 0.8, "{:.0%}").status == "met"        # the bound counts
    assert target_row("s", "m", 0.79, 0.8, "{:.0%}").status == "missed"
    low = target_row("s", "m", 3.5, 3.0, "{:.1f} s", higher=False, detail="x 1 s")
    assert (low.value, low.target, low.status) == ("3.5 s (x 1 s)", "<= 3.0 s", "missed")
    text = table([Row("a", "b", "c"), low]).splitlines()
    assert text[0] == "| section | measurement | value | target | status |"
    assert text[2] == "| a | b | c |  |  |" and text[3].endswith("| <= 3.0 s | missed |")


def test_time_windows_counts_every_item():
    calls = []
    res = time_windows({"r": calls.append}, per_step=10, warmup=2, windows=3,
                       window_steps=4)["r"]
    assert calls == [2, 4, 4, 4]                          # warm-up, then one per window
    assert len(res["windows"]) == 3 and res["median"] > 0 and res["cpu_us_per_item"] >= 0


def test_timeline_summary_pairs_begin_and_end(tmp_path):
    # Horovod leaves the JSON array open while it writes: the summary must close it.
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "horovod_allreduce.0"}},
              {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "horovod_broadcast.w"}}]
    for start, neg, red in ((0, 1000, 3000), (10000, 2000, 4000), (20000, 6000, 7000)):
        events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": start, "pid": 1},
                   {"ph": "E", "ts": start + neg, "pid": 1},
                   {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": start + neg, "pid": 1},
                   {"ph": "E", "ts": start + red, "pid": 1},
                   {"ph": "B", "name": "NEGOTIATE_BROADCAST", "ts": start, "pid": 2},
                   {"ph": "E", "ts": start + 50000, "pid": 2}]
    path = tmp_path / "timeline.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ",\n")
    out = summarise_timeline(str(path))
    assert set(out) == {"NEGOTIATE_ALLREDUCE", "GLOO_ALLREDUCE"}   # broadcasts left out
    assert out["NEGOTIATE_ALLREDUCE"]["count"] == 3
    assert out["NEGOTIATE_ALLREDUCE"]["median_ms"] == 2.0           # of 1, 2, 6 ms
    assert out["GLOO_ALLREDUCE"]["median_ms"] == 2.0                # of 2, 2, 1 ms


def _tiny_fashion_mnist(root):
    """600 training and 300 test 28 x 28 images of 10 classes, named as Debian's package."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 300)):
        labels = np.arange(n) % 10
        images = np.clip(rng.integers(0, 100, (n, 28, 28)) + 15 * labels[:, None, None], 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, gzip=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, gzip=True)
    return root


SECTIONS = {
    "triplets": ("seed_loop_s", "vectorised_s", "speedup", "shard_w4_fraction"),
    "step": ("flops_per_triplet", "roofline_gflops", "roofline_triplets_per_s",
             "roofline_fraction"),
    "scaling": ("efficiency", "reference_efficiency", "efficiency_vs_reference"),
    "end_to_end": ("setup_check_s", "main_wall_s", "main_train_s", "seed_wall_s",
                   "main_vs_seed", "train_share", "main_end_of_run_s"),
    "main_job": ("main_triplets_per_s", "main_vs_one"),
    "mining": ("global_vs_local",),
}
TARGET_ROWS = ("speed-up", "product step, 1 threads",
               "2-rank efficiency / reference efficiency", "main job training / one process",
               "main job / seed program", "training share", "per-epoch evaluation",
               "set-up check", "end-of-run work", "global / local mining")


def test_quick_benchmark_reports_every_section_and_target(tmp_path):
    require_horovod()
    data = _tiny_fashion_mnist(tmp_path / "fashion-mnist")
    (tmp_path / "data").mkdir()
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--synthetic", "--train-size", "600",
         "--batch-size", "16", "--threads", "1", "--no-peer", "--data-root", str(data),
         "--workdir", str(tmp_path / "data"), "--out", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["quick"] is True and doc["meta"]["skipped"] == {}
    for section, keys in SECTIONS.items():
        for key in keys:
            value = doc[section][key]
            assert isinstance(value, (int, float)) and value > 0, (section, key, value)
        assert doc[section]["foreign_cores"] >= 0
    # 600 rows, 60 per class: 590 triplets; the reference loop and the vectorised one agree.
    assert doc["triplets"]["triplets_seed"] == doc["triplets"]["triplets_vectorised"] == 590
    assert len(doc["scaling"]["two_ranks"]) == 2 and doc["end_to_end"]["main_epochs"] == 2

    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert proc.stdout.count("| section |") == 1                       # one table
    for name in TARGET_ROWS:
        row = [line for line in lines if name in line]
        assert len(row) == 1, f"table lacks the target row {name!r}:\n" + "\n".join(lines)
        assert row[0].endswith(("| met |", "| missed |")), row[0]


def test_peer_recipes_run_from_their_own_venv(tmp_path):
    """benchmarks/peer.py runs both peers (PyTorch's seed recipe, pytorch-metric-learning's
    semi-hard P x K) from the peers' venv when one is there; it never installs here."""
    from benchmarks import peer
    py = os.path.join(peer.default_venv(), "bin", "python")
    if not os.path.exists(py) or subprocess.run([py, "-c", peer.CHECK],
                                                capture_output=True).returncode != 0:
        pytest.skip(f"no peers' venv at {peer.default_venv()} (python -m benchmarks.peer "
                    "makes it; DIST_TRIPLET_PEER_VENV points elsewhere)")
    out = tmp_path / "peer.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peer", "--quick", "--synthetic", "--train-size",
         "600", "--threads", "1", "--batch-size", "16", "--out", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())["peer"]
    assert doc["seed"]["median"] > 0 and doc["pml"]["median"] > 0
    assert doc["seed"]["torch"].endswith("+cpu") and doc["pml"]["p"] == 10
