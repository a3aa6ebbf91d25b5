"""The seed article's program, run faithfully: the end-to-end benchmark's baseline.

    python benchmarks/seed_program.py [--data-root DIR] [--logdir DIR] [--timings FILE]

What the article (MXNet/Gluon Triplet Loss, /work/shared/seed) runs, step for step, on
the same data as the main job (Fashion-MNIST's IDX files in place of ``MNIST()``, which
downloads; everything else as written there):

* the images as a uint8 NDArray of (N, 784) rows, labels as NumPy;
* ``TripletDataset``: its ``create_pairs`` loop (per class, reshuffle the class's index
  array for every triplet; anchor and positive the i-th and (i+1)-th; negative the i-th of
  a random other class) materialising every triplet's pixels, (T, 3, 784) uint8;
* a per-sample transform ``astype(float32) / 255``; ``DataLoader(batch_size,
  shuffle=True)`` for the training and the test triplets;
* ``Sequential(Dense(256, relu), Dense(128, relu))``, ``Uniform(0.1)``, ``TripletLoss()``,
  SGD lr 0.05; 10 epochs of: three forwards, backward, ``step(batch_size)``,
  ``mean(loss).asscalar()`` after every batch; ``evaluate_net`` on the test triplets
  (TripletLoss with margin 0, a triplet is correct when its loss is 0) after every epoch;
* at the end the projector of the raw test pixels (``origin``) and of their embeddings
  (``triplet``): metadata.tsv, the matrix, projector_config.pbtxt. The article saves the
  matrix with TensorFlow's ``Saver`` (a binary checkpoint); TensorFlow is not installed
  here, so the matrix is written as the raw float32 file TensorBoard's projector reads
  (``tensor_path`` + ``tensor_shape``), the same kind of binary write.

``batch_size`` is 1024 and ``random.seed(47)`` as in the program published with the
article (the text itself does not state them); NumPy's global RNG is seeded too, so runs
repeat. Global RNGs, a Python loop and pixel copies are the point: this file is the
baseline, not an example (dist_triplet does none of it). ``--timings FILE`` writes the
seconds of each phase as JSON.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(root: str, train: bool):
    """(N, 784) uint8 images and (N,) uint8 labels from the IDX gz files in ``root``."""
    part = "train" if train else "t10k"
    with gzip.open(os.path.join(root, f"{part}-images-idx3-ubyte.gz")) as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28 * 28)
    with gzip.open(os.path.join(root, f"{part}-labels-idx1-ubyte.gz")) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/seed_program.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=FASHION_MNIST)
    p.add_argument("--logdir", help="projector output (default: a temporary directory)")
    p.add_argument("--timings", help="write the phases' seconds here as JSON")
    p.add_argument("--epochs", type=int, default=10, help="the article: 10")
    p.add_argument("--batch-size", type=int, default=1024, help="the article's program: 1024")
    p.add_argument("--limit", type=int, default=0,
                   help="first N training rows and N/6 test rows (0 = all): for the smoke test")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    timings = {}

    import mxnet as mx
    from mxnet import autograd, gluon
    from mxnet.gluon.data import DataLoader, dataset
    from mxnet.gluon.nn import Dense, Sequential
    timings["import_s"] = time.perf_counter() - t_start

    class TripletDataset(dataset.Dataset):
        """The article's dataset: every triplet's pixels, made once."""

        def __init__(self, rd, rl, transform=None):
            self._rd, self._rl, self._transform = rd, rl, transform
            label_list = np.unique(rl)
            digit_indices = [np.where(rl == i)[0] for i in label_list]
            self._data = self.create_pairs(rd, digit_indices, len(label_list))
            self._label = np.ones(self._data.shape[0])

        def __getitem__(self, idx):
            if self._transform is not None:
                return self._transform(self._data[idx], self._label[idx])
            return self._data[idx], self._label[idx]

        def __len__(self):
            return len(self._label)

        @staticmethod
        def create_pairs(x, digit_indices, num_classes):
            x = x.asnumpy()
            pairs = []
            n = min(len(digit_indices[d]) for d in range(num_classes)) - 1
            for d in range(num_classes):
                for i in range(n):
                    np.random.shuffle(digit_indices[d])
                    z1, z2 = digit_indices[d][i], digit_indices[d][i + 1]
                    dn = (d + random.randrange(1, num_classes)) % num_classes
                    z3 = digit_indices[dn][i]
                    pairs += [[x[z1], x[z2], x[z3]]]
            return np.asarray(pairs)

    def transform(data_, label_):
        return data_.astype(np.float32) / 255., label_.astype(np.float32)

    def evaluate_net(model, test_data, ctx):
        triplet_loss = gluon.loss.TripletLoss(margin=0)
        sum_correct = sum_all = 0
        for data, _ in test_data:
            data = data.as_in_context(ctx)
            loss = triplet_loss(model(data[:, 0]), model(data[:, 1]), model(data[:, 2])).asnumpy()
            sum_correct += int(np.sum(np.where(loss == 0, 1, 0)))
            sum_all += loss.shape[0]
        rate = sum_correct / sum_all if sum_all else 0.0
        print("accuracy: %.4f (%s / %s)" % (rate, sum_correct, sum_all), flush=True)
        return rate

    def tb_projector(x_test, y_test, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "metadata.tsv"), "w") as fh:
            for row in y_test:
                fh.write("%d\n" % row)
        x_test = np.ascontiguousarray(x_test, dtype=np.float32)
        x_test.tofile(os.path.join(log_dir, "tensor.bytes"))
        with open(os.path.join(log_dir, "projector_config.pbtxt"), "w") as fh:
            fh.write('embeddings {\n  tensor_name: "images"\n  tensor_path: "tensor.bytes"\n'
                     f'  tensor_shape: {x_test.shape[0]}\n  tensor_shape: {x_test.shape[1]}\n'
                     '  metadata_path: "metadata.tsv"\n}\n')

    ctx = mx.cpu()
    batch_size = args.batch_size
    random.seed(47)
    np.random.seed(47)

    t = time.perf_counter()
    tr_images, tr_label = read_idx(args.data_root, train=True)
    te_images, te_label = read_idx(args.data_root, train=False)
    if args.limit:
        tr_images, tr_label = tr_images[:args.limit], tr_label[:args.limit]
        te_images, te_label = te_images[:args.limit // 6], te_label[:args.limit // 6]
    tr_data, te_data = mx.nd.array(tr_images, dtype=np.uint8), mx.nd.array(te_images, dtype=np.uint8)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train_set = TripletDataset(rd=tr_data, rl=tr_label, transform=transform)
    test_set = TripletDataset(rd=te_data, rl=te_label, transform=transform)
    timings["create_pairs_s"] = time.perf_counter() - t
    train_data = DataLoader(train_set, batch_size, shuffle=True)
    test_data = DataLoader(test_set, batch_size, shuffle=True)

    base_net = Sequential()
    with base_net.name_scope():
        base_net.add(Dense(256, activation="relu"))
        base_net.add(Dense(128, activation="relu"))
    base_net.collect_params().initialize(mx.init.Uniform(scale=0.1), ctx=ctx)
    triplet_loss = gluon.loss.TripletLoss()
    trainer_triplet = gluon.Trainer(base_net.collect_params(), "sgd", {"learning_rate": 0.05})

    timings["train_s"] = timings["eval_s"] = 0.0
    rate = 0.0
    for epoch in range(args.epochs):
        t = time.perf_counter()
        curr_loss = 0.0
        for data, _ in train_data:
            data = data.as_in_context(ctx)
            anc_ins, pos_ins, neg_ins = data[:, 0], data[:, 1], data[:, 2]
            with autograd.record():
                loss = triplet_loss(base_net(anc_ins), base_net(pos_ins), base_net(neg_ins))
            loss.backward()
            trainer_triplet.step(batch_size)
            curr_loss = mx.nd.mean(loss).asscalar()
        timings["train_s"] += time.perf_counter() - t
        print("Epoch: %s, Triplet Loss: %s" % (epoch, curr_loss), flush=True)
        t = time.perf_counter()
        rate = evaluate_net(base_net, test_data, ctx=ctx)
        timings["eval_s"] += time.perf_counter() - t

    t = time.perf_counter()
    logdir = args.logdir or tempfile.mkdtemp(prefix="seed-program-")
    te_x, te_y = transform(te_data, te_label)
    tb_projector(te_x.asnumpy(), te_y, os.path.join(logdir, "logs", "origin"))
    tb_projector(base_net(te_x).asnumpy(), te_y, os.path.join(logdir, "logs", "triplet"))
    timings["projector_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    timings.update(accuracy=rate, triplets=len(train_set), epochs=args.epochs,
                   batch_size=batch_size)
    if args.timings:
        with open(args.timings, "w") as fh:
            json.dump(timings, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
