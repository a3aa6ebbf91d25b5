"""An exported embedding network (:mod:`dist_triplet.export`), loaded for inference by
``gluon.SymbolBlock.imports`` (MXNet 1.9 docs, "Saving and Loading Gluon Models: Export
Network for Deployment"); its meta.json's input is a :class:`~.specs.ModelInput`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import numpy as np

from ..export import INPUT_NAME, model_files, mxnet_error_line
from .specs import ModelInput

__all__ = ["Model", "read_meta", "sha256_file"]

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(directory: str) -> dict:
    """meta.json of an export ({} if absent: exports by other tools have none).
    ValueError naming the file: not valid JSON, or not a JSON object."""
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


def _load_block(directory: str, ctx):
    """The export in ``directory`` as a ``gluon.SymbolBlock`` on ``ctx``. FileNotFoundError:
    the directory or a file is missing; ValueError: a file path, or files MXNet cannot load
    (one line naming the file and the last line of MXNet's message)."""
    import mxnet as mx
    from mxnet import gluon

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"model path {directory} is a file, not a directory: pass the export "
                         "directory a training run writes as <run dir>/model")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory} does not exist; a training run "
                                "writes it as <run dir>/model")
    sym, params, _ = model_files(directory)
    if missing := [path for path in (sym, params) if not os.path.isfile(path)]:
        raise FileNotFoundError(f"{missing[0]} is missing: {directory} is not a complete "
                                f"export ({os.path.basename(sym)} and {os.path.basename(params)})")
    errors = (mx.base.MXNetError, AssertionError, ValueError, KeyError, TypeError,
              UnicodeDecodeError, RuntimeError)     # each file alone first: the error names it
    for path, loader in ((sym, mx.sym.load), (params, mx.nd.load)):
        try:
            loaded = loader(path)
        except errors as exc:
            raise ValueError(f"{path}: MXNet cannot load it: {mxnet_error_line(exc)}") from None
    if bad := [k for k, v in loaded.items() if not np.isfinite(v.asnumpy()).all()]:
        raise ValueError(f"{params}: {bad[0]} holds NaN or infinite values: a damaged export")
    try:
        with warnings.catch_warnings():      # MXNet: the graph does not record the input dtype
            warnings.filterwarnings("ignore", message="Cannot decide type")   # (float32)
            return gluon.SymbolBlock.imports(sym, [INPUT_NAME], params, ctx=ctx)
    except errors as exc:
        raise ValueError(f"cannot load the export in {directory} ({os.path.basename(sym)} and "
                         f"{os.path.basename(params)} do not match): "
                         f"{mxnet_error_line(exc)}") from None


class Model:
    """An export directory (or a run directory holding ``model/``), loaded on ``ctx``:
    ``dir`` (absolute), ``block`` (``gluon.SymbolBlock``: (B, F) float32 -> (B, D)
    float32), ``input`` (:class:`ModelInput`), ``dim`` D (or None), ``params_sha256``.
    FileNotFoundError / ValueError: a missing or broken export (:func:`_load_block`,
    :func:`read_meta`); a meta.json ``input_units`` that is not a positive integer."""

    def __init__(self, path: str, ctx=None):
        import mxnet as mx
        if not os.path.isfile(model_files(path)[0]) and (os.path.isfile(model_files(
                os.path.join(path, "model"))[0]) or os.path.isfile(f"{path}/config.yaml")):
            path = os.path.join(path, "model")  # a run directory (unfinished: model/ named)
        self.dir = os.path.abspath(path)
        self.ctx = ctx or mx.cpu()
        self.block = _load_block(self.dir, self.ctx)
        sym, params, meta_path = model_files(self.dir)
        meta = read_meta(self.dir)
        units = meta.get("input_units")
        if units is None:    # exports by other tools: the input width of a first Dense layer
            name = [a for a in mx.sym.load(sym).list_arguments() if a != INPUT_NAME][0]
            first = mx.nd.load(params).get(f"arg:{name}")
            units = int(first.shape[1]) if first is not None and first.ndim == 2 else None
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"{meta_path}: expected input_units a positive integer, found "
                             f"{units!r}" if meta else f"{meta_path} is missing, and the first "
                             "layer is not a Dense: the input width is unknown")
        self.input = ModelInput.from_meta(units, meta, meta_path)
        self.dim = meta.get("embedding_dim")
        self.params_sha256 = sha256_file(params)

    def embed(self, x: np.ndarray, batch_size: int = 2048, desc: str = "embedding",
              source: str = "input") -> np.ndarray:
        """(N, F) float32 -> (N, D) float32 in batches (2048 = eval.batch_size's default).
        ValueError naming ``source``: the model fails on the rows, gives another number of
        embeddings (rows of another width than F) or non-finite values."""
        import mxnet as mx
        from tqdm import tqdm

        from ..model import embed
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        out = []
        with tqdm(total=len(x), desc=desc, unit="item", disable=not sys.stderr.isatty(),
                  leave=False) as bar:
            for start in range(0, len(x), batch_size):
                try:
                    out.append(embed(self.block, x[start:start + batch_size], self.ctx,
                                     batch_size))
                except mx.base.MXNetError as exc:
                    raise ValueError(f"the model in {self.dir} failed on {source}: "
                                     f"{mxnet_error_line(exc)}") from None
                bar.update(len(out[-1]))
        emb = np.concatenate(out).astype(np.float32, copy=False) if out else \
            np.zeros((0, self.dim or 0), np.float32)
        if len(emb) != len(x):    # a convnet regrouped rows of another width (or meta.json's)
            raise ValueError(f"{source}: the model in {self.dir} gave {len(emb)} embeddings for "
                             f"{len(x)} rows of shape {np.shape(x)[1:]}: it takes "
                             f"{self.input.units} values per row ({self.input.where})")
        if bad := int(np.count_nonzero(~np.isfinite(emb))):
            raise ValueError(f"{source}: the model in {self.dir} gave {bad} non-finite "
                             "embedding values (NaN or infinite): a diverged model, or inputs "
                             "not scaled as in training (pixels / 255 in [0, 1])")
        return emb      # huge but finite: knn ranks them exactly (float64 keys)
