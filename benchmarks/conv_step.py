"""One process: the convolutional recipe's step beside the MLP's, against the roofline.

    python -m benchmarks.conv_step [--quick] [--threads 2] [--out FILE]

Both steps are the recipes' (configs/fashion_mnist_conv.yaml and its base,
configs/fashion_mnist_global_mining.yaml) as one process runs them on the 320-image
global batch of 4 ranks: P = 10 classes x K = 32, semi-hard mining, Adam, local backend,
``--threads`` threads, timed with ``engine.run_epoch`` in windows (``common.time_windows``;
images/s, and CPU microseconds per image, which other processes' load barely moves).

Roofline of the convolutional step: the FLOPs of one training image counted from the
layer shapes (:func:`conv_flops`), and the same layers timed alone at the step's shapes
(each Convolution and the Dense head, forward and backward under ``autograd``, MXNet's
oneDNN kernels, fastest of several samples: a peak), so roofline images/s = B / (sum of
those layer times). Mining, gather, BatchNorm, pooling and the optimizer are left out of
the roofline, as the MLP's (benchmarks/step.py) leaves out everything but its GEMMs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from . import common
from .step import _best_time

CONV = os.path.join(common.ROOT, "configs", "fashion_mnist_conv.yaml")
MLP = os.path.join(common.ROOT, "configs", "fashion_mnist_global_mining.yaml")
SHAPE = (28, 28, 1)           # Fashion-MNIST rows, (H, W, C)
ONE_PROCESS = ["distributed.backend=local", "sampler.scope=local", "sampler.k=32"]


def conv_layers(channels: Sequence[int], shape=SHAPE) -> List[tuple]:
    """``convnet``'s Conv3x3 layers: (height, width, in channels, out channels) each; a
    2x2 pool halves the map after every block but the last (backbone._conv_blocks)."""
    h, w, c = shape
    out = []
    for i, width in enumerate(channels):
        out.append((h, w, c, width))
        c = width
        if i + 1 < len(channels):
            h, w = h // 2, w // 2
    return out


def head_widths(model_cfg, shape=SHAPE) -> List[int]:
    """The Dense head's widths, its input first: the last block's channels after global
    average pooling (``model.pool=avg``), channels x h x w flattened (``flatten``)."""
    h, w, _, c = conv_layers(model_cfg.channels, shape)[-1]
    return [c * (h * w if model_cfg.pool == "flatten" else 1)] + list(model_cfg.hidden)


def conv_flops(model_cfg, shape=SHAPE) -> int:
    """FLOPs of one training image: forward 2 * H W Cin Cout 9 per Conv3x3 and 2 * in *
    out per Dense; backward twice that (input and weight gradients), except the first
    layer's input gradient, which is not needed. [32, 64, 128] + Dense 128 on 28x28x1:
    forward 14.9 MFLOP, training 44.3 MFLOP (pool avg); 16.5 and 49.1 (flatten)."""
    convs = [2 * h * w * ci * co * 9 for h, w, ci, co in conv_layers(model_cfg.channels, shape)]
    widths = head_widths(model_cfg, shape)
    dense = [2 * a * b for a, b in zip(widths, widths[1:])]
    fwd = sum(convs) + sum(dense)
    return 3 * fwd - convs[0]


def worker_product(args) -> None:
    images, labels, source = common.load_data(args.synthetic, args.train_size)
    cfg = common.make_cfg(ONE_PROCESS, config=CONV if args.net == "conv" else MLP)
    product = common.build_product(cfg, images, labels,
                                   SHAPE if cfg.model.backbone != "mlp" else None)
    res = common.time_windows({"product": common.EpochRunner(product).run},
                              product.per_step, args.warmup, args.windows,
                              args.window_steps)["product"]
    common.emit(dict(res, data=source, threads=args.threads, net=args.net,
                     channels=list(cfg.model.channels), hidden=list(cfg.model.hidden),
                     pool=cfg.model.pool))


def worker_layers(args) -> None:
    """Seconds of each layer's forward + backward alone at batch ``args.batch``."""
    import mxnet as mx
    cfg = common.make_cfg(ONE_PROCESS, config=CONV)
    rows, b = [], args.batch
    for h, w, ci, co in conv_layers(cfg.model.channels):
        x = mx.nd.random.uniform(shape=(b, ci, h, w))
        wt = mx.nd.random.uniform(shape=(co, ci, 3, 3))
        for a in (x, wt):
            a.attach_grad()

        def run(x=x, wt=wt, co=co):
            with mx.autograd.record():
                y = mx.nd.Convolution(x, wt, kernel=(3, 3), pad=(1, 1), num_filter=co,
                                      no_bias=True)
            y.backward()
            wt.grad.wait_to_read()
        rows.append({"name": f"conv {ci}->{co} @ {h}x{w}", "s": _best_time(run, args.reps)})
    widths = head_widths(cfg.model)
    for a, n in zip(widths, widths[1:]):
        x, wt = mx.nd.random.uniform(shape=(b, a)), mx.nd.random.uniform(shape=(n, a))
        for t in (x, wt):
            t.attach_grad()

        def run(x=x, wt=wt, n=n):
            with mx.autograd.record():
                y = mx.nd.FullyConnected(x, wt, num_hidden=n, no_bias=True)
            y.backward()
            wt.grad.wait_to_read()
        rows.append({"name": f"dense {a}->{n}", "s": _best_time(run, args.reps)})
    common.emit({"layers": rows, "batch": b, "threads": args.threads,
                 "flops_per_image": conv_flops(cfg.model)})


