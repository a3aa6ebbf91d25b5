"""Benchmark: the product against the seed's recipe and against this machine's limit.

    python -m dist_triplet.bench [--quick] [--out DIR] [--batch-size 256] [--threads N]
    dist-triplet-bench ...            (the same, as a console script)

One process run measures six things on Fashion-MNIST (``/usr/share/datasets/fashion-mnist``)
when it is installed, else on synthetic data of the same shape (60,000 x 784 float32, 10
balanced classes; the table's header line and ``bench.json`` say which). It prints one
markdown table and writes the same numbers to ``DIR/bench.json`` (default
``runs/bench-YYYYmmdd-HHMMSS``). Timings are medians of several windows, so a busy
machine moves them less; the targets are ratios for the same reason.

1. **Triplet generation.** The seed article's ``create_pairs`` loop (kept as
   :func:`dist_triplet.triplets.seed_create_pairs`, the *reference*, timed once) against the
   vectorised :func:`~dist_triplet.triplets.create_pairs` on the training labels (with the
   class index built inside the call, as the loop builds its own). Also one rank's shard at
   world size 4 against the full set, both from a prebuilt ``ClassIndex`` as training does
   every epoch (about 1/4 expected). Target: speed-up >= 200x.
2. **Training throughput** (triplets/s, one process, batch ``--batch-size``, median of
   timed windows after warm-up, each window ended by ``mx.nd.waitall()``):
   the product (``engine.DataParallelStep``, local backend: pixels resident on the device,
   rows gathered by ``nd.take``, one stacked hybridized forward; driven by
   :class:`ProductLoop`, which mirrors ``train.train``'s inner loop) against a seed-style
   pipeline (:class:`SeedStyleLoop`: pixel triplets materialised as an (N, 3, 784) array,
   ``gluon.data.DataLoader`` over a Dataset with a per-sample Python transform, three
   separate forwards, not hybridized, ``asscalar()`` after every batch). Same triplets,
   same network, same optimizer, same thread count; the seed-style pipeline runs in a
   process of its own (interleaved in one process, its per-batch allocations slowed the
   product by a third). Target: >= 1.8x. Also the product loop as it was before the speed work
   (``ProductLoop(before=True)``), interleaved with the product, for that change's
   before/after.
3. **Roofline.** FLOPs of one training triplet for the MLP ``in -> w1 -> ... -> wL``
   (:func:`flops_per_triplet`)::

       per row:  forward   2 * sum_l d_{l-1} d_l        (one GEMM per Dense)
                 backward  2 * sum_l d_{l-1} d_l        (weight gradients)
                         + 2 * sum_{l>=2} d_{l-1} d_l   (input gradients; none for layer 1,
                                                         whose input is data)
       per triplet: 3 rows (anchor, positive, negative)

   (bias, ReLU, gather, loss and optimizer are O(rows x width) and left out.) For 784 ->
   256 -> 128 that is 3 x 999,424 = 2,998,272 FLOPs. The machine's rate is NumPy's float32
   GEMM (``np.dot``) at exactly the step's shapes, at batch B: forward (3B, d_{l-1}) x
   (d_{l-1}, d_l), weight gradient (d_{l-1}, 3B) x (3B, d_l), input gradient (3B, d_l) x
   (d_l, d_{l-1}), in a subprocess with ``--threads`` BLAS threads (the training
   measurement's thread count), and again with 1 thread for the 1-thread Horovod rank of
   section 4. Roofline triplets/s = B / (sum of those GEMM times); the throughputs are
   reported as fractions of the roofline at their own thread count. Target: >= 75%. The BLAS
   kernel is reported (threadpoolctl, when installed). OPENBLAS_CORETYPE /
   OPENBLAS_L2_SIZE, set on some machines of this workplace for old OpenBLAS builds, slow
   a current NumPy; a full run unsets both in the GEMM subprocess alone (``--quick`` leaves
   the environment as it is) and records what it did.
4. **Scaling.** ``horovodrun -np N -H localhost:N --gloo`` with N = 1 and 2, one thread
   per rank (OMP_NUM_THREADS=1 and MXNet's engine, so 2 ranks do not oversubscribe 2
   cores), each rank running the product loop on its shard with ``--batch-size`` per
   rank. Efficiency = total(2) / (2 x total(1)). Target: >= 90%. To tell the cores from
   Horovod, it also reports the bare allreduce of the gradients (2 ranks, nothing else
   running), the CPU each rank kept busy (CPU s / wall s, all threads), and two
   independent 1-thread processes of the product loop run at once without Horovod.
5. **Memory.** Peak RSS (``VmHWM``) of the product and of the seed-style pipeline, each in
   its own subprocess: load the training set, set up, run some steps. The RSS of a bare
   ``import mxnet`` process is reported as the floor both share. Evaluation is not part
   of it. Target: product <= half the seed-style peak.
6. **Where an epoch goes.** A profiling pass in the 2-rank job: every step's phases are
   separated by explicit waits (gather = ``nd.take`` alone; forward/backward = the
   hybridized step minus the gather; ``allreduce_grads()``; ``update()``), scaled to one
   epoch's steps, plus triplet generation and one rank-0 evaluation. The explicit waits
   serialise what the real loop overlaps, so the phases add up to more than the
   pipelined epoch, which is also reported. ``train.py`` logs the cheap part of this
   (sample / train / host wait / allreduce / eval seconds) on rank 0 every epoch.

Nothing here runs at import time; MXNet is imported only inside the functions that need
it, so ``--threads`` can set OMP_NUM_THREADS first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

JSON_MARK = "BENCH_JSON "          # prefix of the one result line a worker prints
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
TRAIN_ROWS = 60000                 # Fashion-MNIST's training set: the synthetic stand-in's shape
TEST_ROWS = 10000
FEATURES = 784
CLASSES = 10
TARGETS = {"triplet_speedup": 200.0, "throughput_speedup": 1.8, "roofline_fraction": 0.75,
           "scaling_efficiency": 0.90, "memory_ratio": 0.5}


# ----------------------------------------------------------------------------- sizes

def sizes(quick: bool) -> dict:
    """How long each measurement runs. ``quick`` is for development and the smoke test."""
    if quick:
        return dict(warmup=3, windows=3, window_steps=4, gemm_reps=3, vec_reps=3,
                    hvd_warmup=3, hvd_windows=3, hvd_window_steps=4, profile_steps=4,
                    memory_steps=3, seed_warmup=2)
    return dict(warmup=20, windows=9, window_steps=40, gemm_reps=15, vec_reps=7,
                hvd_warmup=15, hvd_windows=7, hvd_window_steps=30, profile_steps=0,
                memory_steps=40, seed_warmup=5)


# ----------------------------------------------------------------------------- data

def synthetic_split(rows: int, seed: int = 0):
    """(rows, 784) float32 in [0, 1) and (rows,) int64 labels of 10 balanced classes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(rows) % CLASSES).astype(np.int64)
    images = rng.random((rows, FEATURES), dtype=np.float32)
    return images, labels


