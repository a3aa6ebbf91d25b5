"""The seed article's recipe as a minimal PyTorch loop, for the benchmark's PyTorch row.

    /work/torchvenv/bin/python benchmarks/torch_seed.py [--threads 2] [--batch-size 256]

Run by ``benchmarks/step.py`` with a Python that has torch (torch is no dependency of
dist_triplet; this file imports neither it nor MXNet). Same model and update as the
seed: MLP 784 -> 256 (ReLU) -> 128 (ReLU), Uniform(-0.1, 0.1) weights, zero biases, SGD lr
0.05, triplet loss ``max(0, ||a-p||^2 - ||a-n||^2 + 1)`` averaged over the batch (Gluon's
TripletLoss with margin 1, as the seed). Training pixels are one float32 tensor; each step
gathers its anchor, positive and negative rows by index and runs the three forwards the
seed runs. Prints one ``BENCH_JSON {...}`` line: triplets/s (median of windows), CPU
microseconds per triplet.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = "/usr/share/datasets/fashion-mnist"


def load(synthetic: bool, rows: int):
    """(N, 784) float32 in [0, 1] and (N,) int64 labels: Fashion-MNIST's training IDX
    files, or synthetic data of that shape."""
    if not synthetic and os.path.isdir(ROOT):
        with gzip.open(os.path.join(ROOT, "train-images-idx3-ubyte.gz")) as fh:
            images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)
        with gzip.open(os.path.join(ROOT, "train-labels-idx1-ubyte.gz")) as fh:
            labels = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)
        images = images.astype(np.float32) / 255.0
    else:
        rng = np.random.default_rng(0)
        labels = rng.permutation(np.arange(60000) % 10).astype(np.int64)
        images = rng.random((60000, 784), dtype=np.float32)
    if rows:
        images, labels = images[:rows], labels[:rows]
    return images, labels


def triplets(labels: np.ndarray, rng) -> np.ndarray:
    """(T, 3) anchor/positive/negative rows in the seed's scheme: per class, consecutive
    pairs of a shuffled class list; the negative from another random class."""
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n = min(len(m) for m in members) - 1
    out = []
    for d, m in enumerate(members):
        other = (d + rng.integers(1, len(classes), n)) % len(classes)
        neg = np.array([members[o][i] for i, o in enumerate(other)])
        out.append(np.stack([m[:n], m[1:n + 1], neg], axis=1))
    trip = np.concatenate(out)
    return trip[rng.permutation(len(trip))]


def emit(run, per_step: int, args, **extra) -> None:
    """Time ``run(n)`` (n steps of ``per_step`` items): ``args.warmup`` steps, then
    ``args.windows`` windows of ``args.window_steps``; print the one ``BENCH_JSON`` line
    (items/s median of windows, cores busy, CPU microseconds per item, and ``extra``)."""
    run(args.warmup)
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(args.windows):
        c0, t0 = time.process_time(), time.perf_counter()
        run(args.window_steps)
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        wall += dt
        rates.append(args.window_steps * per_step / dt)
    items = args.windows * args.window_steps * per_step
    print("BENCH_JSON " + json.dumps(dict(
        extra, threads=args.threads, median=statistics.median(rates), windows=rates,
        cores=cpu / wall, cpu_us_per_item=1e6 * cpu / items)), flush=True)


def setup(argv, **flags):
    """Parse the integer ``flags`` (name -> default; with the timing flags every peer
    takes) and ``--synthetic``; set torch's threads and seed. Returns (args, torch,
    images, labels)."""
    p = argparse.ArgumentParser()
    for flag, default in dict(flags, threads=2, warmup=20, windows=7, window_steps=40,
                              train_size=0).items():
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=default)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return (args, torch) + load(args.synthetic, args.train_size)


def main(argv=None) -> int:
    args, torch, images, labels = setup(argv, batch_size=256)
    pixels = torch.from_numpy(images)
    trip = torch.from_numpy(triplets(labels, np.random.default_rng(0)))
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 128), torch.nn.ReLU())
    for m in net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.uniform_(m.weight, -0.1, 0.1)
            torch.nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    B = args.batch_size
    steps = len(trip) // B
    state = {"s": 0}

    def run(n: int) -> None:
        for _ in range(n):
            s = state["s"] % steps
            state["s"] += 1
            t = trip[s * B:(s + 1) * B]
            a, pos, neg = net(pixels[t[:, 0]]), net(pixels[t[:, 1]]), net(pixels[t[:, 2]])
            loss = torch.relu(((a - pos) ** 2).sum(1) - ((a - neg) ** 2).sum(1) + 1.0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    emit(run, B, args, torch=torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
