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

import sys

from torch_seed import emit, setup


def main(argv=None) -> int:
    args, torch, images, labels = setup(argv, p=10, k=8)
    from pytorch_metric_learning import distances, losses, miners, samplers
    import pytorch_metric_learning
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

    emit(run, batch, args, torch=torch.__version__, pml=pytorch_metric_learning.__version__,
         p=args.p, k=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