def load_data(synthetic: bool, train_size: int, train: bool = True, root: str = FASHION_MNIST_ROOT):
    """The benchmark's data: (images (N, F) float32, labels (N,) int64, source str).

    Fashion-MNIST from ``root`` unless ``synthetic`` or the directory is missing, in which
    case synthetic data of the same shape; ``train_size`` > 0 keeps the first rows only
    (the test split keeps train_size // 6, as 10,000 / 60,000).
    """
    full = TRAIN_ROWS if train else TEST_ROWS
    limit = train_size if train else (max(train_size // 6, 2 * CLASSES) if train_size else 0)
    if not synthetic and os.path.isdir(root):
        from .data import load_dataset, subset
        split = subset(load_dataset("fashion_mnist", root, train=train), limit)
        return split.images, split.labels, f"Fashion-MNIST ({root})"
    rows = limit or full
    images, labels = synthetic_split(rows, seed=0 if train else 1)
    why = "--synthetic" if synthetic else f"Fashion-MNIST not found at {root}"
    return images, labels, f"synthetic {rows}x{FEATURES} float32, {CLASSES} classes ({why})"


# ----------------------------------------------------------------------------- helpers

def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB; ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's current resident set (VmRSS) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


def time_windows(runs: Dict[str, Callable[[int], None]], per_step: int, warmup: int,
                 windows: int, window_steps: int, sync: Callable[[], None]) -> Dict[str, dict]:
    """Throughput of each ``runs[name](n)`` (n steps of ``per_step`` triplets): warm-up,
    then ``windows`` rounds in which every run gets one window of ``window_steps`` steps
    closed by ``sync()``. Interleaving the runs' windows lets a busy machine slow them
    alike instead of whichever ran during a burst.

    Returns {name: {"median": triplets/s, "windows": [triplets/s, ...], "step_ms": ms,
    "cores": CPU seconds per wall second over the windows (all threads of the process)}}.
    """
    for run in runs.values():
        run(warmup)
        sync()
    rates: Dict[str, List[float]] = {name: [] for name in runs}
    cpu = {name: 0.0 for name in runs}
    wall = {name: 0.0 for name in runs}
    for _ in range(windows):
        for name, run in runs.items():
            c0, t0 = _cpu_s(), time.perf_counter()
            run(window_steps)
            sync()
            dt = time.perf_counter() - t0
            cpu[name] += _cpu_s() - c0
            wall[name] += dt
            rates[name].append(window_steps * per_step / dt)
    return {name: {"median": median(r), "windows": r, "step_ms": 1e3 * per_step / median(r),
                   "cores": cpu[name] / wall[name]}
            for name, r in rates.items()}


def flops_per_triplet(widths: Sequence[int]) -> int:
    """FLOPs of one training triplet (3 rows) of the MLP ``widths[0] -> ... -> widths[-1]``.

    ``3 * 2 * (2 * sum_l d_{l-1} d_l + sum_{l>=2} d_{l-1} d_l)``: forward and weight
    gradient GEMMs of every Dense, input-gradient GEMMs of all but the first (its input is
    data). Bias, activation, gather, loss and optimizer terms are left out. 784, 256, 128
    -> 2,998,272.
    """
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
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries ([] without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads",
            "threading_layer", "prefix")
    return [{k: d.get(k) for k in keep} for d in threadpool_info()]


def machine_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
            "cpu": model, "python": platform.python_version(), "loadavg_start": list(load)}


class ForeignLoad:
    """CPU that other processes used while a measurement ran, in cores: the machine's busy
    time (/proc/stat) minus this process's and its finished children's (os.times). The
    machines here are shared; a section run beside someone else's job says so."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as fh:
                f = [int(x) for x in fh.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else float("nan")


def worker_command(mode: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, "-m", "dist_triplet._bench_worker", mode,
           "--batch-size", str(args.batch_size), "--train-size", str(args.train_size)]
    if args.synthetic:
        cmd.append("--synthetic")
    if args.quick:
        cmd.append("--quick")
    return cmd + list(extra)


def run_worker(cmd: List[str], env: dict, timeout: float) -> List[dict]:
    """Run a worker command; return the JSON objects it printed (one per rank)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=root)
    found = []
    for line in proc.stdout.splitlines():
        pos = line.find(JSON_MARK)  # horovodrun prefixes lines with "[rank]<stdout>:"
        if pos >= 0:
            found.append(json.loads(line[pos + len(JSON_MARK):]))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return found


