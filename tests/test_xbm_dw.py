"""Cross-batch memory mining and distance-weighted sampling (mining.py) against plain
NumPy loops, and the augmentation gather (augment.py) against a padded-crop reference."""
import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="mining runs on MXNet")

from dist_triplet import mining  # noqa: E402
from dist_triplet.augment import Augment, crop_flip, draw  # noqa: E402

P, K, M, MARGIN = 3, 3, 6, 0.2


def unit_rows(n, d, seed):
    x = np.random.RandomState(seed).randn(n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sq_dist(a, b):
    return np.array([[float(np.sum((x.astype(np.float64) - y) ** 2)) for y in b] for x in a])


def memory_problem(seed=3):
    """A P x K batch, a memory of M rows (the last 2 invalid), labels in both."""
    emb = unit_rows(P * K, 4, seed)
    labels = np.repeat(np.arange(P), K).astype(np.float32)
    mem = unit_rows(M, 4, seed + 1)
    mem_labels = np.array([0, 1, 2, 0, 1, 2], np.float32)
    valid = np.array([1, 1, 1, 1, 0, 0], np.float32)
    return emb, labels, mem, mem_labels, valid


def ref_memory(emb, labels, mem, mem_labels, valid, miner):
    """Triplets (a, p, n) with n indexing [batch; memory]: positives from the batch,
    negatives from the batch and the valid memory rows."""
    cand = np.concatenate([emb, mem])
    cl = np.concatenate([labels, mem_labels])
    ok = np.concatenate([np.ones(len(emb)), valid])
    d = sq_dist(emb, cand)
    out = []
    for a in range(len(emb)):
        pos = [j for j in range(len(emb)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(cand)) if cl[j] != labels[a] and ok[j]]
        if miner == "batch_hard":
            out.append((a, max(pos, key=lambda j: d[a, j]), min(neg, key=lambda j: d[a, j])))
            continue
        for p in pos:
            farther = [j for j in neg if d[a, j] > d[a, p]]
            n = min(farther, key=lambda j: d[a, j]) if farther else max(neg, key=lambda j: d[a, j])
            out.append((a, p, n))
    return sorted(out), cand, d


@pytest.mark.parametrize("miner", ["batch_hard", "semi_hard"])
def test_memory_mining_matches_loop_and_loss(miner):
    emb, labels, mem, mem_labels, valid = memory_problem()
    want, cand, _ = ref_memory(emb, labels, mem, mem_labels, valid, miner)
    nd = mx.nd
    memory = (nd.array(mem), nd.array(mem_labels), nd.array(valid))
    a, p, n, w = mining.mine_pool(nd, nd.array(emb), nd.array(labels), None, MARGIN, miner,
                                  positives=K - 1, memory=memory)
    keep = w.asnumpy() > 0
    got = sorted(zip(*(x.asnumpy()[keep].astype(int).tolist() for x in (a, p, n))))
    assert got == want
    assert any(t[2] >= P * K for t in want)          # the memory supplied some negatives
    assert all(t[2] < P * K + 4 for t in want)       # never an invalid memory row
    # The loss is TripletLoss over those triplets, and no gradient reaches the memory.
    e = nd.array(emb)
    m_emb = nd.array(mem)
    e.attach_grad()
    m_emb.attach_grad()
    block = mining.MinedTripletLoss(MARGIN, miner, k=K)
    with mx.autograd.record():
        loss = block.mean_loss(nd, e, nd.array(labels),
                               memory=(mx.nd.BlockGrad(m_emb), memory[1], memory[2]))
    loss.backward()
    d = sq_dist(emb, cand)
    ref = np.mean([max(0.0, d[a_, p_] - d[a_, n_] + MARGIN) for a_, p_, n_ in want])
    assert abs(loss.asscalar() - ref) < 1e-5 and ref > 0
    assert np.abs(e.grad.asnumpy()).max() > 1e-3
    assert np.all(m_emb.grad.asnumpy() == 0)


def ref_dw_weights(d_sq, neg, dim):
    """Wu et al.'s sampling weights per anchor row (float64), as in MXNet's example."""
    dist = np.maximum(np.sqrt(d_sq), mining.DW_CUTOFF)
    log_w = (2.0 - dim) * np.log(dist) - (dim - 3) / 2.0 * np.log(
        np.maximum(1.0 - 0.25 * dist ** 2, 1e-8))
    cand = neg * (dist < mining.DW_NONZERO_LOSS_CUTOFF)
    w = np.zeros_like(d_sq)
    for i in range(len(w)):
        if cand[i].any():
            w[i] = np.exp(log_w[i] - log_w[i][cand[i] > 0].max()) * cand[i]
        else:
            w[i] = neg[i]
    return w / w.sum(axis=1, keepdims=True)


def test_distance_weighted_draws_by_inverse_cdf_of_the_weights():
    emb = unit_rows(P * K, 8, 5)
    labels = np.repeat(np.arange(P), K).astype(np.float32)
    d = sq_dist(emb, emb)
    neg = (labels[:, None] != labels[None, :]).astype(np.float64)
    w = ref_dw_weights(d, neg, 8)
    u = np.random.RandomState(0).uniform(0.01, 0.99, (P * K, K - 1)).astype(np.float32)
    a, p, n, wt = mining.distance_weighted(mx.nd, mx.nd.array(emb), mx.nd.array(labels),
                                           K - 1, mx.nd.array(u))
    a, p, n = (x.asnumpy().astype(int) for x in (a, p, n))
    assert np.all(wt.asnumpy() == 1)
    cdf = np.cumsum(w, axis=1)
    for t in range(len(a)):
        assert labels[p[t]] == labels[a[t]] and p[t] != a[t]
        want = int(np.searchsorted(cdf[a[t]], u[a[t], t % (K - 1)]))
        assert n[t] == want, t
        assert w[a[t], n[t]] > 0                     # only negatives with weight are drawn


def ref_crop_flip(img, dy, dx, flip, pad):
    """Crop of the zero-padded (flipped) image at (pad + dy, pad + dx)."""
    h, w = img.shape[:2]
    src = img[:, ::-1] if flip else img
    padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
    return padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]


