"""Global mining (sampler.scope: global, issue 13) is exact.

Single-process checks of the construction (mining.mine_pool, mining.PoolTripletLoss): W
simulated workers, each mining its own anchors against the whole batch, pick the whole
batch's triplets, and their gradients with respect to the whole batch sum to the gradient
of one process; each worker's own rows' gradient alone does not. Then the real step: kvstore
on 2 CPU devices and Horovod with 2 Gloo ranks (tests/global_mining_worker.py) mine the
same triplets, report the same loss and make the same parameter updates (1e-5 after one
step, 1e-4 after 20) as one process stepping on the concatenated global batch.
"""
from __future__ import annotations


import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="mining runs on MXNet")

from _hvd import run_two_rank_worker  # noqa: E402
import global_mining_worker as worker  # noqa: E402
from dist_triplet import dist  # noqa: E402
from dist_triplet.config import ConfigError, load_config  # noqa: E402
from dist_triplet.mining import MinedTripletLoss, PoolTripletLoss, mine_pool  # noqa: E402
from dist_triplet.triplets import pk_batches, pk_global_batches  # noqa: E402

W, B, DIM, MARGIN = 3, 8, 4, 0.5
CASES = [("batch_hard", None), ("semi_hard", None), ("semi_hard", 2 * W)]


def global_batch(seed=0):
    """W workers x 8 rows: 4 classes x 2 images on every worker, worker-major."""
    rng = np.random.RandomState(seed)
    emb = rng.randn(W * B, DIM).astype(np.float32)
    labels = np.tile(np.repeat(np.arange(4), 2), W).astype(np.float32)
    return emb, labels


def own_rows(w, rows=B):
    """(rows,) float32 global rows of worker ``w``: its anchors."""
    return mx.nd.arange(w * rows, (w + 1) * rows, dtype="float32")


def full_gradient(block, emb, labels):
    """(loss, d loss / d emb) of one process on the whole batch."""
    x = mx.nd.array(emb)
    x.attach_grad()
    with mx.autograd.record():
        loss = block(x, mx.nd.array(labels))
    loss.backward()
    return loss.asscalar(), x.grad.asnumpy()


def worker_sums(block, emb, labels, w):
    """(total, count, d total / d pool) of worker ``w``'s anchors against the pool."""
    pool = mx.nd.array(emb)
    pool.attach_grad()
    with mx.autograd.record():
        total, count = block(pool, mx.nd.array(labels), own_rows(w))
    total.backward()
    return total.asscalar(), count.asscalar(), pool.grad.asnumpy()


@pytest.mark.parametrize("miner, k", CASES)
def test_pool_mining_of_a_subset_picks_the_full_batch_triplets_of_those_anchors(miner, k):
    emb, labels = global_batch()
    positives = None if miner == "batch_hard" or k is None else k - 1
    full = mine_pool(mx.nd, mx.nd.array(emb), mx.nd.array(labels), None, MARGIN, miner,
                     positives)
    full = np.stack([x.asnumpy() for x in full], axis=1)           # (T, 4): a, p, n, weight
    per_anchor = len(full) // (W * B)
    for w in range(W):
        got = mine_pool(mx.nd, mx.nd.array(emb), mx.nd.array(labels), own_rows(w), MARGIN,
                        miner, positives)
        got = np.stack([x.asnumpy() for x in got], axis=1)
        np.testing.assert_array_equal(got, full[w * B * per_anchor:(w + 1) * B * per_anchor])