def thread_env(threads: int, base: Optional[dict] = None) -> dict:
    """Environment with every thread pool of the process set to ``threads``."""
    env = dict(os.environ if base is None else base)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    return env


# ----------------------------------------------------------------------------- the two loops

def make_cfg(batch_size: int, backend: str = "local"):
    """The benchmark's config: defaults (the seed's MLP, SGD lr 0.05) at ``batch_size``."""
    from .config import load_config
    return load_config(None, [f"train.batch_size={batch_size}", f"distributed.backend={backend}",
                              "distributed.device=cpu", "train.progress=false"])


def build_product(cfg, backend, images: np.ndarray, labels: np.ndarray):
    """(net, DataParallelStep, EpochSampler) as ``train.train`` builds them."""
    from .model import build_embedding_net, initialize
    from .train import build_sampler, build_step

    net = build_embedding_net(images.shape[1], cfg.model.hidden, final_relu=cfg.model.final_relu,
                              normalize=cfg.model.normalize)
    initialize(net, cfg.model.init_scale, backend.contexts, cfg.train.seed)
    backend.broadcast_parameters(net.collect_params())
    stepper = build_step(cfg, backend, net, images, labels)
    sampler = build_sampler(cfg, backend, labels)
    return net, stepper, sampler


class ProductLoop:
    """``train.train``'s inner loop over as many epochs as asked, step by step.

    Per step, exactly what the loop does: the learning rate set, ``stepper.step`` on the
    epoch's batch with its row of the epoch's indices (copied to the device once per
    epoch), the loss sum kept on the device with no op of its own, one host wait every
    ``train.sync_every`` steps and one per epoch. Keep it in step with ``train.train``.

    ``before=True`` is the loop as it was before the speed work: indices copied to the device
    every step (``mx.nd.array``, which waits for MXNet's queue to drain) and three small
    ops per step to store the step's mean loss in a device array.
    """

    def __init__(self, cfg, stepper, sampler, before: bool = False):
        import mxnet as mx
        self.mx, self.cfg, self.stepper, self.sampler = mx, cfg, stepper, sampler
        self.before = before
        self.ctx0 = stepper.ctxs[0]
        self.global_batch = sampler.per_step * stepper.backend.num_processes
        self.epoch = -1
        self.s = sampler.steps
        self.steps_run = 0

    def _next_epoch(self) -> None:
        mx = self.mx
        if self.epoch >= 0:                               # the loop's once-per-epoch wait
            if self.before:
                self.step_loss.asnumpy()
            else:
                mx.nd.concat(*self.step_sums, dim=0).asnumpy()
        self.epoch += 1
        self.batches = self.sampler.epoch(self.epoch)
        self.dev_idx = None if self.before else self.stepper.epoch_indices(self.batches)
        self.step_loss = mx.nd.zeros((self.sampler.steps,), ctx=self.ctx0)
        self.step_sums = []
        self.s = 0

    def run(self, n: int) -> None:
        from .schedule import from_config
        mx, cfg, steps = self.mx, self.cfg, self.sampler.steps
        learning_rate = from_config(cfg.optim, cfg.train.epochs, steps, self.global_batch)
        for _ in range(n):
            if self.s == steps:
                self._next_epoch()
            s = self.s
            self.stepper.trainer.set_learning_rate(
                learning_rate(self.epoch * steps + s))
            idx = None if self.before else [d[s] for d in self.dev_idx]
            sums, terms = self.stepper.step(self.batches[s], idx)
            if self.before:
                self.step_loss[s] = mx.nd.add_n(*[x.as_in_context(self.ctx0) for x in sums]) / terms
                last = self.step_loss[s]
            else:
                self.step_sums.append(sums[0] if len(sums) == 1 else
                                      mx.nd.add_n(*[x.as_in_context(self.ctx0) for x in sums]))
                last = self.step_sums[-1]
            if (s + 1) % cfg.train.sync_every == 0:
                last.asscalar()
            self.s += 1
            self.steps_run += 1


