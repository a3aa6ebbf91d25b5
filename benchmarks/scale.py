"""Scale benchmark (issue 10): memory per rank against the data's size, sampling time at
1,000,000 labels, and evaluation time at 100,000 test items.

    python benchmarks/scale.py                                   # small: 20,000 images, seconds
    python benchmarks/scale.py --images 1000000 --test 100000    # the issue's case

Steps:

1. Generate a synthetic MNIST-format data set (raw IDX, ``--side`` x ``--side`` uint8,
   ``--classes`` balanced classes, class prototype + noise) under ``--workdir``, once
   (temp file + rename); never committed.
2. Time the samplers on the training labels (median of 3): ``ClassIndex``,
   ``create_pairs`` and ``pk_batches`` for rank 0 of ``--ranks``; also at 10 and
   N / 10 classes, so the class count's effect shows.
3. Build the shared cache once (``data.cache_dir``), timed.
4. Train one epoch with ``horovodrun -np --ranks --gloo`` for each ``--modes``:
   ``cache`` (every rank memory-maps the one cached copy) and ``memory`` (every rank reads
   its own uint8 copy). Each rank records its peak Rss, Pss and anonymous memory
   (benchmarks/_scale_worker.py); rank 0 evaluates the whole test set.

Prints a table and writes ``<workdir>/scale-<images>.json``. Times are wall-clock on a
shared machine: say how busy it was when quoting them.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks import common  # noqa: E402  (run as a script: needs ROOT on sys.path)
from benchmarks._scale_worker import proc_bytes  # noqa: E402

MiB = 2 ** 20


def _write_idx_stream(path: str, dims: tuple, chunks) -> None:
    """Write an IDX file (magic 2051 or 2049) from an iterator of uint8 chunks, atomically."""
    magic = 2051 if len(dims) == 3 else 2049
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack(f">I{len(dims)}I", magic, *dims))
        for chunk in chunks:
            fh.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
    os.replace(tmp, path)


def generate(root: str, n_train: int, n_test: int, side: int, classes: int, seed: int = 0,
             chunk: int = 50_000) -> float:
    """Write train-/t10k- IDX files into ``root`` unless present; returns seconds taken."""
    stems = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    if all(os.path.isfile(os.path.join(root, s)) for s in stems):
        return 0.0
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, side * side)).astype(np.float32)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % classes).astype(np.uint8 if classes <= 256
                                                                else np.int64)
        if classes > 256:
            raise ValueError("IDX labels are uint8: use --classes <= 256")

        def images():
            for start in range(0, n, chunk):
                lab = labels[start:start + chunk]
                noise = rng.integers(0, 256, size=(len(lab), side * side), dtype=np.uint8)
                yield np.rint(0.3 * protos[lab] + 0.7 * noise).astype(np.uint8)
        _write_idx_stream(os.path.join(root, f"{prefix}-images-idx3-ubyte"), (n, side, side),
                          images())
        _write_idx_stream(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), (n,), [labels])
    return time.perf_counter() - t0


def time_sampling(labels: np.ndarray, ranks: int, p: int, k: int) -> dict:
    """Median seconds of ClassIndex, create_pairs and one worker's epoch of pk_batches."""
    from dist_triplet.triplets import ClassIndex, create_pairs, pk_batches, pk_steps_per_epoch
    index = ClassIndex(labels)
    p = min(p, index.num_classes)
    steps = pk_steps_per_epoch(index, p, k, ranks)
    timed = common.median_time
    out = {"labels": int(len(labels)), "classes": index.num_classes,
           "class_index_s": timed(lambda: ClassIndex(labels)),
           "create_pairs_s": timed(lambda: create_pairs(index, seed=1, epoch=0, rank=0,
                                                        world_size=ranks)),
           "pk_steps": int(steps), "p": p, "k": k,
           "pk_batches_s": timed(lambda: pk_batches(index, p=p, k=k, steps=steps, seed=1,
                                                    epoch=0, rank=0, world_size=ranks))}
    out["triplets_per_rank"] = int(len(create_pairs(index, seed=1, rank=0, world_size=ranks)))
    return out


