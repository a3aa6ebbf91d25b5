"""Triplet sampling: which rows form (anchor, positive, negative) triplets.

Pure NumPy; imports neither MXNet nor Horovod, so it runs and is tested
anywhere. One representation everywhere: an ``(M, 3)`` int64 array of row
indices into the data set, columns (anchor, positive, negative); never copies
of pixels.

Samplers:

* :func:`create_pairs` - offline triplets, a vectorised form of the seed
  article's ``create_pairs`` (class-balanced: ``min class count - 1`` triplets
  per class), sharded by rank. :func:`seed_create_pairs` keeps the article's
  loop as the labelled reference.
* :func:`pk_batches` - P classes x K samples per batch for online (batch-hard)
  mining, after Schroff et al. 2015 (FaceNet) and Hermans et al. 2017,
  "In Defense of the Triplet Loss for Person Re-Identification".
* :func:`pk_global_batches` - the P x K batches of global mining
  (``sampler.scope: global``): the same P classes on every worker, K images
  each, so the global batch is one P x (W K) batch.

Randomness comes only from ``np.random.default_rng(SeedSequence([seed, epoch,
rank, stream]))``: reproducible, different on every rank, new every epoch,
and no global RNG is touched.

Every rank gets a shard of exactly the same length (or shape): under Horovod
a rank with fewer steps would stop calling allreduce and the others would
wait for it forever.
"""
from __future__ import annotations

import random

import numpy as np

__all__ = [
    "ClassIndex",
    "create_pairs",
    "shard_length",
    "pk_batches",
    "pk_global_batches",
    "pk_steps_per_epoch",
    "seed_create_pairs",
]

# Stream tags keep the two samplers' random streams independent for the same
# (seed, epoch, rank); any fixed distinct non-negative ints would do.
_PAIRS_STREAM = 0x54524950  # "TRIP"
_PK_STREAM = 0x504B  # "PK"