def seed_transform(sample: np.ndarray) -> np.ndarray:
    """The seed's per-sample Python transform (``data.astype(np.float32)``), one triplet."""
    return sample.astype(np.float32)


class SeedStyleLoop:
    """The seed article's training recipe, kept as the baseline (not product code).

    Pixel triplets materialised as ``images[triplets]``: (N, 3, F) float32 copies;
    ``gluon.data.DataLoader(shuffle=True)`` over ``ArrayDataset(pairs)`` with a per-sample
    Python transform; anchor, positive and negative through the network in three separate
    forwards; not hybridized; ``loss.mean().asscalar()`` after every batch.
    """

    def __init__(self, cfg, images: np.ndarray, triplets: np.ndarray, ctx):
        import mxnet as mx
        from mxnet import gluon

        from .model import build_embedding_net, initialize

        self.mx, self.ctx, self.batch = mx, ctx, cfg.train.batch_size
        self.pairs = images[triplets]                                  # (N, 3, F) pixel copies
        dataset = gluon.data.ArrayDataset(self.pairs).transform(seed_transform, lazy=True)
        self.loader = gluon.data.DataLoader(dataset, batch_size=self.batch, shuffle=True,
                                            last_batch="discard")
        self.net = build_embedding_net(images.shape[1], cfg.model.hidden,
                                       final_relu=cfg.model.final_relu,
                                       normalize=cfg.model.normalize)
        initialize(self.net, cfg.model.init_scale, ctx, cfg.train.seed)
        self.trainer = gluon.Trainer(self.net.collect_params(), "sgd",
                                     {"learning_rate": cfg.optim.lr})
        self.loss_fn = gluon.loss.TripletLoss(margin=cfg.loss.margin)
        self.it = iter(self.loader)
        self.last_loss = float("nan")

    def run(self, n: int) -> None:
        mx, net = self.mx, self.net
        for _ in range(n):
            try:
                data = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                data = next(self.it)
            data = data.as_in_context(self.ctx)                        # (B, 3, F)
            with mx.autograd.record():
                anc = net(data[:, 0])
                pos = net(data[:, 1])
                neg = net(data[:, 2])
                loss = self.loss_fn(anc, pos, neg)
            loss.backward()
            self.trainer.step(self.batch)
            self.last_loss = loss.mean().asscalar()                    # the seed's per-batch sync


