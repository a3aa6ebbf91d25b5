"""Distribution backends: the only module that imports Horovod.

Three backends train the same model (tests/test_equivalence.py proves it):

* ``local``   one process, one device. The single-GPU debug mode. Horovod is not imported.
* ``horovod`` one process per device under ``horovodrun``. Context ``gpu(local_rank)``;
  parameters broadcast from rank 0; ``hvd.DistributedTrainer`` averages gradients.
* ``kvstore`` one process, several devices: ``gluon.Trainer(kvstore='device')`` sums the
  per-device gradients and the step divides by the global batch.

Vocabulary, the same in code, log lines, checkpoints and the README:

* process: a Horovod rank (one per ``horovodrun`` slot; the only process otherwise).
  ``rank`` / ``num_processes`` / ``local_rank`` count processes.
* worker: a device that takes a per-worker batch (``train.batch_size`` triplets, or one
  P x K batch). Device ``d`` of process ``rank`` is worker ``rank * devices + d``.
* world size: the number of workers, processes x devices per process.

The module-level helpers ``rank()``, ``size()``, ``local_rank()`` and ``is_main()`` answer
0 / 1 / 0 / True whenever Horovod is absent or not initialised, so the same code runs in
every mode (the pattern of detectron2's ``utils/comm.py``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence

import mxnet as mx
import numpy as np

from .config import parse_devices
from .launcher import choose_backend

log = logging.getLogger(__name__)

_hvd = None  # horovod.mxnet once init_horovod() ran; None in local / kvstore modes


def _horovod():
    """Import horovod.mxnet on demand, with an error that says how to get it."""
    try:
        import horovod.mxnet as hvd  # Horovod: imported here and nowhere else
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "distributed.backend=horovod needs horovod built with MXNet support; run "
            "launch/setup.sh (it builds horovod==0.28.1 after mxnet), or use "
            f"distributed.backend=local. Import failed: {exc}") from exc
    return hvd


def rank() -> int:
    """Global rank of this process; 0 when Horovod is not initialised."""
    return _hvd.rank() if _hvd is not None else 0


def size() -> int:
    """Number of Horovod processes; 1 when Horovod is not initialised."""
    return _hvd.size() if _hvd is not None else 1


def local_rank() -> int:
    """Rank of this process on its host; 0 when Horovod is not initialised."""
    return _hvd.local_rank() if _hvd is not None else 0


def local_size() -> int:
    """Processes on this host; 1 when Horovod is not initialised."""
    return _hvd.local_size() if _hvd is not None else 1


def is_main() -> bool:
    """True on the process that logs, evaluates and writes files (rank 0)."""
    return rank() == 0


def init_horovod() -> None:
    """Initialise Horovod (idempotent). Every rank must call it before any collective."""
    global _hvd
    if _hvd is None:
        hvd = _horovod()
        hvd.init()  # Horovod: once per process, never at import time
        _hvd = hvd


def shutdown() -> None:
    """Leave Horovod (if initialised). Tests that run several modes in one process use it."""
    global _hvd
    if _hvd is not None:
        _hvd.shutdown()
        _hvd = None


# ----------------------------------------------------------------------------- devices

def num_gpus() -> int:
    """GPUs MXNet can use here (0 on a CPU build or a machine without GPUs)."""
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # a CUDA build without a driver raises instead of returning 0
        return 0


def choose_contexts(backend: str, device: str, devices: str, *, local_rank: int = 0,
                    local_size: int = 1, gpu_count: Optional[int] = None) -> List[mx.Context]:
    """Pick the MXNet contexts for this process. All device choice lives here.

    Args:
        backend: 'local', 'horovod' or 'kvstore'.
        device: 'auto' (GPU if any, else CPU, logged), 'gpu' (GPU or error), 'cpu'.
        devices: kvstore only: 'all', GPU ids '0,1', or 'cpu:N' for N CPU contexts.
        local_rank, local_size: this process's place on its host (Horovod).
        gpu_count: GPUs on this host; ``None`` asks MXNet (tests pass a number).

    Returns:
        One context for 'local' and 'horovod' (``gpu(local_rank)`` under Horovod), one or
        more for 'kvstore'.

    Raises:
        ValueError: GPU asked for but fewer GPUs than local ranks (names both numbers), no
            GPU when device='gpu', kvstore 'all' or GPU ids with no GPU (says to use
            'cpu:N'), a GPU id that does not exist or appears twice, 'cpu:N' with
            device='gpu', or a malformed ``devices``.
    """
    gpus = num_gpus() if gpu_count is None else gpu_count
    kind, which = parse_devices(devices) if backend == "kvstore" else ("gpu", None)
    if kind == "cpu":
        if device == "gpu":
            raise ValueError(f"distributed.device='gpu' contradicts distributed.devices="
                             f"{devices!r} (CPU contexts); use device=cpu or auto, or GPU ids")
        return [mx.cpu(i) for i in range(which)]
    use_gpu = device == "gpu" or (device == "auto" and gpus > 0)
    if device == "gpu" and gpus == 0:
        raise ValueError("distributed.device='gpu' but MXNet sees no GPU on this host "
                         "(CPU build of mxnet, or no driver); use distributed.device=cpu or auto")
    if not use_gpu:
        if backend == "kvstore":
            raise ValueError(f"distributed.backend=kvstore with distributed.devices={devices!r} "
                             f"names GPUs, but {gpus} GPUs are usable here (device={device!r}); "
                             "on CPU use distributed.devices=cpu:N")
        if device == "auto":
            log.info("no GPU visible to MXNet: using the CPU (distributed.device=auto)")
        return [mx.cpu()]
    if backend == "kvstore":
        if which is None:
            return [mx.gpu(i) for i in range(gpus)]
        ids = which
        bad = [i for i in ids if not 0 <= i < gpus]
        if not ids or bad:
            raise ValueError(f"distributed.devices={devices!r}: GPU ids must be in 0..{gpus - 1} "
                             f"({gpus} GPUs on this host)")
        if len(set(ids)) != len(ids):
            # The same GPU twice would count its gradient twice in the kvstore sum.
            raise ValueError(f"distributed.devices={devices!r}: a GPU id appears twice")
        return [mx.gpu(i) for i in ids]
    if local_size > gpus:
        raise ValueError(f"{local_size} local ranks on this host but only {gpus} GPUs: each "
                         "rank needs its own GPU (start fewer processes per host with "
                         "horovodrun -np/-H, or use distributed.device=cpu)")
    return [mx.gpu(local_rank)]


# ----------------------------------------------------------------------------- backends

class Backend:
    """What the training loop needs from distribution; fixed at construction.

    The base behaves as one process with no peers (collectives are identities):
    :class:`LocalBackend` is it as is, :class:`KVStoreBackend` and :class:`HorovodBackend`
    override only what differs. Callers never test ``name`` (it is for log lines).

    Attributes:
        contexts: the devices this process drives (one, except kvstore).
        rank, num_processes, local_rank: this process's global rank, the number of
            processes in collectives (Horovod ranks; 1 otherwise), its rank on its host.
        num_workers: the world size, workers = processes x devices per process.
    """
    name = "local"

    def __init__(self, contexts: Sequence[mx.Context], rank: int = 0, num_processes: int = 1,
                 local_rank: int = 0):
        self.contexts = list(contexts)
        self.rank = rank
        self.num_processes = num_processes
        self.local_rank = local_rank
        self.num_workers = num_processes * len(self.contexts)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def world_size(self) -> int:
        """The field's term for :attr:`num_workers`."""
        return self.num_workers

    def worker_rank(self, device: int) -> int:
        """Global worker index of this process's device ``device`` (0-based)."""
        return self.rank * len(self.contexts) + device

    def broadcast_parameters(self, params) -> None:
        """Make every rank's parameters equal to rank 0's. Every rank must call it, or
        it deadlocks. Parameters must be initialised with known shapes first (the model
        gives ``in_units`` so nothing is deferred)."""

    def make_trainer(self, params, optimizer: str, optimizer_params: dict,
                     compression: str = "none") -> mx.gluon.Trainer:
        """A Trainer whose ``step(n)`` applies the mean gradient of the global batch.

        ``n`` must be the number of samples this *process* summed its loss over (all its
        devices); Horovod averages across ranks, kvstore sums across devices.
        ``compression``: 'none', or 'fp16' to send the gradients between processes as
        float16 (Horovod only: halves the bytes, rounds each gradient to float16 before
        the average, so the update is no longer exactly one process's; an option).
        """
        # kvstore=None: Gluon's default is 'device'; one device needs no gradient sum.
        # compression: nothing is sent between processes here.
        return mx.gluon.Trainer(params, optimizer, optimizer_params, kvstore=None)

    def allreduce_mean(self, values: Sequence[float]) -> np.ndarray:
        """Mean of ``values`` (a small float vector) over ranks, float64. Every rank must
        call it."""
        return np.asarray(values, dtype=np.float64)

    def broadcast_object(self, obj: Any, name: str = "obj") -> Any:
        """Rank 0's ``obj`` on every rank. Every rank must call it."""
        return obj

    def allgather_object(self, obj: Any, name: str = "obj") -> list:
        """Every rank's ``obj``, in rank order. Every rank must call it."""
        return [obj]

    def allreduce_sum(self, x: mx.nd.NDArray, name: str = "allreduce_sum") -> mx.nd.NDArray:
        """The sum of every process's ``x`` (same shape and dtype everywhere), on ``x``'s
        context; ``x`` itself with one process. Asynchronous (an MXNet engine op under
        Horovod: no host wait), carries no gradient. Every rank must call it, or it
        deadlocks."""
        return x

    def barrier(self) -> None:
        """Wait until every rank gets here. Every rank must call it."""