@pytest.mark.parametrize("hybrid", [False, True])
def test_crop_flip_equals_padded_crop(hybrid):
    shape, pad = (5, 6, 2), 2
    rng = np.random.RandomState(0)
    imgs = rng.rand(7, *shape).astype(np.float32)
    params = Augment(shape, pad, True).columns(draw(1, 0, 0, (7, 3)))
    params[0] = [0, 0, 0]                                   # identity
    params[1] = [-2, 2, 1]                                  # extreme shifts, flipped
    x = mx.nd.array(imgs.reshape(7, -1))
    cols = [mx.nd.array(params[:, c]) for c in range(3)]
    if hybrid:
        data = [mx.sym.var(n) for n in ("x", "dy", "dx", "f")]
        sym = crop_flip(mx.sym, *data, shape, pad)
        out = sym.eval(ctx=mx.cpu(), x=x, dy=cols[0], dx=cols[1], f=cols[2])[0].asnumpy()
    else:
        out = crop_flip(mx.nd, x, *cols, shape, pad).asnumpy()
    for b in range(7):
        dy, dx, f = params[b].astype(int)
        np.testing.assert_array_equal(out[b].reshape(shape), ref_crop_flip(imgs[b], dy, dx, f, pad))
    np.testing.assert_array_equal(out[0], imgs[0].reshape(-1))


def test_augment_columns_are_in_range_and_a_function_of_seed_epoch_worker():
    aug = Augment((8, 8, 1), 3, True)
    cols = aug.columns(draw(4, 2, 1, (1000, 3)))
    assert set(np.unique(cols[:, :2])) == set(range(-3, 4))
    assert set(np.unique(cols[:, 2])) == {0.0, 1.0}
    np.testing.assert_array_equal(draw(4, 2, 1, (5, 3)), draw(4, 2, 1, (5, 3)))
    assert not np.array_equal(draw(4, 2, 1, (5, 3)), draw(4, 2, 0, (5, 3)))
    assert not np.array_equal(draw(4, 2, 1, (5, 3)), draw(4, 3, 1, (5, 3)))
    no_flip = Augment((8, 8, 1), 0, False).columns(draw(0, 0, 0, (50, 3)))
    assert np.all(no_flip == 0)


