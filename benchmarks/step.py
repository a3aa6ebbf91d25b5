"""One process: the product's training step against this machine's GEMM limit and PyTorch.

    python -m benchmarks.step [--quick] [--threads 2] [--batch-size 256] [--out FILE]

Three measurements, each in a subprocess of its own (thread pools are sized when MXNet
and NumPy load):

1. **Product step** (triplets/s): ``engine.run_epoch`` over ``engine.DataParallelStep``
   built by ``engine.build_step`` / ``plan.build_sampler`` from the default config (the
   seed's MLP 784 -> 256 -> 128, SGD lr 0.05) at ``--batch-size``, local backend, CPU,
   ``--threads`` threads. Median of windows (each a slice of an epoch's batches handed to
   ``run_epoch``, which ends with its host wait), plus CPU microseconds per triplet, a
   figure other processes' load barely moves.
2. **Roofline**: FLOPs of one training triplet (:func:`flops_per_triplet`) and the
   fastest float32 GEMM here at exactly the step's shapes (:func:`gemm_shapes`): MXNet's
   own kernels (``FullyConnected`` for the forward, ``dot`` with transposes for the
   gradients: oneDNN in the mxnet 1.9.1 wheel) and NumPy's ``dot`` with OPENBLAS_CORETYPE /
   OPENBLAS_L2_SIZE unset for that subprocess alone (the machines here pin OpenBLAS to old
   kernels; the BLAS is reported through threadpoolctl when it is installed). Per shape the
   faster kernel counts, at its fastest sample (a peak); roofline triplets/s = B / (sum of
   those GEMM times). Target: the
   product step >= 70% of it at the same thread count.
3. **PyTorch**: ``benchmarks/torch_seed.py``, the seed's recipe as a minimal PyTorch loop,
   from the peers' venv (``benchmarks/peer.py``, made on first use; ``--no-peer`` skips
   it), right after the product in the same section. Target: the product step >= 1.5 x
   that figure, measured minutes apart on the same machine.

FLOPs per triplet for the MLP ``in -> w1 -> ... -> wL``::

    per row:  forward   2 * sum_l d_{l-1} d_l        (one GEMM per Dense)
              backward  2 * sum_l d_{l-1} d_l        (weight gradients)
                      + 2 * sum_{l>=2} d_{l-1} d_l   (input gradients; none for layer 1)
    per triplet: 3 rows (anchor, positive, negative)

784 -> 256 -> 128: 3 x 999,424 = 2,998,272 FLOPs (bias, ReLU, gather, loss and optimizer
are O(rows x width) and left out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from . import common, peer

TARGETS = {"roofline_fraction": 0.80, "vs_pytorch": 1.5}     # issue 18


def sizes(quick: bool) -> dict:
    if quick:
        return dict(warmup=3, windows=3, window_steps=4, gemm_reps=3)
    return dict(warmup=40, windows=9, window_steps=60, gemm_reps=15)


def flops_per_triplet(widths: Sequence[int]) -> int:
    """FLOPs of one training triplet (3 rows) of the MLP ``widths[0] -> ... -> widths[-1]``:
    ``3 * (2 * fwd + dgrad)`` with fwd = sum 2 d_{l-1} d_l and dgrad the same sum without
    the first layer. 784, 256, 128 -> 2,998,272."""
    pairs = [(widths[i], widths[i + 1]) for i in range(len(widths) - 1)]
    fwd = sum(2 * a * b for a, b in pairs)
    dgrad = sum(2 * a * b for a, b in pairs[1:])
    return 3 * (2 * fwd + dgrad)


def gemm_shapes(widths: Sequence[int], batch: int) -> List[tuple]:
    """The step's GEMMs at ``batch`` triplets (3B rows): (name, (m, k), (k, n))."""
    rows = 3 * batch
    out = []
    for i in range(len(widths) - 1):
        a, b = widths[i], widths[i + 1]
        out.append((f"fwd L{i + 1}", (rows, a), (a, b)))
        out.append((f"wgrad L{i + 1}", (a, rows), (rows, b)))
        if i > 0:
            out.append((f"dgrad L{i + 1}", (rows, b), (b, a)))
    return out


def blas_info() -> list:
    """The BLAS NumPy loaded and the kernel it chose: threadpoolctl's view when it is
    installed, else OpenBLAS's own ``openblas_get_corename`` / ``openblas_get_config``
    (what threadpoolctl reads) from NumPy's bundled library; [] when neither works."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        keep = ("user_api", "internal_api", "version", "architecture", "num_threads")
        return [{k: d.get(k) for k in keep} for d in threadpool_info()]
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "libopenblas*.so*"))
    if not libs:
        return []
    lib = ctypes.CDLL(libs[0])
    out = {"internal_api": "openblas"}
    for key, name in (("architecture", "openblas_get_corename"), ("version", "openblas_get_config")):
        fn = getattr(lib, name + "64_", None) or getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            out[key] = fn().decode()
    return [out]


# ----------------------------------------------------------------------------- workers

def _best_time(fn, reps: int) -> float:
    """Fastest seconds per call of ``fn()`` over ``reps`` samples of ~20 ms each, after
    warm-up: the roofline is the machine's peak, and on a shared machine the fastest sample
    is the one least disturbed by other processes."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(2e-2 / max(1e-6, time.perf_counter() - t0)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return min(samples)