class LocalBackend(Backend):
    """One process, one device: the debug mode. Horovod is not imported."""
    name = "local"


class KVStoreBackend(Backend):
    """One process, several devices; ``gluon.Trainer(kvstore='device')`` sums gradients."""
    name = "kvstore"

    def make_trainer(self, params, optimizer: str, optimizer_params: dict,
                     compression: str = "none") -> mx.gluon.Trainer:
        # update_on_kvstore=False: the update runs on each device after the gradient sum,
        # so every device applies exactly one identical update per step and the devices'
        # parameter copies stay bit-identical.
        return mx.gluon.Trainer(params, optimizer, optimizer_params, kvstore="device",
                                update_on_kvstore=False)


class HorovodBackend(Backend):
    """One process per device under horovodrun; collectives through Horovod."""
    name = "horovod"

    def broadcast_parameters(self, params) -> None:
        _hvd.broadcast_parameters(params, root_rank=0)  # Horovod: same start everywhere

    def make_trainer(self, params, optimizer: str, optimizer_params: dict,
                     compression: str = "none") -> mx.gluon.Trainer:
        return _flat_trainer_class()(params, optimizer, optimizer_params,  # Horovod
                                     compression=compression)

    def allreduce_mean(self, values: Sequence[float]) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        if self.num_processes == 1:
            return arr
        out = _hvd.allreduce(mx.nd.array(arr, dtype="float64"), average=True,  # Horovod
                             name="dist_triplet.allreduce_mean")
        return out.asnumpy()

    def broadcast_object(self, obj: Any, name: str = "obj") -> Any:
        if self.num_processes == 1:
            return obj
        return _hvd.broadcast_object(obj, root_rank=0, name=f"dist_triplet.{name}")  # Horovod

    def allgather_object(self, obj: Any, name: str = "obj") -> list:
        if self.num_processes == 1:
            return [obj]
        return _hvd.allgather_object(obj, name=f"dist_triplet.{name}")  # Horovod

    def allreduce_sum(self, x: mx.nd.NDArray, name: str = "allreduce_sum") -> mx.nd.NDArray:
        if self.num_processes == 1:
            return x
        return _hvd.allreduce(x, op=_hvd.Sum, name=f"dist_triplet.{name}")  # Horovod

    def barrier(self) -> None:
        if self.num_processes > 1:
            _hvd.allreduce(mx.nd.zeros(1), name="dist_triplet.barrier").wait_to_read()