class HostMemory(threading.Thread):
    """Lowest MemAvailable (bytes) seen while running: the host's memory in use at peak,
    including other jobs on the machine (noisy)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.low = self.now()
        self.done = threading.Event()

    @staticmethod
    def now() -> int:
        return proc_bytes("/proc/meminfo", "MemAvailable")

    def run(self):
        while not self.done.is_set():
            self.low = min(self.low, self.now())
            self.done.wait(0.5)


def run_job(mode: str, args, data_dir: str, cache_dir: str, work: str) -> dict:
    out = os.path.join(work, f"run-{mode}-{args.images}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    overrides = [f"data.path={data_dir}", "data.format=idx", "distributed.backend=horovod",
                 f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                 "train.progress=false", "eval.projector=false", "checkpoint.keep=0",
                 f"output.dir={os.path.join(out, 'run')}", f"model.hidden={args.hidden}"]
    if mode == "cache":
        overrides.append(f"data.cache_dir={cache_dir}")
    if mode not in args.full_eval.split(","):
        overrides.append(f"data.limit_test={args.eval_limit}")  # evaluation timed elsewhere
    cmd = ["horovodrun", "-np", str(args.ranks), "-H", f"localhost:{args.ranks}", "--gloo",
           sys.executable, os.path.join(ROOT, "benchmarks", "_scale_worker.py"), out,
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.ranks)),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    host = HostMemory()
    base = host.low
    host.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    host.done.set()
    host.join()
    with open(os.path.join(out, "log.txt"), "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}); log: "
                           f"{os.path.join(out, 'log.txt')}\n{proc.stderr[-2000:]}")
    ranks = sorted((json.load(open(f)) for f in glob.glob(os.path.join(out, "mem_rank*.json"))),
                   key=lambda r: r["rank"])
    metrics = json.load(open(os.path.join(out, "run", "metrics.json")))
    final = metrics.get("final") or {}
    text = proc.stdout + proc.stderr
    raw = re.search(r"raw pixels:.*?\((\d+) queries, ([\d.]+) s\)", text)
    return {"mode": mode, "wall_s": wall, "ranks": ranks, "host_used_peak": base - host.low,
            "epoch": {k: v for k, v in final.items() if k.startswith("time_") or k in (
                "loss", "precision_at_1", "map_at_r", "queries", "triplets_per_s")},
            "raw_pixels_eval_s": float(raw.group(2)) if raw else None,
            "log": os.path.join(out, "log.txt")}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000, help="training images (1000000 "
                    "for the issue's case)")
    ap.add_argument("--test", type=int, default=2_000, help="test images (100000)")
    ap.add_argument("--side", type=int, default=28, help="image side in pixels")
    ap.add_argument("--classes", type=int, default=100, help="balanced classes, <= 256")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--hidden", default="[256,128]")
    ap.add_argument("--modes", default="cache,memory", help="comma list of cache, memory")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/dist_triplet_scale")
    ap.add_argument("--skip-runs", action="store_true", help="sampling only")
    ap.add_argument("--full-eval", default="cache", help="modes that evaluate the whole test "
                    "set; the others evaluate the first --eval-limit test items (the memory "
                    "of ranks 1.. does not depend on it)")
    ap.add_argument("--eval-limit", type=int, default=2000)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = os.path.abspath(args.workdir)
    data_dir = os.path.join(work, f"data-{args.images}-{args.test}-{args.side}-{args.classes}")
    cache_dir = os.path.join(work, "cache")
    report = {"args": vars(args), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    report["generate_s"] = generate(data_dir, args.images, args.test, args.side, args.classes)
    train_bytes = args.images * args.side * args.side
    report["data_bytes"] = {"train_uint8": train_bytes, "test_uint8": args.test * args.side ** 2,
                            "train_float32_before": 4 * train_bytes}
    print(f"data: {args.images} x {args.side}x{args.side} uint8 = {train_bytes / MiB:.0f} MiB "
          f"(float32 would be {4 * train_bytes / MiB:.0f} MiB); test {args.test}", flush=True)

    from dist_triplet.data import load_data, read_idx
    labels = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    report["sampling"] = [time_sampling(labels, args.ranks, args.p, args.k)]
    rng = np.random.default_rng(0)
    for c in (10, max(10, args.images // 10)):
        if c != args.classes:
            synth = rng.permutation(np.arange(args.images) % c)
            report["sampling"].append(time_sampling(synth, args.ranks, args.p, args.k))
    for s in report["sampling"]:
        print(f"sampling at {s['labels']} labels, {s['classes']} classes, rank 0 of "
              f"{args.ranks}: ClassIndex {s['class_index_s']:.3f} s, create_pairs "
              f"{s['create_pairs_s']:.3f} s ({s['triplets_per_rank']} triplets), pk_batches "
              f"{s['pk_batches_s']:.3f} s ({s['pk_steps']} steps of {s['p']}x{s['k']})",
              flush=True)

    modes = [m for m in args.modes.split(",") if m]
    if "cache" in modes and not args.skip_runs:
        cfg = SimpleNamespace(dataset="idx", root=None, path=data_dir, format="idx", mode="L",
                              image_size=None, split="fraction", test_fraction=0.2,
                              split_seed=0, cache_dir=cache_dir, limit_train=0, limit_test=0)
        t0 = time.perf_counter()
        splits = load_data(cfg)
        report["cache_build_s"] = time.perf_counter() - t0
        del splits
        gc.collect()
        print(f"cache: {report['cache_build_s']:.1f} s to decode once into {cache_dir}",
              flush=True)
    report["runs"] = []
    if not args.skip_runs:
        for mode in modes:
            res = run_job(mode, args, data_dir, cache_dir, work)
            report["runs"].append(res)
            pss = sum(r["peak_pss"] for r in res["ranks"])
            print(f"\n{mode}: {args.ranks} ranks, wall {res['wall_s']:.1f} s, epoch "
                  f"{json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res['epoch'].items()})}, "
                  f"raw-pixel eval {res['raw_pixels_eval_s']} s", flush=True)
            print("| rank | peak Rss MiB | peak Pss MiB | peak anonymous MiB | VmHWM MiB |")
            print("| --- | --- | --- | --- | --- |")
            for r in res["ranks"]:
                print(f"| {r['rank']} | {r['peak_rss'] / MiB:.0f} | {r['peak_pss'] / MiB:.0f} | "
                      f"{r['peak_anonymous'] / MiB:.0f} | {r['vm_hwm'] / MiB:.0f} |")
            print(f"sum of peak Pss {pss / MiB:.0f} MiB vs {args.ranks} x data "
                  f"{args.ranks * train_bytes / MiB:.0f} MiB (uint8) / "
                  f"{args.ranks * 4 * train_bytes / MiB:.0f} MiB (float32); host MemAvailable "
                  f"drop {res['host_used_peak'] / MiB:.0f} MiB (includes other jobs)", flush=True)
    report["load_after"] = os.getloadavg()
    path = os.path.join(work, f"scale-{args.images}.json")
    with open(f"{path}.tmp", "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(f"{path}.tmp", path)
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
