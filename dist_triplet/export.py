"""Export of the trained embedding network, and loading it back for inference.

Rank 0 writes, at the end of a run, ``<run>/model/``:

    embed-symbol.json   the hybridized graph (``HybridBlock.export``)
    embed-0000.params   its parameters
    meta.json           input width, embedding size, input scaling, source run

:func:`load_model` reads them with ``gluon.SymbolBlock.imports`` (MXNet 1.9 docs,
"Saving and Loading Gluon Models: Export Network for Deployment"), so using a trained
embedding needs neither this package's model code nor the config it was trained with;
``python -m dist_triplet.embed`` is the command-line front end.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Optional

from .fsutil import write_json

__all__ = ["PREFIX", "EPOCH", "model_files", "export_model", "load_model", "read_meta"]

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
    """Write ``net`` as symbol + parameters (+ meta.json) into ``directory``; returns it.

    Rank-0 only; calls no collective. The network is hybridized if it is not yet, and run
    once on a (1, in_units) zero batch so that its cached graph exists (``export``
    requires one forward after ``hybridize``).

    Args:
        net: the embedding network, a ``gluon.HybridBlock``: (B, in_units) float32 ->
            (B, D) float32.
        directory: created if missing; existing export files are overwritten.
        ctx: an MXNet context holding the parameters (the first one, with several).
        in_units: input width F (784 for 28x28 images).
        meta: extra entries for meta.json (e.g. the run directory and epoch).

    Raises:
        ValueError: if ``net`` is not a HybridBlock (it cannot be exported as a graph).
    """
    import mxnet as mx
    from mxnet import gluon

    if not isinstance(net, gluon.HybridBlock):
        raise ValueError(f"only a gluon.HybridBlock can be exported, got {type(net).__name__}")
    os.makedirs(directory, exist_ok=True)
    net.hybridize()  # keeps the flags of an earlier hybridize(static_alloc=...)
    out = net(mx.nd.zeros((1, in_units), ctx=ctx))          # builds the cached graph
    dim = int(out.shape[1])
    net.export(os.path.join(directory, PREFIX), epoch=EPOCH)
    info = {"input_units": int(in_units), "embedding_dim": dim, "input_name": INPUT_NAME,
            "input_scaling": INPUT_SCALING, "dtype": "float32"}
    info.update(meta or {})
    _, _, meta_path = model_files(directory)
    write_json(meta_path, info)
    return directory


def read_meta(directory: str) -> dict:
    """meta.json of an export ({} if absent: exports by other tools have none).

    Raises:
        ValueError: meta.json is not valid JSON, or is not a JSON object (the message
            names the file).
    """
    path = model_files(directory)[2]
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object (export metadata), found a JSON "
                         f"{type(meta).__name__}")
    return meta


def mxnet_error_line(exc: BaseException) -> str:
    """The line of an exception that says what went wrong. MXNet's messages start with a
    C++ 'Traceback' and numbered stack frames and end with the check that failed; this
    keeps that last line (used wherever an MXNet file load fails: exports, checkpoints)."""
    text = str(exc).split("Stack trace:")[0]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Traceback", "File ",
                                                                   "[bt]"))
             and not re.match(r"^\d+:", line)]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^MXNetError:\s*", "", lines[-1])


def load_model(directory: str, ctx=None):
    """Load an export as a ``gluon.SymbolBlock`` on ``ctx`` (default CPU).

    Returns the block: (B, F) float32 -> (B, D) float32, in ``directory``'s meta.json
    ``input_units`` F and ``embedding_dim`` D.

    Raises:
        FileNotFoundError: ``directory`` or its symbol / params file is missing (the
            message names what was looked for).
        ValueError: ``directory`` is not a directory; the files exist but MXNet cannot
            load them (one line: the file and the last line of MXNet's message).
    """
    import mxnet as mx
    from mxnet import gluon

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"model path {directory} is a file, not a directory: pass the export "
                         "directory a training run writes as <run dir>/model")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory} does not exist; a training run "
                                "writes it as <run dir>/model")
    sym, params, _ = model_files(directory)
    for path in (sym, params):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {directory} is not a complete export "
                                    f"(expected {os.path.basename(sym)} and "
                                    f"{os.path.basename(params)})")
    ctx = ctx if ctx is not None else mx.cpu()
    errors = (mx.base.MXNetError, AssertionError, ValueError, KeyError, TypeError,
              UnicodeDecodeError, RuntimeError)
    # Load each file alone first, so that the error names the file that is broken.
    for path, loader in ((sym, mx.sym.load), (params, mx.nd.load)):
        try:
            loader(path)
        except errors as exc:
            raise ValueError(f"{path}: MXNet cannot load it: {mxnet_error_line(exc)}") from None
    try:
        with warnings.catch_warnings():
            # MXNet notes that the graph does not record the input dtype: it is float32.
            warnings.filterwarnings("ignore", message="Cannot decide type")
            return gluon.SymbolBlock.imports(sym, [INPUT_NAME], params, ctx=ctx)
    except errors as exc:
        raise ValueError(f"cannot load the export in {directory} ({os.path.basename(sym)} and "
                         f"{os.path.basename(params)} do not match): "
                         f"{mxnet_error_line(exc)}") from None
