"""Device choice and the non-distributed answers of dist.py (issue 3).

No GPU here can run MXNet, so the GPU cases pass ``gpu_count``; contexts are only
created, never used, so ``mx.gpu(i)`` needs no device.
"""
from __future__ import annotations

import logging

import mxnet as mx
import numpy as np
import pytest

from dist_triplet import dist
from dist_triplet.config import parse_devices
from dist_triplet.dist import choose_contexts


# ----------------------------------------------------------------------------- Horovod / local

@pytest.mark.parametrize("local_rank,local_size,gpus", [(0, 1, 1), (0, 4, 4), (3, 4, 4), (1, 2, 8)])
def test_horovod_local_rank_gets_its_gpu(local_rank, local_size, gpus):
    for device in ("auto", "gpu"):
        ctxs = choose_contexts("horovod", device, "all", local_rank=local_rank,
                               local_size=local_size, gpu_count=gpus)
        assert ctxs == [mx.gpu(local_rank)]


@pytest.mark.parametrize("device", ["auto", "gpu"])
def test_fewer_gpus_than_local_ranks_names_both(device):
    with pytest.raises(ValueError, match=r"4 local ranks on this host but only 2 GPUs"):
        choose_contexts("horovod", device, "all", local_rank=3, local_size=4, gpu_count=2)


@pytest.mark.parametrize("backend", ["local", "horovod"])
def test_no_gpu_auto_falls_back_to_cpu_and_says_so(backend, caplog):
    with caplog.at_level(logging.INFO, logger="dist_triplet.dist"):
        ctxs = choose_contexts(backend, "auto", "all", local_rank=1, local_size=2, gpu_count=0)
    assert ctxs == [mx.cpu()]
    assert "no GPU visible to MXNet: using the CPU" in caplog.text


@pytest.mark.parametrize("gpus", [0, 2])
def test_device_cpu_uses_cpu_silently(gpus, caplog):
    with caplog.at_level(logging.INFO, logger="dist_triplet.dist"):
        assert choose_contexts("horovod", "cpu", "all", local_rank=1, local_size=2,
                               gpu_count=gpus) == [mx.cpu()]
    assert "no GPU" not in caplog.text


@pytest.mark.parametrize("backend", ["local", "horovod", "kvstore"])
def test_device_gpu_without_gpu_is_an_error(backend):
    with pytest.raises(ValueError, match=r"device='gpu' but MXNet sees no GPU"):
        choose_contexts(backend, "gpu", "all", gpu_count=0)


def test_local_takes_gpu0_when_there_is_one():
    assert choose_contexts("local", "auto", "all", gpu_count=2) == [mx.gpu(0)]


# ----------------------------------------------------------------------------- kvstore

@pytest.mark.parametrize("devices,gpus,expected", [
    ("all", 3, [mx.gpu(0), mx.gpu(1), mx.gpu(2)]),
    ("0,1", 2, [mx.gpu(0), mx.gpu(1)]),
    ("1, 3", 4, [mx.gpu(1), mx.gpu(3)]),
    ("cpu:3", 0, [mx.cpu(0), mx.cpu(1), mx.cpu(2)]),
    ("cpu:2", 4, [mx.cpu(0), mx.cpu(1)]),  # cpu:N means CPU even when GPUs exist
])
def test_kvstore_devices(devices, gpus, expected):
    assert choose_contexts("kvstore", "auto", devices, gpu_count=gpus) == expected


@pytest.mark.parametrize("devices,gpus,message", [
    ("0,2", 2, r"GPU ids must be in 0\.\.1 \(2 GPUs on this host\)"),
    ("-1", 2, r"GPU ids must be in 0\.\.1"),
    ("0,0", 2, r"a GPU id appears twice"),
    ("gpu0", 2, r"expected 'all', 'cpu:N' or GPU ids like '0,1'"),
    (",", 2, r"GPU ids must be in"),
    ("cpu:0", 0, r"'cpu:N' needs N >= 1"),
    ("cpu:x", 0, r"'cpu:N' needs N >= 1"),
    ("all", 0, r"names GPUs, but 0 GPUs are usable here.*use distributed.devices=cpu:N"),
    ("0,1", 0, r"names GPUs, but 0 GPUs.*cpu:N"),
])
def test_kvstore_bad_devices(devices, gpus, message):
    with pytest.raises(ValueError, match=message):
        choose_contexts("kvstore", "auto", devices, gpu_count=gpus)


def test_kvstore_gpu_ids_with_device_cpu_is_an_error():
    with pytest.raises(ValueError, match=r"names GPUs, but 2 GPUs are usable here \(device='cpu'\)"):
        choose_contexts("kvstore", "cpu", "0,1", gpu_count=2)


def test_kvstore_cpu_contexts_with_device_gpu_is_an_error():
    with pytest.raises(ValueError, match=r"device='gpu' contradicts distributed.devices='cpu:2'"):
        choose_contexts("kvstore", "gpu", "cpu:2", gpu_count=2)


# ----------------------------------------------------------------------------- backends

