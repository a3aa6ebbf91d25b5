"""The P x K semi-hard mining recipe in PyTorch + pytorch-metric-learning, for the
benchmark's mining row.

    PEER_PYTHON benchmarks/torch_pml.py [--threads 2] [--p 10] [--k 8]

Run by ``benchmarks/mining.py`` with the peer venv's Python (``benchmarks/peer.py``; torch
and pytorch-metric-learning are no dependencies of dist_triplet; this file imports neither
dist_triplet nor MXNet). The recipe of ``configs/fashion_mnist_mining.yaml`` as that
library spells it: MLP 784 -> 256 (ReLU) -> 128, L2-normalised; P x K class-balanced
batches (``samplers.MPerClassSampler``, m = K, batch P K); semi-hard triplets
(``miners.TripletMarginMiner(type_of_triplets="semihard")``) and
``losses.TripletMarginLoss``, both on squared Euclidean distances (``LpDistance(power=2)``)
with margin 0.3; Adam lr 1e-3. Prints one ``BENCH_JSON {...}`` line: images/s (median of
windows) and CPU microseconds per image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from torch_seed import load


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    for flag, default in (("--threads", 2), ("--p", 10), ("--k", 8), ("--warmup", 20),
                          ("--windows", 7), ("--window-steps", 40), ("--train-size", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    import torch
    from pytorch_metric_learning import distances, losses, miners, samplers
    import pytorch_metric_learning
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = load(args.synthetic, args.train_size)
    pixels, targets = torch.from_numpy(images), torch.from_numpy(labels)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 128))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    dist = distances.LpDistance(power=2, normalize_embeddings=True)
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=dist)
    loss_fn = losses.TripletMarginLoss(margin=0.3, distance=dist)
    batch = args.p * args.k
    sampler = samplers.MPerClassSampler(labels, m=args.k, batch_size=batch,
                                        length_before_new_iter=len(labels))
    state = {"it": iter(())}

    def next_batch():
        rows = []
        while len(rows) < batch:
            try:
                rows.append(next(state["it"]))
            except StopIteration:
                state["it"] = iter(sampler)
        return torch.as_tensor(rows)

    def run(n: int) -> None:
        for _ in range(n):
            idx = next_batch()
            emb = net(pixels[idx])
            y = targets[idx]
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(args.warmup)
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(args.windows):
        c0, t0 = time.process_time(), time.perf_counter()
        run(args.window_steps)
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        wall += dt
        rates.append(args.window_steps * batch / dt)
    items = args.windows * args.window_steps * batch
    print("BENCH_JSON " + json.dumps({
        "torch": torch.__version__, "pml": pytorch_metric_learning.__version__,
        "threads": args.threads, "p": args.p, "k": args.k,
        "median": statistics.median(rates), "windows": rates, "cores": cpu / wall,
        "cpu_us_per_item": 1e6 * cpu / items}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