@pytest.mark.parametrize("anchors", [None, (8, 40)])
def test_sorted_semi_hard_picks_the_compared_triplets_ties_included(monkeypatch, anchors):
    """The two semi-hard searches (mining.SORT_FROM chooses) pick the same triplets,
    including exact ties: duplicated rows put negatives at exactly the positive's
    distance (not farther) and several negatives at one distance (the lower row wins),
    as a plain loop over the float32 distance matrix says."""
    from dist_triplet import mining
    rng = np.random.RandomState(3)
    emb = rng.randn(80, 16).astype(np.float32)
    emb[5] = emb[3]           # a positive twice (class 0)
    emb[17] = emb[3]          # and a negative at the same place (class 2)
    emb[40] = emb[41] = emb[2]
    emb = mx.nd.L2Normalization(mx.nd.array(emb))
    labels = np.repeat(np.arange(10), 8).astype(np.float32)
    rows = None if anchors is None else mx.nd.arange(*anchors, dtype="float32")
    got = {}
    for sort_from, pool_rows in ((1, None), (1, 80), (10 ** 9, None)):
        monkeypatch.setattr(mining, "SORT_FROM", sort_from)
        got[sort_from, pool_rows] = [x.asnumpy() for x in mine_pool(
            mx.nd, emb, mx.nd.array(labels), rows, MARGIN, "semi_hard", 7, rows=pool_rows)]
    for key in ((1, 80), (10 ** 9, None)):   # a 7-step search (80 rows) or 24 steps
        for x, y in zip(got[1, None], got[key]):
            np.testing.assert_array_equal(x, y)
    got[1] = got[1, None]
    # The float32 matrix the miner reads: GEMMs of other shapes may round differently.
    first, last = (0, 80) if anchors is None else anchors
    own = (np.arange(first, last)[:, None] == np.arange(80)[None, :]).astype(np.float32)
    d = mining.pool_sq_dist(mx.nd, emb[first:last], emb, mx.nd.array(own)).asnumpy()
    a, p, n, w = (x.astype(int) for x in got[1])
    ties = 0
    for i in np.flatnonzero(w):
        row = d[a[i] - first]
        negs = [j for j in range(80) if labels[j] != labels[a[i]]]
        far = [j for j in negs if row[j] > row[p[i]]]
        want = (min(far, key=lambda j: (row[j], j)) if far else
                max(negs, key=lambda j: (row[j], -j)))
        assert n[i] == want
        ties += sum(row[j] == row[p[i]] for j in negs)
    assert ties > 0           # the data did put negatives at a positive's distance


@pytest.mark.parametrize("miner, k", CASES)
@pytest.mark.parametrize("hybridize", [False, True])
def test_simulated_workers_sum_to_single_process_gradient(miner, k, hybridize):
    """Each worker: its own anchors against the whole batch, the gradient with respect to
    the whole batch; summed over workers and divided by the summed triplet count, the
    loss and gradient of one process on the whole batch."""
    emb, labels = global_batch()
    want_loss, want_grad = full_gradient(MinedTripletLoss(MARGIN, miner, k=k), emb, labels)
    assert want_loss > 0 and np.abs(want_grad).max() > 1e-2
    block = PoolTripletLoss(MARGIN, miner, k=k)
    if hybridize:
        block.hybridize(static_alloc=True, static_shape=True)
    sums = [worker_sums(block, emb, labels, w) for w in range(W)]
    count = sum(c for _, c, _ in sums)
    np.testing.assert_allclose(sum(t for t, _, _ in sums) / count, want_loss, rtol=1e-6)
    np.testing.assert_allclose(sum(g for _, _, g in sums) / count, want_grad, rtol=1e-6,
                               atol=1e-7)


def test_own_rows_gradient_alone_is_not_the_single_process_one():
    """Why the (G, D) gradients are summed over workers before each backpropagates its
    own rows: a worker's own rows also get gradient as the positives and negatives of
    other workers' anchors, which only those workers compute."""
    emb, labels = global_batch()
    _, want = full_gradient(MinedTripletLoss(MARGIN, "batch_hard"), emb, labels)
    block = PoolTripletLoss(MARGIN, "batch_hard")
    sums = [worker_sums(block, emb, labels, w) for w in range(W)]
    count = sum(c for _, c, _ in sums)
    alone = np.concatenate([g[w * B:(w + 1) * B] for w, (_, _, g) in enumerate(sums)]) / count
    assert np.abs(alone - want).max() > 1e-2


# ----------------------------------------------------------------------------- sampler

