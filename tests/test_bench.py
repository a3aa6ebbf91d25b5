"""Smoke test of the benchmark (issue 4): ``--quick`` on tiny synthetic data.

It checks the shape of what the benchmark reports, never how fast anything was: the
JSON has every section with positive numbers and the printed table has every row. The
run includes the two real ``horovodrun --gloo`` jobs (1 and 2 ranks) of the scaling
section, so it needs Horovod like tests/test_horovod_run.py.
"""
from __future__ import annotations

import json
import subprocess
import sys


from _hvd import ROOT, child_env, require_horovod
from dist_triplet.bench import flops_per_triplet, gemm_shapes


SECTIONS = {
    "triplets": ("seed_loop_s", "vectorised_s", "speedup", "full_epoch_s", "shard_w4_s",
                 "shard_w4_fraction"),
    "throughput": ("product_triplets_per_s", "product_before_triplets_per_s",
                   "seed_style_triplets_per_s", "speedup"),
    "roofline": ("flops_per_triplet", "gemm_step_s", "gemm_gflops", "roofline_triplets_per_s",
                 "product_gflops", "fraction"),
    "scaling": ("one_rank_triplets_per_s", "two_rank_total_triplets_per_s", "efficiency"),
    "memory": ("floor_mb", "product_peak_mb", "seed_style_peak_mb", "ratio"),
}
ROWS = ("seed loop (reference)", "vectorised create_pairs", "rank shard at W=4",
        "seed-style pipeline", "product step", "FLOPs per triplet", "NumPy GEMM",
        "Horovod 1 rank", "Horovod 2 ranks, per rank", "Horovod 2 ranks, total", "efficiency",
        "seed-style peak RSS", "product peak RSS", "triplet generation", "batch gather",
        "forward/backward", "allreduce/wait", "optimizer update", "evaluation (rank 0)")


def test_flops_per_triplet_by_hand():
    # Seed MLP 784 -> 256 -> 128: forward 2*(784*256 + 256*128) = 466,944 per row, weight
    # gradients the same, input gradient of layer 2 only 2*256*128 = 65,536; x 3 rows.
    assert flops_per_triplet([784, 256, 128]) == 3 * (2 * 466_944 + 65_536) == 2_998_272
    # The GEMMs the roofline times add up to the same count at any batch.
    for batch in (1, 7, 256):
        total = sum(2 * m * k * n for _, (m, k), (_, n) in gemm_shapes([784, 256, 128], batch))
        assert total == batch * flops_per_triplet([784, 256, 128])


def test_quick_bench_reports_every_section(tmp_path):
    require_horovod()
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "dist_triplet.bench", "--quick", "--synthetic",
         "--train-size", "600", "--batch-size", "16", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["quick"] is True and "synthetic" in doc["meta"]["data"]
    for section, keys in SECTIONS.items():
        for key in keys:
            value = doc[section][key]
            assert isinstance(value, (int, float)) and value > 0, (section, key, value)
    assert len(doc["scaling"]["two_rank_per_rank_triplets_per_s"]) == 2
    phases = doc["epoch"]["phases_s"]
    assert set(phases) == {"triplet generation", "batch gather", "forward/backward",
                           "allreduce/wait", "optimizer update", "evaluation (rank 0)"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) > 0
    assert doc["epoch"]["pipelined_epoch_s"] > 0
    # 600 rows, 60 per class: 590 triplets; the reference loop and the vectorised one agree.
    assert doc["triplets"]["triplets_seed"] == doc["triplets"]["triplets_vectorised"] == 590

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | measurement | value | target | status |")
    text = "\n".join(table)
    for row in ROWS:
        assert row in text, f"table lacks the row {row!r}:\n{text}"
    assert proc.stdout.count("| section |") == 1  # one table