_FLAT_TRAINER = None


def _flat_trainer_class():
    """``FlatGradientTrainer``, a ``horovod.mxnet.DistributedTrainer`` whose gradients
    live in one flat buffer, built on first use (it subclasses a Horovod class)."""
    global _FLAT_TRAINER
    if _FLAT_TRAINER is not None:
        return _FLAT_TRAINER

    class FlatGradientTrainer(_hvd.DistributedTrainer):
        """Horovod's trainer with every gradient a view into one flat float32 buffer,
        averaged by one in-place allreduce per step.

        ``DistributedTrainer`` enqueues one allreduce per parameter; Horovod then copies
        them into its fusion buffer and back (MEMCPY_IN/OUT_FUSION_BUFFER in its timeline)
        and negotiates each tensor. Here the backward pass writes the gradients straight
        into the buffer (the parameters' grad arrays are views of it, marked for autograd
        as ``Parameter._init_grad`` marks its own), so there is one tensor to negotiate and
        nothing to copy. The update is the same: the same sums, the same average.

        Args: as ``DistributedTrainer``, and ``compression`` 'none' or 'fp16'
        (``horovod.mxnet.Compression``: the buffer is sent as float16 and cast back).

        Raises:
            ValueError: an unknown ``compression``.
            RuntimeError (at ``step``): a parameter's gradient array was replaced after
                the trainer was made (``initialize(force_reinit=True)``, ``reset_ctx``),
                so it would not be averaged.
        """

        def __init__(self, params, optimizer, optimizer_params=None, compression="none"):
            kinds = {"none": _hvd.Compression.none, "fp16": _hvd.Compression.fp16}
            if compression not in kinds:
                raise ValueError(f"distributed.compression={compression!r}: expected "
                                 f"{' or '.join(kinds)}")
            super().__init__(params, optimizer, optimizer_params,
                             compression=kinds[compression])
            self._views = []
            self._flat = None
            self._make_flat()

        def _make_flat(self):
            import numpy as np_
            live = [p for p in self._params if p.grad_req != "null"]
            if not live or any(p.dtype not in (np_.float32, "float32") or
                               p._grad_stype != "default" or len(p.list_ctx()) != 1
                               for p in live):
                return  # not one dense float32 device: Horovod's per-tensor path
            ctx = live[0].list_ctx()[0]
            sizes = [int(np_.prod(p.shape)) for p in live]
            self._flat = mx.nd.zeros((sum(sizes),), ctx=ctx, dtype="float32")
            start = 0
            for p, n in zip(live, sizes):
                view = self._flat[start:start + n].reshape(p.shape)
                start += n
                p._grad = [view]
                mx.autograd.mark_variables(p.list_data(), p._grad, p.grad_req)
                self._views.append((p, view))

        def _allreduce_grads(self):
            if self._flat is None:
                return super()._allreduce_grads()
            if _hvd.size() == 1:
                return None
            for p, view in self._views:
                if p._grad[0] is not view:
                    raise RuntimeError(f"the gradient array of {p.name} was replaced after "
                                       "the trainer was made; make the trainer again")
            sent, ctx = self._compression.compress(self._flat)
            _hvd.allreduce_(sent, average=not self._average_in_framework,  # Horovod
                            name="dist_triplet.gradients",
                            prescale_factor=1.0 / self._gradient_predivide_factor,
                            postscale_factor=self._postscale_factor)
            if sent is not self._flat:
                self._flat[:] = self._compression.decompress(sent, ctx)
            return None

    _FLAT_TRAINER = FlatGradientTrainer
    return _FLAT_TRAINER


