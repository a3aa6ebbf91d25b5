"""Export of the trained embedding network: rank 0 writes ``<run>/model/`` at the end of a
run (``embed-symbol.json`` the hybridized graph, ``embed-0000.params``, ``meta.json``);
:class:`dist_triplet.retrieval.Model` loads it back for inference.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from .fsutil import write_json

__all__ = ["PREFIX", "EPOCH", "model_files", "export_model", "mxnet_error_line"]

PREFIX = "embed"
EPOCH = 0           # HybridBlock.export's file number; the run's epoch is in meta.json
INPUT_NAME = "data"  # the input name HybridBlock.export gives a one-input block
# How pixels reach the network: data.load_split divides the bytes by 255 (seed article).
INPUT_SCALING = "uint8 / 255"


def model_files(directory: str) -> tuple:
    """(symbol file, params file, meta file) paths of an export in ``directory``."""
    return (os.path.join(directory, f"{PREFIX}-symbol.json"),
            os.path.join(directory, f"{PREFIX}-{EPOCH:04d}.params"),
            os.path.join(directory, "meta.json"))


def export_model(net, directory: str, ctx, in_units: int, *, meta: Optional[dict] = None) -> str:
    """Write ``net`` (a ``gluon.HybridBlock``: (B, in_units) float32 -> (B, D) float32,
    parameters on ``ctx``) as symbol + parameters + meta.json (``meta``: extra entries,
    e.g. the run and epoch) into ``directory`` (created; old files overwritten); returns
    it. Rank-0 only, no collective. ValueError: ``net`` is not a HybridBlock."""
    import mxnet as mx
    from mxnet import gluon

    if not isinstance(net, gluon.HybridBlock):
        raise ValueError(f"only a gluon.HybridBlock can be exported, got {type(net).__name__}")
    os.makedirs(directory, exist_ok=True)
    net.hybridize()  # keeps the flags of an earlier hybridize(static_alloc=...)
    dim = int(net(mx.nd.zeros((1, in_units), ctx=ctx)).shape[1])   # builds the cached graph
    net.export(os.path.join(directory, PREFIX), epoch=EPOCH)
    write_json(model_files(directory)[2], {
        "input_units": int(in_units), "embedding_dim": dim, "input_name": INPUT_NAME,
        "input_scaling": INPUT_SCALING, "dtype": "float32", **(meta or {})})
    return directory


def mxnet_error_line(exc: BaseException) -> str:
    """The last line of an MXNet message (after its C++ traceback and numbered stack
    frames): the check that failed."""
    text = str(exc).split("Stack trace:")[0]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Traceback", "File ", "[bt]"))
             and not re.match(r"^\d+:", line)]
    return re.sub(r"^MXNetError:\s*", "", lines[-1]) if lines else type(exc).__name__
