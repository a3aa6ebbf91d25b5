"""The three parallel modes compute the same update (issue 3).

From the same initial parameters and the same 8 fixed triplets per step
(tests/equivalence_worker.py): ``local`` steps on all 8 on one device, ``kvstore`` on
[cpu(0), cpu(1)] with 4 each, ``horovod`` with 2 Gloo ranks of 4 each. After one step
the parameters agree to 1e-5, after 20 to 1e-4; kvstore's two parameter copies are
bit-identical after every step; the optimizer counts one update per step (MXNet has had
bugs that advanced it once per device, which breaks Adam and schedules).
"""
from __future__ import annotations


import mxnet as mx
import numpy as np
import pytest

from _hvd import run_two_rank_worker
import equivalence_worker as worker
from dist_triplet import dist
from dist_triplet.config import Config, load_config
from dist_triplet.engine import build_step
from dist_triplet.plan import build_sampler

OPTS = list(worker.OPTIMIZERS)


@pytest.fixture(scope="module")
def local():
    return {opt: worker.run(dist.make_backend("local", "cpu"), opt) for opt in OPTS}


@pytest.fixture(scope="module")
def kvstore():
    return {opt: worker.run(dist.make_backend("kvstore", "cpu", "cpu:2"), opt) for opt in OPTS}


@pytest.fixture(scope="module")
def horovod(tmp_path_factory):
    """Both ranks' results of one 2-rank Gloo run: [rank] -> npz mapping."""
    return run_two_rank_worker("equivalence_worker.py", tmp_path_factory.mktemp("hvd_equivalence"))