def worker_gemm(args) -> None:
    """GEMM seconds at the step's shapes with ``args.kernel`` ('mxnet' or 'numpy')."""
    widths = [int(w) for w in args.widths.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    if args.kernel == "mxnet":
        import mxnet as mx
        nd = mx.nd
    for name, (m, k), (_, n) in gemm_shapes(widths, args.batch_size):
        if args.kernel == "numpy":
            a = rng.random((m, k), dtype=np.float32)
            b = rng.random((k, n), dtype=np.float32)
            out = np.empty((m, n), dtype=np.float32)
            sec = _best_time(lambda: np.dot(a, b, out=out), args.reps)
        else:
            # The layouts MXNet's step uses: FullyConnected stores W as (out, in); the
            # weight gradient is dY^T X, the input gradient dY W.
            if name.startswith("fwd"):
                x, w = nd.array(rng.random((m, k), dtype=np.float32)), \
                    nd.array(rng.random((n, k), dtype=np.float32))
                fn = lambda x=x, w=w, n=n: nd.FullyConnected(x, w, num_hidden=n,  # noqa: E731
                                                            no_bias=True).wait_to_read()
            elif name.startswith("wgrad"):
                x, dy = nd.array(rng.random((k, m), dtype=np.float32)), \
                    nd.array(rng.random((k, n), dtype=np.float32))
                fn = lambda x=x, dy=dy: nd.dot(dy, x, transpose_a=True).wait_to_read()  # noqa: E731
            else:
                dy, w = nd.array(rng.random((m, k), dtype=np.float32)), \
                    nd.array(rng.random((k, n), dtype=np.float32))
                fn = lambda dy=dy, w=w: nd.dot(dy, w).wait_to_read()  # noqa: E731
            sec = _best_time(fn, args.reps)
        rows.append({"name": name, "shape": f"({m},{k})x({k},{n})", "s": sec,
                     "gflops": 2 * m * k * n / sec / 1e9})
    common.emit({"kernel": args.kernel, "threads": args.threads, "gemm": rows,
                 "blas": blas_info() if args.kernel == "numpy" else [],
                 "openblas_env": {k: os.environ.get(k) for k in
                                  ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}})


def worker_product(args) -> None:
    """The product step's throughput, one process, local backend."""
    images, labels, source = common.load_data(args.synthetic, args.train_size)
    cfg = common.make_cfg([f"train.batch_size={args.batch_size}"])
    product = common.build_product(cfg, images, labels)
    del images                                  # as loop.train: the step holds the pixels
    res = common.time_windows({"product": common.EpochRunner(product).run},
                              product.per_step, args.warmup, args.windows,
                              args.window_steps)["product"]
    common.emit(dict(res, data=source, threads=args.threads, steps_per_epoch=product.sampler.steps))


# ----------------------------------------------------------------------------- driver

def worker_args(args, *extra: str) -> List[str]:
    cmd = ["--batch-size", str(args.batch_size), "--train-size", str(args.train_size),
           "--threads", str(args.threads)]
    return cmd + (["--synthetic"] if args.synthetic else []) + list(extra)


def measure(args) -> dict:
    """Run the three measurements; the JSON section ``step``."""
    sz = sizes(args.quick)
    env = common.child_env(args.threads)
    widths = [FEATURES_DEFAULT] + list(HIDDEN_DEFAULT)
    product = common.run_worker(common.module_cmd("step", "worker", "product", *worker_args(
        args, "--warmup", str(sz["warmup"]), "--windows", str(sz["windows"]),
        "--window-steps", str(sz["window_steps"]))), env, timeout=900)[0]
    gemm = {}
    for kernel in ("mxnet", "numpy"):
        kenv = dict(env)
        if kernel == "numpy":
            # For this one measurement only: OpenBLAS picks its own kernels.
            unset = {k: kenv.pop(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                     if k in kenv}
        gemm[kernel] = common.run_worker(common.module_cmd("step", "worker", "gemm", *worker_args(
            args, "--kernel", kernel, "--reps", str(sz["gemm_reps"]),
            "--widths", ",".join(map(str, widths)))), kenv, timeout=600)[0]
    gemm["numpy"]["openblas_env_unset"] = unset
    best = [min((gemm[k]["gemm"][i] for k in gemm), key=lambda r: r["s"])
            for i in range(len(gemm["mxnet"]["gemm"]))]
    for i, row in enumerate(best):
        row["kernel"] = next(k for k in gemm if gemm[k]["gemm"][i] is row)
    gemm_s = sum(r["s"] for r in best)
    fpt = flops_per_triplet(widths)
    roof = args.batch_size / gemm_s
    out = {"batch_size": args.batch_size, "threads": args.threads, "product": product,
           "flops_per_triplet": fpt, "gemm": gemm, "gemm_best": best,
           "roofline_gflops": fpt * args.batch_size / gemm_s / 1e9,
           "roofline_triplets_per_s": roof,
           "product_gflops": product["median"] * fpt / 1e9,
           "roofline_fraction": product["median"] / roof}
    if not args.no_peer:
        try:
            out["pytorch"] = peer.seed_recipe(peer.peer_python(args.peer_venv), args,
                                              args.batch_size, args.threads)
            out["vs_pytorch"] = product["median"] / out["pytorch"]["median"]
        except RuntimeError as exc:
            out["pytorch_error"] = str(exc)[-500:]
    return out


FEATURES_DEFAULT = common.FEATURES
HIDDEN_DEFAULT = (256, 128)   # config.ModelConfig.hidden, the seed's widths


def rows(doc: dict) -> List[common.Row]:
    R, k = common.Row, (lambda x: f"{x:,.0f}")
    st, p = doc, doc["product"]
    out = [R("step", f"product step, 1 process, B={st['batch_size']}, {st['threads']} threads",
             f"{k(p['median'])} triplets/s ({p['cores']:.2f} cores busy, "
             f"{p['cpu_us_per_item']:.1f} CPU us/triplet)")]
    if "pytorch" in st:
        t = st["pytorch"]
        out.append(R("step", f"PyTorch {t['torch']} seed recipe (benchmarks/torch_seed.py), "
                             f"{t['threads']} threads, same run", f"{k(t['median'])} triplets/s "
                             f"({t['cpu_us_per_item']:.1f} CPU us/triplet)"))
        out.append(common.target_row("step", "product step / PyTorch seed recipe (same run)",
                                     st["vs_pytorch"], TARGETS["vs_pytorch"], "{:.2f}x",
                                     detail=f"CPU per triplet {t['cpu_us_per_item'] / p['cpu_us_per_item']:.2f}x"))
    elif "pytorch_error" in st:
        out.append(R("step", "PyTorch seed recipe", "not measured: " +
                     st["pytorch_error"].strip().splitlines()[-1][:120]))
    out.append(R("roofline", "FLOPs per triplet", f"{st['flops_per_triplet'] / 1e6:.3f} MFLOP"))
    for name in ("mxnet", "numpy"):
        g = st["gemm"][name]
        tot = sum(r["s"] for r in g["gemm"])
        what = ("MXNet FullyConnected/dot (oneDNN)" if name == "mxnet" else
                "NumPy dot, OPENBLAS_CORETYPE/L2_SIZE unset" +
                (f" ({g['blas'][0].get('internal_api')} {g['blas'][0].get('architecture')})"
                 if g["blas"] else ""))
        out.append(R("roofline", f"{what} at the step's shapes, {g['threads']} threads",
                     f"{st['flops_per_triplet'] * st['batch_size'] / tot / 1e9:.0f} GFLOP/s "
                     f"(" + ", ".join(f"{r['name']} {r['gflops']:.0f}" for r in g["gemm"]) + ")"))
    out.append(R("roofline", "roofline: fastest kernel per shape",
                 f"{st['roofline_gflops']:.0f} GFLOP/s = {k(st['roofline_triplets_per_s'])} "
                 "triplets/s"))
    out.append(common.target_row("roofline", f"product step, {st['threads']} threads",
                                 st["roofline_fraction"], TARGETS["roofline_fraction"], "{:.0%}",
                                 detail=f"{st['product_gflops']:.0f} GFLOP/s"))
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = common.driver_parser("step", __doc__, "a few steps: for the smoke test")
    p.add_argument("--batch-size", type=int, default=256, help="triplets per step")
    p.add_argument("--threads", type=int, default=0, help="default: the number of cores")
    p.add_argument("--synthetic", action="store_true", help="synthetic data of Fashion-MNIST's shape")
    p.add_argument("--train-size", type=int, default=0, help="first N training rows (0 = all)")
    peer.add_args(p)
    args = p.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step worker")
    p.add_argument("mode", choices=("product", "gemm"))
    for flag, typ, default in (("--batch-size", int, 256), ("--train-size", int, 0),
                               ("--threads", int, 1), ("--warmup", int, 10),
                               ("--windows", int, 5), ("--window-steps", int, 20),
                               ("--reps", int, 10), ("--widths", str, "784,256,128"),
                               ("--kernel", str, "mxnet")):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    {"product": worker_product, "gemm": worker_gemm}[args.mode](args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    return common.run_driver("step", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