def decide_on_rank0(backend: Backend, fn: Callable[[], Any], name: str) -> Any:
    """Rank 0 decides, shares, and every rank raises alike.

    Rank 0 runs ``fn()``; its value, or the message of a ValueError / OSError it raised,
    is broadcast. Every rank then returns the value or raises ``ValueError(message)``, so
    all ranks exit the same way instead of the others waiting in a collective. Every rank
    must call it, or it deadlocks. ``name`` labels the collective.
    """
    decision = None
    if backend.is_main:
        try:
            decision = ("ok", fn())
        except (ValueError, OSError) as exc:
            decision = ("error", str(exc))
    status, value = backend.broadcast_object(decision, name=name)
    if status == "error":
        backend.barrier()  # Horovod: rank 0 must not exit before the others have the message
        raise ValueError(value)
    return value


def make_backend(backend: str, device: str = "auto", devices: str = "all") -> Backend:
    """Create the backend named in ``distributed.backend`` (initialising Horovod if asked;
    ``auto`` as ``launcher.choose_backend`` resolves it).

    Raises:
        ValueError: unknown backend; a device choice ``choose_contexts`` rejects; or
            backend 'local' / 'kvstore' in a process that horovodrun (or mpirun) started
            as one of several (``launcher.choose_backend``).
        RuntimeError: backend 'horovod' without a working Horovod installation.
    """
    backend = choose_backend(backend)  # 'auto': horovod under a launcher, else local
    if backend == "local":
        return LocalBackend(choose_contexts("local", device, devices))
    if backend == "kvstore":
        return KVStoreBackend(choose_contexts("kvstore", device, devices))
    if backend == "horovod":
        init_horovod()
        ctxs = choose_contexts("horovod", device, devices, local_rank=local_rank(),
                               local_size=local_size())
        return HorovodBackend(ctxs, rank=rank(), num_processes=size(), local_rank=local_rank())
    raise ValueError(f"distributed.backend={backend!r}: expected local, horovod or kvstore")