class ClassIndex:
    """Per-class index of a label vector, built once and reused every epoch.

    Sorting labels is the only O(N log N) step; per-epoch sampling then works
    from ``order`` and ``offsets`` alone.

    Args:
        labels: (N,) integer class ids (any integer values; need not be 0..C-1).

    Attributes:
        classes: (C,) int64 sorted distinct class ids.
        counts: (C,) int64 number of samples of each class.
        order: (N,) int64 ``np.argsort(labels, kind='stable')``: the rows of
            class ``classes[c]`` are ``order[offsets[c]:offsets[c + 1]]``, in
            increasing row order (the class's "stable order").
        offsets: (C + 1,) int64 start of each class in ``order``; last = N.
        n: N, the number of rows.

    Raises:
        ValueError: ``labels`` is not a 1-D integer array; it holds fewer than
            2 classes (no negative is possible; the message gives the class
            found); or any class has fewer than 2 samples (anchor and positive
            must be distinct rows; the message names the class and its count).
            Such data sets cannot be used for triplets at all.
    """

    def __init__(self, labels):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, found shape "
                             f"{labels.shape} dtype {labels.dtype}")
        self.n = int(labels.shape[0])
        self.order = np.argsort(labels, kind="stable").astype(np.int64)
        classes, starts, counts = np.unique(labels[self.order], return_index=True,
                                            return_counts=True)
        if classes.size < 2:
            raise ValueError(
                f"triplets need at least 2 classes (a negative must come from another "
                f"class); found {classes.size} class(es): {classes.tolist()}")
        small = np.flatnonzero(counts < 2)
        if small.size:
            c = small[0]
            raise ValueError(
                f"class {classes[c]} has {counts[c]} sample(s); every class needs at least 2 "
                f"because anchor and positive must be distinct rows")
        self.classes = classes.astype(np.int64)
        self.counts = counts.astype(np.int64)
        self.offsets = np.append(starts, self.n).astype(np.int64)

    @property
    def num_classes(self) -> int:
        return int(self.classes.size)

    @property
    def min_count(self) -> int:
        return int(self.counts.min())

    def part_sizes(self, rank: int, world_size: int) -> np.ndarray:
        """(C,) int64 size of each class's part owned by ``rank``.

        Rank r owns the members at positions r, r+W, r+2W, ... of each class's
        stable order, i.e. ceil((count - r) / W) of them (0 when r >= count).
        """
        return np.maximum(self.counts - rank + world_size - 1, 0) // world_size

    def member(self, cls: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Row index of the ``pos``-th member (stable order) of class slot ``cls``."""
        return self.order[self.offsets[cls] + pos]


def _as_index(labels_or_index) -> ClassIndex:
    if isinstance(labels_or_index, ClassIndex):
        return labels_or_index
    return ClassIndex(labels_or_index)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, found {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), found {rank}")


def _rng(seed: int, epoch: int, rank: int, stream: int) -> np.random.Generator:
    for name, value in (("seed", seed), ("epoch", epoch), ("rank", rank)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (SeedSequence entropy), found {value}")
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, stream]))


def _per_class(index: ClassIndex, world_size: int) -> int:
    n_r = (index.min_count - 1) // world_size
    if n_r == 0:
        raise ValueError(
            f"world_size {world_size} is too large: the smallest class has "
            f"{index.min_count} samples, so (min_count - 1) // world_size = 0 anchors "
            f"per class per rank; use at most {index.min_count - 1} ranks")
    return n_r


def shard_length(labels_or_index, world_size: int) -> int:
    """Number of triplets :func:`create_pairs` gives each rank: ``C * ((min_count - 1) // W)``.

    The same on every rank, so every rank runs the same number of steps.

    Args:
        labels_or_index: (N,) integer labels or a :class:`ClassIndex` of them.
        world_size: number of ranks W >= 1.

    Raises:
        ValueError: see :class:`ClassIndex`; or W so large that a rank would
            get no anchor (message names W and the smallest class count).
    """
    index = _as_index(labels_or_index)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, found {world_size}")
    return index.num_classes * _per_class(index, world_size)


def create_pairs(labels_or_index, *, seed: int, epoch: int = 0, rank: int = 0,
                 world_size: int = 1) -> np.ndarray:
    """Class-balanced random triplets for one rank and one epoch (vectorised).

    Semantics of the seed article's ``create_pairs`` (see
    :func:`seed_create_pairs`), without its Python loops:

    * ``n = min class count - 1`` triplets per class at world size 1, so
      Fashion-MNIST train (60,000 labels, 6,000 per class) gives 59,990 and
      test (10,000) gives 9,990, as the article's 8,910 for MNIST test.
    * positive: uniform over the *other* members of the anchor's class (the
      article reshuffles the class every iteration, so its (anchor, positive)
      is a uniform random distinct pair).
    * negative: class ``(c + randint(1, C)) % C``, i.e. uniform over the other
      classes, then a uniform member of that class.
    * anchors: drawn *without* replacement within a class, unlike the article
      (whose reshuffles may repeat an anchor), so an epoch covers more rows.

    Sharding: rank r of W draws anchors only from its own part of each class,
    the members at positions r, r+W, r+2W, ... of the class's stable order
    (disjoint across ranks, found without any shared permutation, so each rank
    does ~1/W of the work), taking the first ``n_r = (min_count - 1) // W`` of
    a random permutation of that part. Every rank's shard therefore has exactly
    ``C * n_r`` rows (:func:`shard_length`): equal step counts, which Horovod's
    allreduce needs (a rank with fewer steps deadlocks the others). Positives
    and negatives may come from the whole data set. Rows are shuffled at the
    end, as the article's ``DataLoader(shuffle=True)``.

    Args:
        labels_or_index: (N,) integer labels, or a :class:`ClassIndex` built
            once from them (avoids re-sorting every epoch).
        seed: run seed, >= 0.
        epoch: epoch number, >= 0; a new epoch gives new triplets.
        rank: this rank, 0 <= rank < world_size.
        world_size: number of ranks W >= 1.

    Returns:
        (C * n_r, 3) int64 row indices (anchor, positive, negative), from
        ``default_rng(SeedSequence([seed, epoch, rank, stream]))``.

    Raises:
        ValueError: fewer than 2 classes or a class with fewer than 2 samples
            (see :class:`ClassIndex`); bad rank / world size / negative seed;
            ``n_r == 0`` (message names W and the smallest class count).
    """
    index = _as_index(labels_or_index)
    _check_rank(rank, world_size)
    n_r = _per_class(index, world_size)
    rng = _rng(seed, epoch, rank, _PAIRS_STREAM)
    n_cls = index.num_classes

    # This rank's part of every class, laid out class-major: element e is the
    # j-th member of the part of class slot part_cls[e], at position r + W*j.
    sizes = index.part_sizes(rank, world_size)  # (C,), each >= n_r (shown in docs above)
    part_cls = np.repeat(np.arange(n_cls), sizes)
    part_start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    j = np.arange(part_cls.size) - part_start[part_cls]
    pos_in_class = rank + world_size * j

    # Random permutation within each part: sort by class + a random key in [0, 1) (the
    # order of lexsort((key, class)), but one float sort: 4.9 against 8.6 ms at 60,000).
    perm = np.argsort(part_cls + rng.random(part_cls.size))
    take = (part_start[:, None] + np.arange(n_r)[None, :]).ravel()  # first n_r per class
    chosen = perm[take]
    a_cls = part_cls[chosen]  # (C * n_r,)
    a_pos = pos_in_class[chosen]

    # Positive: uniform over the count - 1 other members; skipping the
    # anchor's own position keeps it uniform and distinct without rejection.
    p_pos = rng.integers(0, index.counts[a_cls] - 1)
    p_pos = p_pos + (p_pos >= a_pos)

    # Negative: the article's (d + randrange(1, C)) % C, then a uniform member.
    n_cls_slot = (a_cls + rng.integers(1, n_cls, size=a_cls.size)) % n_cls
    n_pos = rng.integers(0, index.counts[n_cls_slot])

    triplets = np.stack([index.member(a_cls, a_pos), index.member(a_cls, p_pos),
                         index.member(n_cls_slot, n_pos)], axis=1)
    return triplets[rng.permutation(triplets.shape[0])].astype(np.int64, copy=False)


def pk_steps_per_epoch(labels_or_index, p: int, k: int, world_size: int) -> int:
    """Steps per epoch for :func:`pk_batches`: ``max(1, N // (p * k * W))``.

    So one epoch over all ranks sees about N samples, as one pass would.
    """
    index = _as_index(labels_or_index)
    if p < 1 or k < 1 or world_size < 1:
        raise ValueError(f"p, k and world_size must be >= 1, found p={p}, k={k}, "
                         f"world_size={world_size}")
    return max(1, index.n // (p * k * world_size))


# Up to this many (steps x C) random keys, batches draw their classes by sorting keys;
# beyond it by Floyd's algorithm (O(steps p^2)), so 1,000,000 labels of 100,000 classes
# need milliseconds, not a 3 GB key matrix. Both give uniform random p-subsets in random
# order; the threshold keeps the streams of existing (smaller) runs unchanged.
_SORT_KEYS_MAX = 1 << 22


def _distinct_classes(rng: np.random.Generator, steps: int, n_cls: int, p: int) -> np.ndarray:
    """(steps, p) int64 class slots, p distinct of ``n_cls`` per row, uniformly random."""
    if steps * n_cls <= _SORT_KEYS_MAX:
        # The first p of a random permutation of C.
        return np.argsort(rng.random((steps, n_cls)), axis=1)[:, :p]
    # Floyd's algorithm (Bentley & Floyd, "Programming Pearls: A Sample of Brilliance",
    # CACM 1987), vectorised over rows: for j = C-p .. C-1 draw t in [0, j] and take t, or
    # j when t is taken already. The subset is uniform; its order is then shuffled.
    picks = np.zeros((steps, p), dtype=np.int64)
    for i in range(p):
        top = n_cls - p + i
        t = rng.integers(0, top + 1, size=steps)
        seen = (picks[:, :i] == t[:, None]).any(axis=1)
        picks[:, i] = np.where(seen, top, t)
    return rng.permuted(picks, axis=1)


def pk_batches(labels_or_index, *, p: int, k: int, steps: int, seed: int, epoch: int = 0,
               rank: int = 0, world_size: int = 1) -> np.ndarray:
    """P x K class-balanced batches for online (batch-hard) triplet mining.

    After FaceNet (Schroff et al. 2015) and Hermans et al. 2017, "In Defense
    of the Triplet Loss": each batch holds ``p`` distinct classes drawn
    uniformly, and ``k`` samples of each, taken from this rank's own part of
    the class (positions r, r+W, ... of its stable order, as in
    :func:`create_pairs`): without replacement when the part has >= k
    members, else with replacement.

    The result has the same shape on every rank by construction, so every
    rank runs ``steps`` steps (unequal step counts deadlock allreduce).

    Args:
        labels_or_index: (N,) integer labels or a :class:`ClassIndex`.
        p: classes per batch, 2 <= p <= C (a negative needs a second class).
        k: samples per class, >= 2 (a positive needs a second sample).
        steps: number of batches, >= 1 (see :func:`pk_steps_per_epoch`).
        seed, epoch, rank, world_size: as :func:`create_pairs`; the random
            stream differs from create_pairs' for the same values.

    Returns:
        (steps, p * k) int64 row indices, class-major: columns
        ``[i * k:(i + 1) * k]`` of a batch are one class.

    Raises:
        ValueError: p > C (message names p and C), p < 2, k < 2, steps < 1,
            bad rank / world size, or W greater than the smallest class count
            (a rank would own no member of that class); see also
            :class:`ClassIndex`.
    """
    index = _as_index(labels_or_index)
    _check_rank(rank, world_size)
    n_cls = index.num_classes
    if p > n_cls:
        raise ValueError(f"p={p} classes per batch but the data set has only C={n_cls} classes")
    if p < 2 or k < 2:
        raise ValueError(f"triplet mining in a P x K batch needs p >= 2 (a negative class) and k >= 2 (a positive), found p={p}, k={k}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, found {steps}")
    if world_size > index.min_count:
        # Checked on min_count, not on this rank's parts, so all ranks agree.
        raise ValueError(f"world_size {world_size} exceeds the smallest class count "
                         f"{index.min_count}: some rank would own no member of that class")
    rng = _rng(seed, epoch, rank, _PK_STREAM)

    # p distinct classes per batch, uniform over the p-subsets of C, in random order.
    cls = _distinct_classes(rng, steps, n_cls, p).reshape(-1)  # (steps*p,)
    size = index.part_sizes(rank, world_size)[cls]  # (steps*p,), each >= 1

    # Without replacement, k of `size`: Floyd's algorithm vectorised over rows;
    # the loop runs over k, never over samples.
    rows = cls.size
    picks = np.zeros((rows, k), dtype=np.int64)
    for i in range(k):
        top = np.maximum(size - k + i, 0)  # Floyd's j; clipped rows are replaced below
        t = rng.integers(0, top + 1)
        seen = (picks[:, :i] == t[:, None]).any(axis=1)
        picks[:, i] = np.where(seen, top, t)
    # Floyd's subset is uniform but its order is not; the order is irrelevant
    # to mining, yet shuffling keeps every column identically distributed.
    picks = rng.permuted(picks, axis=1)
    with_repl = rng.integers(0, size[:, None], size=(rows, k))
    picks = np.where((size >= k)[:, None], picks, with_repl)

    pos_in_class = rank + world_size * picks
    batch = index.member(np.repeat(cls, k), pos_in_class.reshape(-1))
    return batch.reshape(steps, p * k).astype(np.int64, copy=False)


def pk_global_batches(labels_or_index, *, p: int, k: int, steps: int, seed: int,
                      epoch: int = 0, workers: int = 1) -> np.ndarray:
    """P x K batches for global mining: all workers draw the *same* p classes, each
    with its own k images of every class.

    One global P x (workers * k) batch is drawn per step from the whole data set
    (:func:`pk_batches` at rank 0 of 1, k' = workers * k: without replacement when
    a class has >= k' members) and each class's k' images are dealt out, k to each
    worker. Every worker computes the same global batches (no communication) and
    takes its own slice. Sharing classes is what makes the global batch worth
    mining: every anchor has workers * k - 1 positives, across workers, instead of
    k - 1 on its own worker; with different classes per worker no positive would
    ever sit on another worker. And the global batch does not depend on how it is
    split: W workers x k see exactly the rows one process with k' = W * k would.

    Args:
        labels_or_index: (N,) integer labels or a :class:`ClassIndex`.
        p: classes per batch, 2 <= p <= C.
        k: samples per class per worker, >= 2.
        steps: batches per epoch, >= 1.
        seed, epoch: as :func:`pk_batches` (no rank: the draw is global).
        workers: number of workers W >= 1.

    Returns:
        (steps, workers, p * k) int64 row indices; ``[s, w]`` is worker w's batch,
        class-major (columns ``[i * k:(i + 1) * k]`` are class slot i, the same
        class on every worker). Concatenating ``[s, 0], [s, 1], ...`` gives the
        global batch in worker order.

    Raises:
        ValueError: as :func:`pk_batches`; ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")
    if k < 2:
        raise ValueError(f"triplet mining in a P x K batch needs k >= 2 (a positive), found k={k}")
    batch = pk_batches(labels_or_index, p=p, k=k * workers, steps=steps, seed=seed,
                       epoch=epoch, rank=0, world_size=1)            # (steps, p * W * k)
    batch = batch.reshape(steps, p, workers, k).transpose(0, 2, 1, 3)  # (steps, W, p, k)
    return np.ascontiguousarray(batch.reshape(steps, workers, p * k))


def seed_create_pairs(labels, rng) -> np.ndarray:
    """The seed article's ``create_pairs``, kept as a loop for reference.

    Faithful to the article (MXNet/Gluon Triplet Loss, ``create_pairs``),
    except that it returns row indices instead of pixel copies and takes its
    randomness from ``rng`` instead of the global ``np.random`` / ``random``:
    ``n = min class count - 1``; for each class d and i < n, reshuffle d's
    index array (``np.random.shuffle`` on a NumPy array, as the article),
    anchor = its i-th, positive = its (i+1)-th, negative class
    ``dn = (d + randrange(1, C)) % C`` and negative = ``digit_indices[dn][i]``
    (the i-th of dn's array in whatever order its last shuffle left it).

    O(C * n * class size) because of the reshuffle per triplet (about 5 s on
    60,000 labels here): for the benchmark and tests, not for training.

    Args:
        labels: (N,) integer labels.
        rng: ``np.random.RandomState`` (shuffles and draws), or a
            ``random.Random`` from which one is seeded.

    Returns:
        (C * (min_count - 1), 3) int64 row indices (anchor, positive, negative).

    Raises:
        ValueError: as :class:`ClassIndex` (fewer than 2 classes, or a class
            with fewer than 2 samples).
    """
    if isinstance(rng, random.Random):
        rng = np.random.RandomState(rng.getrandbits(32))
    labels = np.asarray(labels)
    ClassIndex(labels)  # same validation and messages as the vectorised sampler
    label_list = np.unique(labels)
    digit_indices = [np.where(labels == i)[0] for i in label_list]
    num_classes = len(label_list)
    pairs = []
    n = min(len(digit_indices[d]) for d in range(num_classes)) - 1
    for d in range(num_classes):
        for i in range(n):
            rng.shuffle(digit_indices[d])
            z1, z2 = digit_indices[d][i], digit_indices[d][i + 1]
            inc = rng.randint(1, num_classes)  # random.randrange(1, C) in the article
            dn = (d + inc) % num_classes
            z3 = digit_indices[dn][i]
            pairs.append((z1, z2, z3))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 3)


class EpochSampler:
    """This process's batches for an epoch, equal in number on every process.

    Offline: the ``create_pairs`` shard of (seed, epoch, process rank), cut into ``steps``
    batches of ``devices x batch_size`` triplets (the remainder is dropped so all processes
    and all steps have the same shape); the step splits each batch over the devices.
    P x K: ``pk_batches`` for each device, each device its own worker (scope 'local'), or
    this process's workers' slices of ``pk_global_batches`` (scope 'global').

    Args:
        labels: (N,) integer training labels.
        kind: ``'offline'`` or ``'pk'`` (``sampler.kind``).
        batch_size: triplets per worker per step (offline; ``train.batch_size``).
        p, k: classes per batch and samples per class (P x K).
        steps_per_epoch: P x K steps per epoch; 0 = as many as cover the set once.
        seed: the run seed (``train.seed``).
        rank, num_processes: this process's rank and the number of processes.
        worker_ranks: the global worker index of each of this process's devices
            (``Backend.worker_rank``); its length is the number of devices.
        num_workers: the world size (processes x devices).
        scope: ``'local'`` or ``'global'`` (``sampler.scope``, P x K only): in a global
            batch every worker has the same classes (see :func:`pk_global_batches`).

    Attributes:
        steps: steps per epoch (the same on every process).
        per_step: rows of this process's batch per step (devices x batch_size, or
            devices x P*K).

    Raises:
        ValueError: a class has fewer than 2 samples or there are fewer than 2 classes
            (``ClassIndex``); ``p`` above the number of classes; more workers than the
            smallest class has samples (P x K); a shard smaller than one step (offline).
            Messages name the config key.
    """

    def __init__(self, labels: np.ndarray, *, kind: str, batch_size: int, p: int, k: int,
                 steps_per_epoch: int, seed: int, rank: int, num_processes: int,
                 worker_ranks, num_workers: int, scope: str = "local"):
        self.index = ClassIndex(labels)
        self.scope = scope
        self.kind, self.p, self.k, self.seed = kind, p, k, seed
        self.rank, self.num_processes = rank, num_processes
        self.worker_ranks, self.num_workers = list(worker_ranks), num_workers
        devices = len(self.worker_ranks)
        if kind == "pk":
            if p > len(self.index.classes):
                raise ValueError(f"sampler.p={p} but the training set has only "
                                 f"{len(self.index.classes)} classes: a P x K batch takes "
                                 "sampler.p distinct classes; lower sampler.p")
            if scope == "local" and num_workers > self.index.min_count:
                # pk_batches gives each worker a disjoint part of every class (the global
                # scope draws from the whole data set: pk_global_batches).
                raise ValueError(
                    f"sampler.kind=pk with world size {num_processes} x {devices} device(s) = "
                    f"{num_workers} workers, but the smallest training class has only "
                    f"{self.index.min_count} samples: each worker needs its own member of "
                    "every class; use fewer workers or more data")
            # All workers together see about N samples per epoch.
            self.steps = steps_per_epoch or pk_steps_per_epoch(self.index, p, k, num_workers)
            self.per_step = devices * p * k
        else:
            shard = shard_length(self.index, num_processes)
            self.per_step = devices * batch_size
            self.steps = shard // self.per_step
            if self.steps == 0:
                raise ValueError(
                    f"train.batch_size={batch_size} x {devices} device(s) = "
                    f"{self.per_step} triplets per step, but each of the {num_processes} "
                    f"process(es) gets only {shard} triplets per epoch ({len(labels)} "
                    f"training samples; an epoch is {len(self.index.classes)} classes x "
                    f"(smallest class - 1) and the smallest has {self.index.min_count}): "
                    "lower train.batch_size or use more data")

    def epoch(self, epoch: int) -> np.ndarray:
        """(steps, per_step, 3) offline or (steps, devices, P*K) for P x K; int64."""
        if self.kind == "pk" and self.scope == "global":
            everyone = pk_global_batches(self.index, p=self.p, k=self.k, steps=self.steps,
                                         seed=self.seed, epoch=epoch, workers=self.num_workers)
            return np.ascontiguousarray(everyone[:, self.worker_ranks])
        if self.kind == "pk":
            per_dev = [pk_batches(self.index, p=self.p, k=self.k, steps=self.steps,
                                  seed=self.seed, epoch=epoch, rank=w,
                                  world_size=self.num_workers)
                       for w in self.worker_ranks]
            return np.stack(per_dev, axis=1)
        trip = create_pairs(self.index, seed=self.seed, epoch=epoch, rank=self.rank,
                            world_size=self.num_processes)
        return trip[: self.steps * self.per_step].reshape(self.steps, self.per_step, 3)