def image_problem():
    """48 rows of 4x4x1 uint8 images, 4 classes of 12."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 12)
    images = (rng.integers(0, 100, (48, 16)) + 40 * labels[:, None]).astype(np.uint8)
    return images, labels


def stepper_for(backend, *overrides):
    from dist_triplet.backbone import build_network, initialize_network
    from dist_triplet.config import load_config
    from dist_triplet.engine import build_step
    images, labels = image_problem()
    cfg = load_config(None, ["sampler.kind=pk", "sampler.p=2", "sampler.k=3",
                             "model.hidden=[8,4]", "model.final_relu=false",
                             "model.normalize=true", "optim.optimizer=adam", "optim.lr=0.01",
                             *overrides])
    net = build_network(cfg.model, 16, (4, 4, 1))
    initialize_network(net, cfg.model, backend.contexts, 1, 16)
    return build_step(cfg, backend, net, images, labels, (4, 4, 1)), cfg


def test_random_columns_are_a_function_of_seed_epoch_and_worker():
    """kvstore device d draws what Horovod rank d draws; a new epoch draws anew; the same
    epoch twice (a resumed run) draws the same."""
    from dist_triplet import dist
    over = ["augment.pad=1", "augment.flip=true", "sampler.miner=distance_weighted"]
    kv, _ = stepper_for(dist.make_backend("kvstore", "cpu", "cpu:2"), *over)
    rank1, _ = stepper_for(dist.Backend([mx.cpu()], rank=1, num_processes=2), *over)
    batches = np.arange(2 * 2 * 6).reshape(2, 2, 6) % 48            # (steps, devices, P*K)
    cols = kv.strategy.input.columns
    assert cols == 1 + 3 + 2                                        # rows, dy dx flip, K - 1 uniforms
    e3 = [a.asnumpy() for a in kv.epoch_indices(batches, 3)]
    assert e3[0].shape == (2, cols * 6)
    np.testing.assert_array_equal(e3[0][:, :6], batches[:, 0])      # the rows come first
    np.testing.assert_array_equal(rank1.epoch_indices(batches[:, 1:], 3)[0].asnumpy(), e3[1])
    np.testing.assert_array_equal(kv.epoch_indices(batches, 3)[0].asnumpy(), e3[0])
    assert not np.array_equal(kv.epoch_indices(batches, 4)[0].asnumpy(), e3[0])
    assert not np.array_equal(e3[0][:, 6:], e3[1][:, 6:])


@pytest.mark.parametrize("scope", ["local", "global"])
def test_distance_weighted_with_augmentation_trains_deterministically(scope):
    """Two identical kvstore runs (2 devices) end bit-identical: every random number comes
    from the host's (seed, epoch, worker) draws; the loss is finite and the step moves."""
    from dist_triplet import dist
    from dist_triplet.engine import run_epoch

    def run():
        stepper, cfg = stepper_for(dist.make_backend("kvstore", "cpu", "cpu:2"),
                                   "augment.pad=1", "augment.flip=true",
                                   "sampler.miner=distance_weighted", f"sampler.scope={scope}")
        from dist_triplet.plan import build_sampler
        sampler = build_sampler(cfg, stepper.backend, image_problem()[1])
        start = {k: p.data().asnumpy() for k, p in stepper.net.collect_params().items()}
        losses = np.concatenate([run_epoch(stepper, sampler.epoch(e), e, lr_at=lambda s: 0.01,
                                           sync_every=5)[0] for e in range(2)])
        end = {k: p.data().asnumpy() for k, p in stepper.net.collect_params().items()}
        return start, end, losses

    s1, e1, l1 = run()
    _, e2, l2 = run()
    assert np.all(np.isfinite(l1)) and l1.max() > 0
    np.testing.assert_array_equal(l1, l2)
    assert all(np.array_equal(e1[k], v) for k, v in zip(e1, e2.values()))
    assert max(float(np.abs(e1[k] - s1[k]).max()) for k in e1) > 1e-3