def measure(args) -> dict:
    quick = args.quick
    sz = dict(warmup=2, windows=2, window_steps=2, reps=3) if quick else \
        dict(warmup=10, windows=5, window_steps=20, reps=10)
    env = common.child_env(args.threads)
    base = ["--threads", str(args.threads), "--train-size", str(args.train_size),
            "--warmup", str(sz["warmup"]), "--windows", str(sz["windows"]),
            "--window-steps", str(sz["window_steps"])] + (["--synthetic"] if args.synthetic else [])
    out = {"threads": args.threads, "batch": 320}
    for net in ("conv", "mlp"):
        out[net] = common.run_worker(common.module_cmd("conv_step", "worker", "product",
                                                       "--net", net, *base), env, timeout=1800)[0]
    layers = common.run_worker(common.module_cmd(
        "conv_step", "worker", "layers", "--threads", str(args.threads), "--batch", "320",
        "--reps", str(sz["reps"])), env, timeout=900)[0]
    out["layers"] = layers
    roof = 320 / sum(r["s"] for r in layers["layers"])
    fpi = layers["flops_per_image"]
    out.update(roofline_images_per_s=roof, roofline_gflops=roof * fpi / 1e9,
               conv_gflops=out["conv"]["median"] * fpi / 1e9,
               roofline_fraction=out["conv"]["median"] / roof)
    return out


def rows(doc: dict) -> List[common.Row]:
    R, k = common.Row, (lambda x: f"{x:,.0f}")
    out = []
    c = doc["conv"]
    conv = (f"convnet {'-'.join(map(str, c['channels']))}, pool {c.get('pool', 'avg')}, "
            f"Dense {'-'.join(map(str, c['hidden']))} (conv recipe)")
    for net, what in (("mlp", "MLP 784-256-128 (global-mining recipe)"), ("conv", conv)):
        p = doc[net]
        out.append(R("conv", f"{what}, semi-hard P x K 10 x 32, 1 process, {doc['threads']} "
                             "threads", f"{k(p['median'])} images/s ({p['cores']:.2f} cores "
                             f"busy, {p['cpu_us_per_item']:.0f} CPU us/image)"))
    out.append(R("conv", "FLOPs per training image (conv)",
                 f"{doc['layers']['flops_per_image'] / 1e6:.1f} MFLOP"))
    out.append(R("conv", "layers alone at the step's shapes (oneDNN, fastest sample)",
                 ", ".join(f"{r['name']} {r['s'] * 1e3:.1f} ms" for r in doc["layers"]["layers"])))
    out.append(R("conv", "roofline: sum of the layers",
                 f"{doc['roofline_gflops']:.0f} GFLOP/s = {k(doc['roofline_images_per_s'])} "
                 "images/s"))
    out.append(R("conv", "conv step / roofline", f"{doc['roofline_fraction']:.0%} "
                 f"({doc['conv_gflops']:.0f} GFLOP/s)"))
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = common.driver_parser("conv_step", __doc__, "a few steps: for the smoke test")
    p.add_argument("--threads", type=int, default=0, help="default: the number of cores")
    p.add_argument("--synthetic", action="store_true", help="synthetic data of Fashion-MNIST's shape")
    p.add_argument("--train-size", type=int, default=0, help="first N training rows (0 = all)")
    args = p.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_step worker")
    p.add_argument("mode", choices=("product", "layers"))
    for flag, typ, default in (("--train-size", int, 0), ("--threads", int, 1),
                               ("--warmup", int, 10), ("--windows", int, 5),
                               ("--window-steps", int, 20), ("--reps", int, 10),
                               ("--batch", int, 320), ("--net", str, "conv")):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    {"product": worker_product, "layers": worker_layers}[args.mode](args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    return common.run_driver("conv_step", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