def test_rank_helpers_without_horovod():
    assert dist._hvd is None  # nothing in the test process initialised Horovod
    assert (dist.rank(), dist.size(), dist.local_rank(), dist.local_size(), dist.is_main()) \
        == (0, 1, 0, 1, True)


def test_make_backend_local_and_kvstore():
    local = dist.make_backend("local", "cpu")
    assert (local.name, local.contexts, local.rank, local.world_size) == \
        ("local", [mx.cpu()], 0, 1)
    kv = dist.make_backend("kvstore", "cpu", "cpu:3")
    assert (kv.name, kv.contexts, kv.rank, kv.world_size, kv.num_processes) == \
        ("kvstore", [mx.cpu(0), mx.cpu(1), mx.cpu(2)], 0, 3, 1)
    assert kv.is_main


def test_make_backend_unknown_name():
    with pytest.raises(ValueError, match=r"distributed.backend='mpi': expected local, horovod "
                                         r"or kvstore"):
        dist.make_backend("mpi")


def test_collectives_are_identities_in_one_process():
    kv = dist.make_backend("kvstore", "cpu", "cpu:2")
    assert kv.allreduce_mean([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert kv.broadcast_object({"a": 1}) == {"a": 1}
    assert kv.allgather_object(7) == [7]
    kv.barrier()  # returns at once


def test_kvstore_trainer_updates_on_devices():
    """kvstore='device' with the update on each device (not on the kvstore): the only
    arrangement in which every device applies exactly one identical update per step."""
    net = mx.gluon.nn.Dense(2, in_units=3)
    kv = dist.make_backend("kvstore", "cpu", "cpu:2")
    net.initialize(ctx=kv.contexts)
    trainer = kv.make_trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    assert trainer._kvstore_params == {"kvstore": "device", "update_on_kvstore": False}


def test_backend_shape_is_fixed_at_construction():
    """rank / processes / devices / workers, and each device's global worker index."""
    b = dist.Backend([mx.cpu(0), mx.cpu(1), mx.cpu(2)], rank=2, num_processes=4, local_rank=0)
    assert (b.num_workers, b.world_size, b.is_main) == (12, 12, False)
    assert [b.worker_rank(d) for d in range(3)] == [6, 7, 8]


def test_decide_on_rank0_returns_value_or_raises_its_message():
    local = dist.make_backend("local", "cpu")
    assert dist.decide_on_rank0(local, lambda: "/runs/x", "t") == "/runs/x"

    def bad_value():
        raise ValueError("output.dir='f' is an existing file")

    def bad_os():
        raise PermissionError(13, "Permission denied", "/root/x")

    with pytest.raises(ValueError, match=r"^output.dir='f' is an existing file$"):
        dist.decide_on_rank0(local, bad_value, "t")
    with pytest.raises(ValueError, match=r"Permission denied: '/root/x'"):
        dist.decide_on_rank0(local, bad_os, "t")


@pytest.mark.parametrize("devices, parsed", [("cpu:3", ("cpu", 3)), ("all", ("gpu", None)),
                                             ("0, 2", ("gpu", [0, 2]))])
def test_parse_devices(devices, parsed):
    assert parse_devices(devices) == parsed


def test_importing_the_trainer_does_not_start_mxnet():
    """train.default_threads sets OMP_NUM_THREADS, which MXNet reads once at import: the
    modules main() imports before it must not import MXNet (dist.py does)."""
    import subprocess
    import sys
    code = ("import sys, dist_triplet.train, dist_triplet.config; "
            "sys.exit(1 if 'mxnet' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_horovod_flat_gradient_buffer_averages_exactly_and_fp16_approximately(tmp_path):
    """HorovodBackend's trainer: the backward pass writes every gradient into one flat
    buffer, one allreduce averages it, and SGD applies the mean of the two ranks'
    gradients (to float32 rounding); with compression='fp16' the mean of the float16
    roundings: close, and not the same update."""
    from _hvd import run_two_rank_worker
    ranks = run_two_rank_worker("flat_trainer_worker.py", tmp_path)
    names = [k[len("grad:"):] for k in ranks[0].files if k.startswith("grad:")]
    assert len(names) == 4
    moved, fp16_off = 0.0, 0.0
    for r in ranks:
        assert r["flat_matches:none"] and r["flat_matches:fp16"]
        for name in names:
            mean = (ranks[0][f"grad:{name}"] + ranks[1][f"grad:{name}"]) / 2
            want = r[f"before:{name}"] - 0.5 * mean
            np.testing.assert_allclose(r[f"none:{name}"], want, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(r[f"fp16:{name}"], want, rtol=0, atol=2e-3)
            moved = max(moved, float(np.abs(want - r[f"before:{name}"]).max()))
            fp16_off = max(fp16_off, float(np.abs(r[f"fp16:{name}"] - r[f"none:{name}"]).max()))
    assert moved > 1e-2 and fp16_off > 0      # a real step; float16 did round something
    for name in names:                          # the ranks stay identical
        assert np.array_equal(ranks[0][f"none:{name}"], ranks[1][f"none:{name}"])