# ----------------------------------------------------------------------------- sections

def bench_triplets(labels: np.ndarray, reps: int) -> dict:
    """Section 1: seed loop vs vectorised create_pairs; rank shard at W=4 vs the full set."""
    from .triplets import ClassIndex, create_pairs, seed_create_pairs

    t0 = time.perf_counter()
    ref = seed_create_pairs(labels, random.Random(0))       # the seed's loop: reference, once
    t_seed = time.perf_counter() - t0

    def timed(fn, n=reps):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return median(ts)

    vec = create_pairs(labels, seed=0)
    t_vec = timed(lambda: create_pairs(labels, seed=0))
    index = ClassIndex(labels)
    t_full = timed(lambda: create_pairs(index, seed=0, epoch=1))
    t_shard = median([timed(lambda r=r: create_pairs(index, seed=0, epoch=1, rank=r,
                                                    world_size=4)) for r in range(4)])
    return {"labels": int(len(labels)), "triplets_seed": int(len(ref)),
            "triplets_vectorised": int(len(vec)), "seed_loop_s": t_seed,
            "vectorised_s": t_vec, "speedup": t_seed / t_vec,
            "full_epoch_s": t_full, "shard_w4_s": t_shard,
            "shard_w4_fraction": t_shard / t_full}


def bench_throughput(args, cfg, images: np.ndarray, labels: np.ndarray, sz: dict) -> dict:
    """Section 2: product loop vs seed-style pipeline, same triplets/network/optimizer.

    The product runs here, its windows interleaved with the product loop as it was
    before the speed work (``ProductLoop(before=True)``, on its own network) for that change's
    before/after. The seed-style pipeline runs in a process of its own (see
    ``_bench_worker.seed_style``) at the same thread count."""
    import mxnet as mx

    from .dist import make_backend

    B = cfg.train.batch_size
    _, stepper, sampler = build_product(cfg, make_backend("local", "cpu"), images, labels)
    _, stepper0, sampler0 = build_product(cfg, make_backend("local", "cpu"), images, labels)
    res = time_windows({"product": ProductLoop(cfg, stepper, sampler).run,
                        "before": ProductLoop(cfg, stepper0, sampler0, before=True).run},
                       B, sz["warmup"], sz["windows"], sz["window_steps"], mx.nd.waitall)
    del stepper, stepper0
    prod, before = res["product"], res["before"]
    base = run_worker(worker_command("seed", args, [
        "--warmup", str(sz["seed_warmup"]), "--windows", str(sz["windows"]),
        "--window-steps", str(sz["window_steps"])]), thread_env(args.threads), timeout=600)[0]
    return {"batch_size": B, "product_triplets_per_s": prod["median"],
            "product_windows": prod["windows"], "product_step_ms": prod["step_ms"],
            "product_before_triplets_per_s": before["median"],
            "product_before_windows": before["windows"],
            "seed_style_triplets_per_s": base["triplets_per_s"],
            "seed_style_windows": base["windows"], "seed_style_step_ms": base["step_ms"],
            "product_cores": prod["cores"], "seed_style_cores": base["cores"],
            "speedup": prod["median"] / base["triplets_per_s"]}


def bench_roofline(args, widths: Sequence[int], sz: dict) -> dict:
    """Section 3: FLOPs per triplet and NumPy's GEMM rate at the step's shapes, at
    ``--threads`` threads (the one-process throughput's) and at 1 (a Horovod rank's).
    The fractions are filled in by :func:`roofline_fractions` once throughputs exist."""
    unset = []
    base = dict(os.environ)
    if not args.quick:
        for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            if key in base:
                unset.append(f"{key}={base.pop(key)}")
    out = {"widths": list(widths), "flops_per_triplet": flops_per_triplet(widths),
           "threads": args.threads, "openblas_env_unset": unset}
    for threads in sorted({args.threads, 1}, reverse=True):
        res = run_worker(worker_command("gemm", args, [
            "--threads", str(threads), "--reps", str(sz["gemm_reps"]),
            "--widths", ",".join(map(str, widths))]), thread_env(threads, base), timeout=300)[0]
        key = "" if threads == args.threads else "_1thread"
        out.update({f"gemm{key}": res["gemm"], f"gemm_step_s{key}": res["step_gemm_s"],
                    f"gemm_gflops{key}": res["gflops"],
                    f"roofline_triplets_per_s{key}": args.batch_size / res["step_gemm_s"],
                    f"blas{key}": res["blas"]})
        if threads == 1:
            out.update({"gemm_gflops_1thread": res["gflops"],
                        "roofline_triplets_per_s_1thread": args.batch_size / res["step_gemm_s"]})
    return out