def test_pk_global_batches_same_classes_disjoint_images():
    labels = np.repeat(np.arange(6), 20)
    g = pk_global_batches(labels, p=4, k=3, steps=5, seed=1, epoch=2, workers=3)
    assert g.shape == (5, 3, 12) and g.dtype == np.int64
    for s in range(5):
        cls = labels[g[s]].reshape(3, 4, 3)                  # (workers, p, k)
        assert np.all(cls == cls[:, :, :1])                  # class-major on every worker
        assert np.all(cls[:, :, 0] == cls[0, :, 0])          # the same classes everywhere
        assert len(set(cls[0, :, 0])) == 4
        assert len(set(g[s].ravel())) == 36                  # no image twice in the step
    # The global batch is pk_batches' P x (W K) batch, dealt k per worker.
    ref = pk_batches(labels, p=4, k=9, steps=5, seed=1, epoch=2).reshape(5, 4, 3, 3)
    np.testing.assert_array_equal(g, ref.transpose(0, 2, 1, 3).reshape(5, 3, 12))
    one = pk_global_batches(labels, p=4, k=3, steps=5, seed=1, epoch=2, workers=1)
    np.testing.assert_array_equal(one[:, 0], pk_batches(labels, p=4, k=3, steps=5, seed=1,
                                                        epoch=2))
    with pytest.raises(ValueError, match="workers"):
        pk_global_batches(labels, p=4, k=3, steps=5, seed=1, workers=0)


def sampler(cfg, labels, rank, processes, devices):
    """The sampler of process ``rank`` of ``processes`` with ``devices`` devices (a plain
    ``dist.Backend`` of that shape; no collective is used)."""
    from dist_triplet.plan import build_sampler
    backend = dist.Backend([mx.cpu(d) for d in range(devices)], rank=rank,
                           num_processes=processes)
    return build_sampler(cfg, backend, labels)


