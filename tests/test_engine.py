"""The training step and its sampler strategies (dist_triplet/engine.py, strategies.py):
index layout per device, trainer.step terms, head grads, and one step's update against a
plain computation of the same loss."""
import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from dist_triplet import dist  # noqa: E402
from dist_triplet.config import load_config  # noqa: E402
from dist_triplet.engine import build_step  # noqa: E402
from dist_triplet.model import build_embedding_net, initialize  # noqa: E402
from dist_triplet.strategies import GlobalMined, LocalMined, Offline  # noqa: E402


def _problem(n=24, width=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, width)).astype(np.float32), np.arange(n) % classes


def _step(cfg, backend, pixels, labels):
    net = build_embedding_net(pixels.shape[1], [5, 3], final_relu=False)
    initialize(net, 0.5, backend.contexts, seed=1)
    return net, build_step(cfg, backend, net, pixels, labels)


def test_offline_strategy_layout_terms_and_update():
    pixels, labels = _problem()
    backend = dist.make_backend("kvstore", "cpu", "cpu:2")
    cfg = load_config(None, ["optim.lr=0.1", "optim.optimizer=sgd"])
    net, step = _step(cfg, backend, pixels, labels)
    assert isinstance(step.strategy, Offline)
    batch = np.array([[0, 3, 1], [1, 4, 2], [2, 5, 0], [3, 6, 1]])       # (devices x B, 3)
    idx = [i.asnumpy() for i in step.device_batches(batch)]
    # Device d gets rows [2d, 2d + 2): anchors, then positives, then negatives.
    np.testing.assert_array_equal(idx[0], [0, 1, 3, 4, 1, 2])
    np.testing.assert_array_equal(idx[1], [2, 3, 5, 6, 0, 1])
    epoch = step.epoch_indices(np.stack([batch, batch[::-1]]))
    np.testing.assert_array_equal(epoch[1][0].asnumpy(), idx[1])      # one layout for both

    w0 = {k: p.data(mx.cpu(0)).asnumpy() for k, p in net.collect_params().items()}
    sums, terms = step.step(batch)
    assert terms == 4                                  # this process's triplets
    # The same update by hand: mean over the 4 triplets of the seed's triplet loss.
    ref = build_embedding_net(pixels.shape[1], [5, 3], final_relu=False)
    initialize(ref, 0.5, mx.cpu(), seed=1)
    x = mx.nd.array(pixels)
    with mx.autograd.record():
        e = ref(x)
        a, p, n = (mx.nd.take(e, mx.nd.array(batch[:, j])) for j in range(3))
        loss = mx.nd.relu(((a - p) ** 2).sum(axis=1) - ((a - n) ** 2).sum(axis=1) + 1.0)
    loss.backward()
    assert float(sum(s.asscalar() for s in sums)) == pytest.approx(loss.sum().asscalar(),
                                                                   rel=1e-5)
    for k, param in ref.collect_params().items():
        name = k.replace(ref.prefix, net.prefix)
        expect = w0[name] - 0.1 * param.grad(mx.cpu()).asnumpy() / 4
        for ctx in backend.contexts:                    # both devices, one identical update
            np.testing.assert_allclose(net.collect_params()[name].data(ctx).asnumpy(), expect,
                                       rtol=1e-5, atol=1e-6)


def test_mined_strategies_layout_and_terms():
    pixels, labels = _problem()
    backend = dist.make_backend("kvstore", "cpu", "cpu:2")
    for scope, kind in (("local", LocalMined), ("global", GlobalMined)):
        cfg = load_config(None, ["sampler.kind=pk", "sampler.p=3", "sampler.k=2",
                                 f"sampler.scope={scope}"])
        _, step = _step(cfg, backend, pixels, labels)
        assert type(step.strategy) is kind
        batch = np.array([[0, 3, 1, 4, 2, 5], [6, 9, 7, 10, 8, 11]])      # (devices, P*K)
        idx = [i.asnumpy() for i in step.device_batches(batch)]
        np.testing.assert_array_equal(idx[1], batch[1])
        sums, terms = step.step(batch)
        assert terms == 2                               # one mean loss per device
        if scope == "global":   # each device's surrogate carries the global batch's mean
            assert sums[0].asscalar() == pytest.approx(sums[1].asscalar())  # same global loss


def test_uneven_batch_and_wrong_dtype_are_refused():
    pixels, labels = _problem()
    backend = dist.make_backend("kvstore", "cpu", "cpu:2")
    _, step = _step(load_config(None, []), backend, pixels, labels)
    with pytest.raises(ValueError, match="a batch of 3 rows does not split evenly over 2"):
        step.device_batches(np.zeros((3, 3), np.int64))
    from dist_triplet.engine import DataParallelStep
    with pytest.raises(ValueError, match="training rows are uint8 but the strategy expects "
                                         "float32"):
        DataParallelStep(backend, step.trainer, (pixels * 255).astype(np.uint8), labels,
                         step.strategy)