def roofline_fractions(doc: dict) -> None:
    """Throughput as a fraction of the GEMM roofline at the same thread count: the
    one-process product at ``--threads``, and a 1-thread Horovod rank at 1."""
    rf = doc["roofline"]
    fpt = rf["flops_per_triplet"]
    tps = doc["throughput"]["product_triplets_per_s"]
    one = doc["scaling"]["one_rank_triplets_per_s"]
    rf.update({"product_triplets_per_s": tps, "product_gflops": tps * fpt / 1e9,
               "fraction": tps / rf["roofline_triplets_per_s"],
               "one_rank_gflops": one * fpt / 1e9,
               "one_rank_fraction": one / rf["roofline_triplets_per_s_1thread"]})


def bench_scaling(args, sz: dict) -> dict:
    """Sections 4 and 6: Horovod gloo jobs with 1 and 2 ranks, one thread each; and, as
    the reference for what the cores give, two independent one-thread processes at once."""
    if shutil.which("horovodrun") is None:
        raise RuntimeError("horovodrun is not on PATH: build Horovod with launch/setup.sh")
    env = thread_env(1)
    env["MXNET_CPU_WORKER_NTHREADS"] = "1"
    windows = ["--warmup", str(sz["hvd_warmup"]), "--windows", str(sz["hvd_windows"]),
               "--window-steps", str(sz["hvd_window_steps"])]
    out = {}
    for np_ in (1, 2):
        extra = list(windows)
        if np_ == 2:
            extra += ["--profile", "--profile-steps", str(sz["profile_steps"])]
        cmd = ["horovodrun", "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]
        cmd += worker_command("hvd", args, extra)
        out[np_] = sorted(run_worker(cmd, env, timeout=600), key=lambda r: r["rank"])
    pair = run_workers_at_once([worker_command("solo", args, windows)] * 2, env, timeout=600)
    one = out[1][0]["triplets_per_s"]
    per_rank = [r["triplets_per_s"] for r in out[2]]
    total2 = sum(per_rank)
    profile = next(r["profile"] for r in out[2] if r["rank"] == 0)
    return {"scaling": {"threads_per_rank": 1, "batch_per_rank": args.batch_size,
                        "one_rank_triplets_per_s": one,
                        "two_rank_per_rank_triplets_per_s": per_rank,
                        "two_rank_total_triplets_per_s": total2,
                        "efficiency": total2 / (2 * one),
                        "one_rank_step_ms": out[1][0]["step_ms"],
                        "two_rank_step_ms": [r["step_ms"] for r in out[2]],
                        "one_rank_cores": out[1][0]["cores"],
                        "two_rank_cores": [r["cores"] for r in out[2]],
                        "bare_allreduce_ms": out[2][0]["allreduce_ms"],
                        "two_independent_triplets_per_s": [p["triplets_per_s"] for p in pair],
                        "two_independent_cores": [p["cores"] for p in pair],
                        "two_independent_efficiency":
                            sum(p["triplets_per_s"] for p in pair) / (2 * one)},
            "epoch": profile}


def run_workers_at_once(cmds: List[List[str]], env: dict, timeout: float) -> List[dict]:
    """Start every command at once, wait for all; the first JSON line of each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p))
    procs = [subprocess.Popen(c, env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    found = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=timeout)
        docs = [json.loads(line[line.find(JSON_MARK) + len(JSON_MARK):])
                for line in out.splitlines() if JSON_MARK in line]
        if proc.returncode != 0 or not docs:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                               f"{out[-2000:]}\n{err[-3000:]}")
        found.append(docs[0])
    return found


def bench_memory(args, sz: dict) -> dict:
    """Section 5: peak RSS of product and seed-style pipeline, each in its own process."""
    env = thread_env(args.threads)
    res = {}
    for what in ("floor", "product", "seed"):
        res[what] = run_worker(worker_command("memory", args, ["--what", what, "--steps",
                                                                str(sz["memory_steps"])]),
                               env, timeout=600)[0]
    return {"floor_mb": res["floor"]["peak_rss_mb"],
            "product_peak_mb": res["product"]["peak_rss_mb"],
            "seed_style_peak_mb": res["seed"]["peak_rss_mb"],
            "product_steady_mb": res["product"]["rss_mb"],
            "seed_style_steady_mb": res["seed"]["rss_mb"],
            "ratio": res["product"]["peak_rss_mb"] / res["seed"]["peak_rss_mb"],
            "steps": sz["memory_steps"]}


# ----------------------------------------------------------------------------- report

def _status(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "missed"


def table(doc: dict) -> str:
    """The one markdown table of the run (every number is also in bench.json)."""
    t, th, rf = doc["triplets"], doc["throughput"], doc["roofline"]
    sc, mem, ep = doc["scaling"], doc["memory"], doc["epoch"]
    T = TARGETS
    k = lambda x: f"{x:,.0f}"  # noqa: E731
    rows = [
        ("triplets", f"seed loop (reference), {t['labels']:,} labels", f"{t['seed_loop_s']:.2f} s", "", ""),
        ("triplets", "vectorised create_pairs", f"{1e3 * t['vectorised_s']:.1f} ms", "", ""),
        ("triplets", "speed-up", f"{t['speedup']:,.0f}x", f">= {T['triplet_speedup']:.0f}x",
         _status(t["speedup"], T["triplet_speedup"])),
        ("triplets", "rank shard at W=4 / full set", f"{t['shard_w4_fraction']:.2f}", "~0.25", ""),
        ("throughput", f"seed-style pipeline, B={th['batch_size']}",
         f"{k(th['seed_style_triplets_per_s'])} triplets/s", "", ""),
        ("throughput", "product step", f"{k(th['product_triplets_per_s'])} triplets/s "
         f"({th['product_cores']:.2f} cores busy)", "", ""),
        ("throughput", "product step as before the speed work (per-step index copy + loss ops)",
         f"{k(th['product_before_triplets_per_s'])} triplets/s", "", ""),
        ("throughput", "speed-up", f"{th['speedup']:.2f}x", f">= {T['throughput_speedup']}x",
         _status(th["speedup"], T["throughput_speedup"])),
        ("roofline", "FLOPs per triplet", f"{rf['flops_per_triplet'] / 1e6:.3f} MFLOP", "", ""),
        ("roofline", f"NumPy GEMM at step shapes, {rf['threads']} thread(s)",
         f"{rf['gemm_gflops']:.1f} GFLOP/s = {k(rf['roofline_triplets_per_s'])} triplets/s", "", ""),
        ("roofline", f"product step, {rf['threads']} thread(s)",
         f"{rf['product_gflops']:.1f} GFLOP/s = {100 * rf['fraction']:.0f}%",
         f">= {100 * T['roofline_fraction']:.0f}%", _status(rf["fraction"], T["roofline_fraction"])),
        ("roofline", "NumPy GEMM at step shapes, 1 thread",
         f"{rf['gemm_gflops_1thread']:.1f} GFLOP/s = {k(rf['roofline_triplets_per_s_1thread'])} "
         "triplets/s", "", ""),
        ("roofline", "one Horovod rank, 1 thread",
         f"{rf['one_rank_gflops']:.1f} GFLOP/s = {100 * rf['one_rank_fraction']:.0f}%",
         f">= {100 * T['roofline_fraction']:.0f}%",
         _status(rf["one_rank_fraction"], T["roofline_fraction"])),
        ("scaling", "Horovod 1 rank x 1 thread", f"{k(sc['one_rank_triplets_per_s'])} triplets/s "
         f"({sc['one_rank_cores']:.2f} cores busy)", "", ""),
        ("scaling", "Horovod 2 ranks, per rank",
         " / ".join(k(x) for x in sc["two_rank_per_rank_triplets_per_s"]) + " triplets/s ("
         + " / ".join(f"{c:.2f}" for c in sc["two_rank_cores"]) + " cores busy)", "", ""),
        ("scaling", "Horovod 2 ranks, total", f"{k(sc['two_rank_total_triplets_per_s'])} triplets/s", "", ""),
        ("scaling", "efficiency", f"{100 * sc['efficiency']:.0f}%",
         f">= {100 * T['scaling_efficiency']:.0f}%", _status(sc["efficiency"], T["scaling_efficiency"])),
        ("scaling", "bare allreduce of the gradients, 2 ranks", f"{sc['bare_allreduce_ms']:.2f} ms "
         f"(2-rank step {sc['two_rank_step_ms'][0]:.1f} ms, 1-rank {sc['one_rank_step_ms']:.1f} ms)",
         "", ""),
        ("scaling", "reference: 2 independent 1-thread processes (no Horovod)",
         " / ".join(k(x) for x in sc["two_independent_triplets_per_s"]) + " triplets/s = "
         f"{100 * sc['two_independent_efficiency']:.0f}%", "", ""),
        ("memory", "seed-style peak RSS", f"{mem['seed_style_peak_mb']:,.0f} MiB", "", ""),
        ("memory", "product peak RSS", f"{mem['product_peak_mb']:,.0f} MiB", "", ""),
        ("memory", "product / seed-style", f"{mem['ratio']:.2f} (floor `import mxnet` "
         f"{mem['floor_mb']:,.0f} MiB)", f"<= {T['memory_ratio']}",
         _status(mem["ratio"], T["memory_ratio"], higher=False)),
    ]
    phases = ep["phases_s"]
    total = sum(phases.values())
    where = f"epoch (2 ranks x {ep['steps']} steps)"
    for name, sec in phases.items():
        rows.append((where, f"{name}",
                     f"{sec:.2f} s ({100 * sec / total:.0f}%)", "", ""))
    rows.append((where, "the same epoch pipelined (no waits)",
                 f"{ep['pipelined_epoch_s']:.2f} s", "", ""))
    lines = ["| section | measurement | value | target | status |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_triplet.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short windows and few steps: for development and the smoke test")
    p.add_argument("--out", help="run directory for bench.json (default runs/bench-<timestamp>)")
    p.add_argument("--batch-size", type=int, default=256, help="triplets per step (per rank)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of the one-process measurements (default: $OMP_NUM_THREADS "
                        "or the number of cores)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic data of Fashion-MNIST's shape even when it is installed")
    p.add_argument("--train-size", type=int, default=0,
                   help="use the first N training rows (0 = all 60,000)")
    args = p.parse_args(argv)
    if args.threads <= 0:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every section, print the table, write bench.json; returns the exit status."""
    args = parse_args(argv)
    # Before MXNet loads: its OpenMP pool and MKL-DNN read these once.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out_dir = args.out or os.path.join("runs", f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    sz = sizes(args.quick)
    t_start, run_load = time.perf_counter(), ForeignLoad()

    images, labels, source = load_data(args.synthetic, args.train_size)
    cfg = make_cfg(args.batch_size)
    widths = [images.shape[1]] + list(cfg.model.hidden)
    doc: Dict[str, dict] = {"meta": dict(machine_info(), data=source, rows=int(len(labels)),
                                         batch_size=args.batch_size, threads=args.threads,
                                         quick=args.quick, targets=TARGETS)}

    foreign: Dict[str, float] = {}

    def stage(name, fn):
        t, load = time.perf_counter(), ForeignLoad()
        doc[name] = fn()
        foreign[name] = load.cores()
        print(f"[bench] {name}: {time.perf_counter() - t:.1f} s, other processes "
              f"{foreign[name]:.2f} cores", file=sys.stderr, flush=True)

    stage("triplets", lambda: bench_triplets(labels, sz["vec_reps"]))
    stage("throughput", lambda: bench_throughput(args, cfg, images, labels, sz))
    del images
    stage("roofline", lambda: bench_roofline(args, widths, sz))
    stage("scaling+epoch", lambda: bench_scaling(args, sz))
    doc.update(doc.pop("scaling+epoch"))
    stage("memory", lambda: bench_memory(args, sz))
    roofline_fractions(doc)
    doc["meta"]["wall_s"] = time.perf_counter() - t_start
    doc["meta"]["foreign_cores"] = run_load.cores()
    doc["meta"]["foreign_cores_by_section"] = foreign
    doc["meta"]["blas"] = doc["roofline"].get("blas") or doc["roofline"].get("blas_1thread")
    doc["meta"]["loadavg_end"] = list(os.getloadavg())

    text = table(doc)
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"dist_triplet benchmark, {doc['meta']['date']}, {doc['meta']['cpu']} x "
          f"{doc['meta']['nproc']}, data: {source}, {args.threads} thread(s)"
          f"{', --quick' if args.quick else ''}; other processes used "
          f"{doc['meta']['foreign_cores']:.2f} cores on average ("
          + ", ".join(f"{k} {v:.2f}" for k, v in foreign.items()) + ")\n")
    print(text)
    print(f"\n{os.path.abspath(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
