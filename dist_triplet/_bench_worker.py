"""Subprocess side of ``dist_triplet.bench``: one measurement per process, one JSON line out.

    python -m dist_triplet._bench_worker gemm   --threads T --widths 784,256,128 ...
    python -m dist_triplet._bench_worker memory --what floor|product|seed --steps N ...
    python -m dist_triplet._bench_worker seed   --warmup W --windows K --window-steps S ...
    python -m dist_triplet._bench_worker solo   --warmup W --windows K --window-steps S ...
    horovodrun -np N -H localhost:N --gloo python -m dist_triplet._bench_worker hvd ...

Each prints ``BENCH_JSON {...}`` (every rank, for ``hvd``). Thread counts come from the
environment the parent sets (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS), read once when NumPy
and MXNet load, which is why these run in their own processes. Not part of the product.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from . import bench


def emit(doc: dict) -> None:
    print(bench.JSON_MARK + json.dumps(doc), flush=True)


def gemm(args) -> None:
    """NumPy float32 GEMM time at the training step's shapes (see bench section 3)."""
    widths = [int(w) for w in args.widths.split(",")]
    rng = np.random.default_rng(0)
    rows, total_s, total_flops = [], 0.0, 0
    for name, (m, k), (k2, n) in bench.gemm_shapes(widths, args.batch_size):
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((k2, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        for _ in range(3):
            np.dot(a, b, out=out)
        inner = max(1, int(2e-2 / max(1e-6, _once(a, b, out))))  # ~20 ms per sample
        samples = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                np.dot(a, b, out=out)
            samples.append((time.perf_counter() - t0) / inner)
        sec = bench.median(samples)
        flops = 2 * m * k * n
        rows.append({"name": name, "shape": f"({m},{k})x({k2},{n})", "ms": 1e3 * sec,
                     "gflops": flops / sec / 1e9})
        total_s += sec
        total_flops += flops
    emit({"gemm": rows, "step_gemm_s": total_s, "gflops": total_flops / total_s / 1e9,
          "blas": bench.blas_info()})


def _once(a, b, out) -> float:
    t0 = time.perf_counter()
    np.dot(a, b, out=out)
    return time.perf_counter() - t0


def memory(args) -> None:
    """Peak RSS of one pipeline on the training set (see bench section 5)."""
    import mxnet as mx
    mx.nd.zeros((1,)).wait_to_read()
    if args.what == "floor":
        emit({"what": "floor", "peak_rss_mb": bench.peak_rss_mb(), "rss_mb": bench.rss_mb()})
        return
    images, labels, source = bench.load_data(args.synthetic, args.train_size)
    cfg = bench.make_cfg(args.batch_size)
    if args.what == "product":
        from .dist import make_backend
        _, stepper, sampler = bench.build_product(cfg, make_backend("local", "cpu"), images,
                                                  labels)
        del images  # train.train keeps no other use of the host copy either
        loop = bench.ProductLoop(cfg, stepper, sampler)
    else:
        from .triplets import create_pairs
        loop = bench.SeedStyleLoop(cfg, images, create_pairs(labels, seed=cfg.train.seed),
                                   mx.cpu())
        del images
    loop.run(args.steps)
    mx.nd.waitall()
    emit({"what": args.what, "data": source, "peak_rss_mb": bench.peak_rss_mb(),
          "rss_mb": bench.rss_mb()})


def hvd(args) -> None:
    """One rank of the scaling job; with --profile also the per-phase epoch breakdown."""
    import mxnet as mx

    from .dist import make_backend

    backend = make_backend("horovod", "cpu")
    images, labels, source = bench.load_data(args.synthetic, args.train_size)
    cfg = bench.make_cfg(args.batch_size, "horovod")
    net, stepper, sampler = bench.build_product(cfg, backend, images, labels)
    loop = bench.ProductLoop(cfg, stepper, sampler)
    res = bench.time_windows({"product": loop.run}, args.batch_size, args.warmup,
                             args.windows, args.window_steps, mx.nd.waitall)["product"]
    doc = {"rank": backend.rank, "world_size": backend.world_size,
           "triplets_per_s": res["median"], "windows": res["windows"],
           "step_ms": res["step_ms"], "cores": res["cores"], "steps_per_epoch": sampler.steps}
    if backend.world_size > 1:
        doc["allreduce_ms"] = bare_allreduce_ms(stepper)
    if args.profile:
        doc["profile"] = profile_epoch(args, cfg, backend, net, stepper, sampler, res["step_ms"])
    backend.barrier()
    emit(doc)


def bare_allreduce_ms(stepper, reps: int = 30) -> float:
    """Median ms of one allreduce of the step's gradients with nothing else running (every
    rank must call it): the collective's own cost, to set against the in-loop step time."""
    import mxnet as mx
    times = []
    for _ in range(reps + 5):
        mx.nd.waitall()
        t0 = time.perf_counter()
        stepper.trainer.allreduce_grads()
        mx.nd.waitall()
        times.append(time.perf_counter() - t0)
    return 1e3 * bench.median(times[5:])


def seed_style(args) -> None:
    """The seed-style pipeline's throughput (bench section 2), in a process of its own: run
    in the benchmark's process, its per-batch allocations slowed the product's windows
    interleaved with it by a third (measured), which is no property of either."""
    import mxnet as mx

    from .triplets import create_pairs

    images, labels, _ = bench.load_data(args.synthetic, args.train_size)
    cfg = bench.make_cfg(args.batch_size)
    loop = bench.SeedStyleLoop(cfg, images, create_pairs(labels, seed=cfg.train.seed), mx.cpu())
    del images
    res = bench.time_windows({"seed": loop.run}, args.batch_size, args.warmup, args.windows,
                             args.window_steps, mx.nd.waitall)["seed"]
    emit({"triplets_per_s": res["median"], "windows": res["windows"], "cores": res["cores"],
          "step_ms": res["step_ms"]})


def solo(args) -> None:
    """The product loop alone, local backend (bench section 4 runs two of these at once to
    show what the cores give two independent processes, without Horovod)."""
    import mxnet as mx

    from .dist import make_backend

    images, labels, _ = bench.load_data(args.synthetic, args.train_size)
    cfg = bench.make_cfg(args.batch_size)
    _, stepper, sampler = bench.build_product(cfg, make_backend("local", "cpu"), images, labels)
    res = bench.time_windows({"product": bench.ProductLoop(cfg, stepper, sampler).run},
                             args.batch_size, args.warmup, args.windows, args.window_steps,
                             mx.nd.waitall)["product"]
    emit({"triplets_per_s": res["median"], "windows": res["windows"], "cores": res["cores"]})


def profile_epoch(args, cfg, backend, net, stepper, sampler, step_ms: float) -> dict:
    """Phases of one epoch with an explicit wait after each (bench section 6).

    Every rank runs the steps (the allreduce needs all); rank 0 also evaluates once.
    """
    import mxnet as mx

    wait = mx.nd.waitall
    steps = sampler.steps if args.profile_steps <= 0 else min(args.profile_steps, sampler.steps)
    t = {"triplet generation": 0.0, "batch gather": 0.0, "forward/backward": 0.0,
         "allreduce/wait": 0.0, "optimizer update": 0.0}
    wait()
    t0 = time.perf_counter()
    batches = sampler.epoch(99)
    t["triplet generation"] = time.perf_counter() - t0
    pixels = stepper.pixels[0]
    B = args.batch_size
    for s in range(steps):
        t0 = time.perf_counter()
        idx = stepper.device_batches(batches[s])               # host -> device indices
        mx.nd.take(pixels, idx[0]).wait_to_read()               # the gather alone
        t1 = time.perf_counter()
        with mx.autograd.record():
            loss = stepper.block(pixels, idx[0])                # gather + forward
        mx.autograd.backward([loss])
        wait()
        t2 = time.perf_counter()
        stepper.trainer.allreduce_grads()
        wait()
        t3 = time.perf_counter()
        stepper.trainer.update(B)
        wait()
        t4 = time.perf_counter()
        t["batch gather"] += t1 - t0
        t["allreduce/wait"] += t3 - t2
        t["optimizer update"] += t4 - t3
        # The hybridized step gathers too: take its share out of forward/backward.
        t["forward/backward"] += max(0.0, (t2 - t1) - (t1 - t0))
    scale = sampler.steps / steps
    for key in ("batch gather", "forward/backward", "allreduce/wait", "optimizer update"):
        t[key] *= scale
    eval_s = 0.0
    if backend.is_main:
        from .data import Split
        from .evaluate import Evaluator
        timages, tlabels, source = bench.load_data(args.synthetic, args.train_size, train=False)
        ev = Evaluator(cfg, Split(timages, tlabels, tuple(map(str, range(bench.CLASSES))), source))
        t0 = time.perf_counter()
        ev(net, stepper.ctxs[0])
        eval_s = time.perf_counter() - t0
    t["evaluation (rank 0)"] = eval_s
    return {"steps": sampler.steps, "profiled_steps": steps, "phases_s": t,
            "pipelined_epoch_s": t["triplet generation"] + sampler.steps * step_ms / 1e3 + eval_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_triplet._bench_worker")
    p.add_argument("mode", choices=("gemm", "memory", "hvd", "solo", "seed"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-size", type=int, default=0)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--widths", default="784,256,128")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--what", choices=("floor", "product", "seed"), default="product")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-steps", type=int, default=0, help="0 = a whole epoch")
    args = p.parse_args(argv)
    {"gemm": gemm, "memory": memory, "hvd": hvd, "solo": solo, "seed": seed_style}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