def test_epoch_sampler_global_scope_slices_the_global_batch():
    _, labels = worker.problem()
    cfg = worker.config("sgd", "batch_hard", "global")
    kv = sampler(cfg, labels, 0, 1, 2).epoch(4)
    ranks = [sampler(cfg, labels, r, 2, 1).epoch(4) for r in range(2)]
    assert kv.shape == (len(labels) // 12, 2, worker.P * worker.K)
    np.testing.assert_array_equal(kv, np.concatenate(ranks, axis=1))
    want = pk_global_batches(labels, p=worker.P, k=worker.K, steps=kv.shape[0],
                             seed=cfg.train.seed, epoch=4, workers=2)
    np.testing.assert_array_equal(kv, want)


def test_config_scope():
    cfg = load_config(None, ["sampler.kind=pk", "sampler.scope=global"])
    assert cfg.sampler.scope == "global"
    assert load_config(None, []).sampler.scope == "local"   # today's behaviour by default
    with pytest.raises(ConfigError, match="sampler.scope='global' needs sampler.kind='pk'"):
        load_config(None, ["sampler.scope=global"])
    with pytest.raises(ConfigError, match="sampler.scope"):
        load_config(None, ["sampler.kind=pk", "sampler.scope=world"])


# ----------------------------------------------------------------------------- the step

OPTS = list(worker.OPTIMIZERS)
PAIRS = [(o, m) for o in OPTS for m in worker.MINERS]


@pytest.fixture(scope="module")
def reference():
    """One process, the concatenated global batch."""
    return {(o, m): worker.run(dist.make_backend("local", "cpu"), o, m, "local")
            for o, m in PAIRS}


@pytest.fixture(scope="module")
def kvstore():
    return {(o, m): worker.run(dist.make_backend("kvstore", "cpu", "cpu:2"), o, m, "global")
            for o, m in PAIRS}


@pytest.fixture(scope="module")
def horovod(tmp_path_factory):
    """Both ranks' results of one 2-rank Gloo run: [rank] -> npz mapping."""
    return run_two_rank_worker("global_mining_worker.py", tmp_path_factory.mktemp("hvd_global_mining"))


def first(params: dict) -> dict:
    return {k: v[0] for k, v in params.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def tie_flips(got, want, emb, rows, miner, tol=1e-5) -> int:
    """Number of triplets where ``got`` and ``want`` (each (T, 3) data-set rows) differ;
    fails unless every difference is a tie in the reference embeddings ``emb`` (G, D) of
    the batch rows ``rows``: the two choices lie within ``tol`` squared-L2 of the anchor's
    distance to each other. Batch-hard has one triplet per anchor, semi-hard one per
    (anchor, positive) pair."""
    at = {r: i for i, r in enumerate(rows)}

    def dist(a, b):
        return float(np.sum((emb[at[a]] - emb[at[b]]) ** 2))

    def keyed(trip):
        return {(t[0],) if miner == "batch_hard" else (t[0], t[1]): tuple(t) for t in trip}

    got, want = keyed(np.asarray(got).tolist()), keyed(np.asarray(want).tolist())
    assert got.keys() == want.keys()
    flips = 0
    for key, w in want.items():
        g = got[key]
        if g != w:
            flips += 1
            a = w[0]
            for x, y in zip(g[1:], w[1:]):
                assert abs(dist(a, x) - dist(a, y)) < tol, (g, w, dist(a, x), dist(a, y))
    return flips


def check_against_reference(ref, triplets, losses, params, miner):
    """``params(step) -> {name: array}`` of the mode under test."""
    assert max_diff(params(0), first(ref["params"][0])) == 0.0           # same start
    # The step must move the parameters far more than the tolerance.
    assert max_diff(first(ref["params"][1]), first(ref["params"][0])) > 1e-3
    # From identical parameters the very same triplets; later the parameters differ by
    # float round-off (~1e-6), which may flip only a near-tie between two candidates.
    np.testing.assert_array_equal(triplets[0], ref["triplets"][0])
    rows = worker.global_batches(worker.problem()[1]).reshape(worker.STEPS, -1)
    flips = sum(tie_flips(triplets[s], ref["triplets"][s], ref["emb"][s], rows[s], miner)
                for s in range(worker.STEPS))
    assert flips <= 0.01 * worker.STEPS * len(ref["triplets"][0])
    np.testing.assert_allclose(losses, ref["loss"], rtol=0, atol=1e-5)
    assert max_diff(params(1), first(ref["params"][1])) < 1e-5
    assert max_diff(params(worker.STEPS), first(ref["params"][worker.STEPS])) < 1e-4


@pytest.mark.parametrize("opt, miner", PAIRS)
def test_kvstore_global_mining_equals_one_process_on_the_global_batch(reference, kvstore,
                                                                      opt, miner):
    ref, kv = reference[opt, miner], kvstore[opt, miner]
    check_against_reference(ref, kv["triplets"], kv["loss"], lambda s: first(kv["params"][s]),
                            miner)
    for params in kv["params"]:                    # the devices' copies stay bit-identical
        assert all(np.array_equal(v[0], v[1]) for v in params.values())


@pytest.mark.parametrize("opt, miner", PAIRS)
def test_horovod_global_mining_equals_one_process_on_the_global_batch(reference, horovod,
                                                                      opt, miner):
    ref = reference[opt, miner]

    def params(npz):
        prefix = f"{opt}:{miner}:"
        return lambda s: {k[len(prefix) + len(f"{s}:"):]: npz[k][0] for k in npz.files
                          if k.startswith(f"{prefix}{s}:")}

    for npz in horovod:
        check_against_reference(ref, npz[f"{opt}:{miner}:triplets"],
                                npz[f"{opt}:{miner}:loss"], params(npz), miner)
    for s in range(worker.STEPS + 1):             # allreduce keeps the ranks identical
        assert max_diff(params(horovod[0])(s), params(horovod[1])(s)) == 0.0


def test_local_scope_mines_inside_each_worker_batch(reference):
    """Local scope is today's: a kvstore step on two P x K batches applies the mean of
    the two single-device updates, and differs from global mining on the same rows."""
    from dist_triplet.model import build_embedding_net, initialize
    from dist_triplet.engine import build_step
    pixels, labels = worker.problem()
    rows = worker.global_batches(labels)[0]                              # (2, P*K)

    def one_step(backend, scope, batch):
        cfg = worker.config("sgd", "semi_hard", scope, k=worker.K)
        net = build_embedding_net(pixels.shape[1], [8, 4], final_relu=False, normalize=True)
        initialize(net, 0.5, backend.contexts, seed=1)
        build_step(cfg, backend, net, pixels, labels).step(batch)
        return {k: p.data(backend.contexts[0]).asnumpy() for k, p in net.collect_params().items()}

    kv = one_step(dist.make_backend("kvstore", "cpu", "cpu:2"), "local", rows)
    alone = [one_step(dist.make_backend("local", "cpu"), "local", rows[d:d + 1])
             for d in range(2)]
    mean = {k: (alone[0][k] + alone[1][k]) / 2 for k in kv}
    assert max_diff(kv, mean) < 1e-6
    glob = one_step(dist.make_backend("kvstore", "cpu", "cpu:2"), "global", rows)
    assert max_diff(glob, first(reference["sgd", "semi_hard"]["params"][1])) < 1e-5
    assert max_diff(kv, glob) > 1e-4


# ----------------------------------------------------------------------------- memory

@pytest.fixture(scope="module")
def memory_reference():
    """One process, the concatenated global batch, the same cross-batch memory."""
    return {(o, m): worker.run(dist.make_backend("local", "cpu"), o, m, "global",
                               memory=worker.MEMORY) for o, m in PAIRS}


def check_memory(ref, losses, params, without, opt):
    """The memory run of a mode against the one-process memory run ``ref``; ``without``:
    the reference without memory (the memory must change the losses).

    Measured: losses agree to 5e-7 at every step and SGD's parameters to 2e-7 after 20
    steps. Adam with batch-hard drifts to 1.3e-4 by step 20 while the losses still agree
    to 3e-8 (the same triplets): once most triplets are inactive, some gradients are
    near 0 and Adam's m / sqrt(v) turns their round-off into steps of size ~lr (0.01), as
    tests/equivalence_worker.py explains for the last bias. Hence 5e-4 for Adam there."""
    assert max_diff(params(0), first(ref["params"][0])) == 0.0
    np.testing.assert_allclose(losses, ref["loss"], rtol=0, atol=1e-5)
    assert max_diff(params(1), first(ref["params"][1])) < 1e-5
    final = 1e-4 if opt == "sgd" else 5e-4
    assert max_diff(params(worker.STEPS), first(ref["params"][worker.STEPS])) < final
    # Step 0 has an empty memory: the loss is global mining's; later the memory counts.
    assert abs(ref["loss"][0] - without["loss"][0]) < 1e-6
    assert np.abs(np.asarray(ref["loss"][1:]) - np.asarray(without["loss"][1:])).max() > 1e-3


@pytest.mark.parametrize("opt, miner", PAIRS)
def test_kvstore_memory_equals_one_process_with_the_same_memory(memory_reference, reference,
                                                               opt, miner):
    kv = worker.run(dist.make_backend("kvstore", "cpu", "cpu:2"), opt, miner, "global",
                    memory=worker.MEMORY)
    check_memory(memory_reference[opt, miner], kv["loss"], lambda s: first(kv["params"][s]),
                 reference[opt, miner], opt)


@pytest.mark.parametrize("opt, miner", PAIRS)
def test_horovod_memory_equals_one_process_with_the_same_memory(memory_reference, reference,
                                                               horovod, opt, miner):
    prefix = f"mem:{opt}:{miner}:"
    for npz in horovod:
        def params(s, npz=npz):
            return {k[len(prefix) + len(f"{s}:"):]: npz[k][0] for k in npz.files
                    if k.startswith(f"{prefix}{s}:")}
        check_memory(memory_reference[opt, miner], npz[f"{prefix}loss"], params,
                     reference[opt, miner], opt)


def test_memory_config_needs_global_scope():
    with pytest.raises(ConfigError, match=r"sampler\.memory=4 needs sampler\.scope='global'"):
        load_config(None, ["sampler.kind=pk", "sampler.memory=4"])
    assert load_config(None, ["sampler.kind=pk", "sampler.scope=global",
                              "sampler.memory=4"]).sampler.memory == 4