def hvd_params(npz, opt: str, step: int) -> dict:
    prefix = f"{opt}:{step}:"
    return {k[len(prefix):]: npz[k][0] for k in npz.files if k.startswith(prefix)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def first_context(params: dict) -> dict:
    return {k: v[0] for k, v in params.items()}


@pytest.mark.parametrize("opt", OPTS)
def test_local_and_kvstore_agree(local, kvstore, opt):
    loc, kv = local[opt]["params"], kvstore[opt]["params"]
    assert max_diff(first_context(loc[0]), first_context(kv[0])) == 0.0  # same start
    # The step must move the parameters far more than the tolerance, or agreement is vacuous.
    assert max_diff(first_context(loc[1]), first_context(loc[0])) > 1e-3
    assert max_diff(first_context(loc[1]), first_context(kv[1])) < 1e-5
    assert max_diff(first_context(loc[-1]), first_context(kv[-1])) < 1e-4


@pytest.mark.parametrize("opt", OPTS)
def test_kvstore_contexts_bit_identical_every_step(kvstore, opt):
    for step, params in enumerate(kvstore[opt]["params"]):
        for name, copies in params.items():
            assert copies.shape[0] == 2
            assert np.array_equal(copies[0], copies[1]), (step, name)


@pytest.mark.parametrize("opt", OPTS)
def test_one_update_per_step(local, kvstore, opt):
    expected = list(range(worker.STEPS + 1))
    assert local[opt]["num_update"] == expected
    assert kvstore[opt]["num_update"] == expected


@pytest.mark.parametrize("opt", OPTS)
def test_horovod_agrees_with_local(local, horovod, opt):
    loc = local[opt]["params"]
    for r, npz in enumerate(horovod):
        assert max_diff(hvd_params(npz, opt, 0), first_context(loc[0])) == 0.0, r
        assert max_diff(hvd_params(npz, opt, 1), first_context(loc[1])) < 1e-5, r
        assert max_diff(hvd_params(npz, opt, worker.STEPS),
                        first_context(loc[worker.STEPS])) < 1e-4, r
        assert npz[f"{opt}:num_update"].tolist() == list(range(worker.STEPS + 1)), r
    # Allreduce hands both ranks the same gradient: their parameters never drift apart.
    for step in range(worker.STEPS + 1):
        assert max_diff(hvd_params(horovod[0], opt, step),
                        hvd_params(horovod[1], opt, step)) == 0.0, step


def test_uneven_batch_rejected():
    pixels, labels, batches = worker.problem()
    from dist_triplet.model import build_embedding_net, initialize
    backend = dist.make_backend("kvstore", "cpu", "cpu:2")
    net = build_embedding_net(pixels.shape[1], [8, 4])
    initialize(net, 0.1, backend.contexts, seed=1)
    stepper = build_step(Config(), backend, net, pixels, labels)
    with pytest.raises(ValueError, match=r"batch of 7 rows does not split evenly over 2 devices"):
        stepper.step(batches[0][:7])


def EpochSampler(cfg, labels, rank, world_size, devices):
    """The sampler of process ``rank`` of ``world_size`` processes with ``devices`` devices
    (a plain ``dist.Backend`` of that shape; no collective is used)."""
    backend = dist.Backend([mx.cpu(d) for d in range(devices)], rank=rank,
                           num_processes=world_size)
    return build_sampler(cfg, backend, labels)


def pk_config() -> Config:
    return load_config(None, ["sampler.kind=pk", "sampler.p=3", "sampler.k=3",
                              "sampler.miner=batch_hard", "optim.lr=0.1"])


def test_pk_kvstore_devices_sample_as_horovod_ranks():
    """Under kvstore each device is a sampler worker: device d of a 2-device process gets
    the P x K batches of Horovod rank d of 2, and the epoch has as many steps."""
    _, labels, _ = worker.problem()
    cfg = pk_config()
    kv = EpochSampler(cfg, labels, rank=0, world_size=1, devices=2)
    ranks = [EpochSampler(cfg, labels, rank=r, world_size=2, devices=1) for r in range(2)]
    assert kv.steps == ranks[0].steps == len(labels) // (3 * 3 * 2)
    kv_batches = kv.epoch(0)                                   # (steps, 2, P*K)
    assert kv_batches.shape == (kv.steps, 2, 9)
    for r, sampler in enumerate(ranks):
        np.testing.assert_array_equal(kv_batches[:, r], sampler.epoch(0)[:, 0])


def test_pk_mining_kvstore_step_is_mean_of_device_steps():
    """Plain SGD: a kvstore step on two P x K batches (each device mines its own) lands at
    the mean of the two single-device steps, i.e. it applies the mean gradient."""
    from dist_triplet.model import build_embedding_net, initialize
    pixels, labels, _ = worker.problem()
    cfg = pk_config()
    batch = EpochSampler(cfg, labels, rank=0, world_size=1, devices=2).epoch(0)[0]  # (2, 9)

    def one_step(backend, rows):
        net = build_embedding_net(pixels.shape[1], [8, 4], final_relu=False, normalize=True)
        initialize(net, 0.5, backend.contexts, seed=1)
        stepper = build_step(cfg, backend, net, pixels, labels)
        sums, terms = stepper.step(rows)
        assert terms == len(backend.contexts)
        assert all(float(s.asscalar()) > 0 for s in sums)  # mining found active triplets
        return {k: p.data(backend.contexts[0]).asnumpy() for k, p in net.collect_params().items()}

    kv = one_step(dist.make_backend("kvstore", "cpu", "cpu:2"), batch)
    alone = [one_step(dist.make_backend("local", "cpu"), batch[d:d + 1]) for d in range(2)]
    mean = {k: (alone[0][k] + alone[1][k]) / 2 for k in kv}
    assert max_diff(kv, mean) < 1e-6
    assert max_diff(alone[0], alone[1]) > 1e-4  # the two batches give different updates


# ----------------------------------------------------------------------------- convnet

@pytest.fixture(scope="module")
def conv_local():
    """One process normalising each worker's share separately (ghost batches of 4
    triplets), and one normalising all 8 together."""
    backend = dist.make_backend("local", "cpu")
    return {(opt, g): worker.run_conv(backend, opt, ghost=g) for opt in OPTS for g in (1, 2)}


@pytest.fixture(scope="module")
def conv_kvstore():
    return {opt: worker.run_conv(dist.make_backend("kvstore", "cpu", "cpu:2"), opt)
            for opt in OPTS}


def hvd_conv(npz, opt: str, key: str, step: int) -> dict:
    prefix = f"conv:{opt}:{key}:{step}:"
    return {k[len(prefix):]: npz[k][0] for k in npz.files if k.startswith(prefix)}


@pytest.mark.parametrize("opt", OPTS)
def test_conv_kvstore_and_horovod_equal_one_process_with_per_worker_batchnorm(
        conv_local, conv_kvstore, horovod, opt):
    """What must be equal with BatchNorm: the trainable parameters, between W workers and
    one process whose BatchNorm normalises each worker's share on its own (ghost
    batches); each worker's running statistics, between kvstore device d and Horovod rank
    d (they see the same rows). What differs: the workers' running statistics (each from
    its own batches), and one process normalising the whole batch at once."""
    ref = conv_local[opt, 2]["params"]
    kv = conv_kvstore[opt]
    steps = worker.CONV_STEPS
    assert max_diff(first_context(kv["params"][0]), first_context(ref[0])) == 0.0
    assert max_diff(first_context(ref[1]), first_context(ref[0])) > 1e-3
    assert max_diff(first_context(kv["params"][1]), first_context(ref[1])) < 1e-5
    assert max_diff(first_context(kv["params"][steps]), first_context(ref[steps])) < 1e-4
    for params in kv["params"]:              # the devices' trainable copies stay identical
        assert all(np.array_equal(v[0], v[1]) for v in params.values())
    whole = conv_local[opt, 1]["params"]     # BatchNorm over all 8 triplets: another update
    assert max_diff(first_context(whole[1]), first_context(ref[1])) > 1e-4
    aux = kv["aux"][steps]
    assert max(float(np.abs(v[0] - v[1]).max()) for v in aux.values()) > 1e-3
    for r, npz in enumerate(horovod):
        assert max_diff(hvd_conv(npz, opt, "params", 1), first_context(ref[1])) < 1e-5, r
        assert max_diff(hvd_conv(npz, opt, "params", steps), first_context(ref[steps])) < 1e-4
        mine = hvd_conv(npz, opt, "aux", steps)
        assert max(float(np.abs(mine[k] - aux[k][r]).max()) for k in mine) < 1e-5, r
    for step in range(steps + 1):            # allreduce: identical trainable parameters
        assert max_diff(hvd_conv(horovod[0], opt, "params", step),
                        hvd_conv(horovod[1], opt, "params", step)) == 0.0
