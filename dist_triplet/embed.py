"""Embed images with an exported model.

    python -m dist_triplet.embed --model runs/<run>/model --input t10k-images-idx3-ubyte.gz \\
        --output emb.npy [--batch-size 1024] [--device cpu]
    dist-triplet-embed ...   (the same, as a console script)

``--model``: the export a training run writes (``<run>/model``, see
:mod:`dist_triplet.export`), or the run directory itself. ``--input``: an IDX images file
(gzip or raw, as :func:`dist_triplet.data.read_idx` reads it) or a ``.npy`` array of
images, (N, F) or (N, rows, cols) with rows * cols = F: uint8 bytes are divided by 255 as
in training (:func:`dist_triplet.data.load_split`), float arrays are taken as already
scaled. ``--output``: an (N, D) float32 ``.npy`` written atomically, in input order.
Bad input fails with exit status 2 and one line that names the file and the problem.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from .data import read_idx
from .fsutil import atomic_write
from .export import mxnet_error_line, load_model, model_files, read_meta

__all__ = ["load_images", "embed_images", "main"]

_NPY_MAGIC = b"\x93NUMPY"


def _resolve_model_dir(path: str) -> str:
    """``path`` itself, or ``path/model`` when ``path`` is a run directory."""
    if not os.path.isfile(model_files(path)[0]) and os.path.isfile(
            model_files(os.path.join(path, "model"))[0]):
        return os.path.join(path, "model")
    return path


def load_images(path: str, in_units: int) -> np.ndarray:
    """Read images for the network: (N, in_units) float32.

    Args:
        path: IDX images file (magic 2051, gzip or raw) or ``.npy`` file (detected by
            content, not name). uint8 values are divided by 255 (the training input);
            float arrays are used as they are.
        in_units: the network's input width F; each image must have F values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an IDX or .npy file; an IDX labels file; a .npy of objects,
            booleans or integers other than uint8; no images; images whose size is not F
            (the message names the file, the shape found and F).
    """
    if os.path.isdir(path):
        raise ValueError(f"input {path} is a directory, not a file: pass an IDX images file "
                         "or a .npy array")
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"input {path} is not a regular file")
    with open(path, "rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        try:
            images = np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays, or a corrupt header
            raise ValueError(f"{path}: not a numeric .npy array: {exc}") from None
        if images.dtype == np.uint8:
            scale = np.float32(255.0)
        elif np.issubdtype(images.dtype, np.floating):
            scale = None
        else:
            raise ValueError(f"{path}: expected uint8 pixels (divided by 255) or floats "
                             f"(used as they are), found dtype {images.dtype}")
    else:
        images = read_idx(path)  # ValueError naming the file if it is not IDX
        if images.ndim != 3:
            raise ValueError(f"{path}: expected an IDX images file (3 dims, magic 2051), "
                             f"found {images.ndim} dim(s): a labels file?")
        scale = np.float32(255.0)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"{path}: expected (N, {in_units}) or (N, rows, cols) images with "
                         f"N >= 1, found shape {images.shape}")
    n = images.shape[0]
    width = int(np.prod(images.shape[1:]))
    if width != in_units:
        raise ValueError(f"{path}: the model takes {in_units} values per image, found shape "
                         f"{images.shape} ({width} per image)")
    flat = images.reshape(n, width).astype(np.float32)
    if scale is not None:
        flat /= scale  # the same float32 division as data.load_split
    else:
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        if bad:
            raise ValueError(f"{path}: {bad} of {flat.size} values are NaN or infinite; "
                             "expected finite pixels")
        top = float(flat.max())
        if top > 1.0:
            print(f"warning: {path}: float values go up to {top:g}, but the model was trained "
                  "on pixels / 255 in [0, 1]; divide by 255 (or pass uint8 pixels) unless "
                  "this is intended", file=sys.stderr, flush=True)
    return flat


def embed_images(block, images: np.ndarray, batch_size: int = 1024, ctx=None) -> np.ndarray:
    """Run ``block`` over ``images`` (N, F) float32 in batches: (N, D) float32."""
    import mxnet as mx

    from .model import embed

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    emb = embed(block, images, ctx if ctx is not None else mx.cpu(), batch_size)
    return emb.astype(np.float32, copy=False)


def _input_units(block, meta: dict, meta_path: str = "meta.json") -> int:
    """The network's input width: meta.json's, else the first 2-D weight's second axis."""
    if "input_units" in meta:
        units = meta["input_units"]
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"{meta_path}: expected input_units a positive "
                             f"integer, found {units!r}")
        return units
    for param in block.collect_params().values():
        if param.name.endswith("weight") and len(param.shape) == 2:
            return int(param.shape[1])
    raise ValueError("cannot tell the model's input width: no meta.json and no 2-D weight")


def _save(path: str, array: np.ndarray) -> None:
    """np.save to exactly ``path`` (no added suffix), atomically."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory: pass a file name")
    with atomic_write(path, "wb") as fh:
        np.save(fh, array)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dist_triplet.embed",
        description="Embed images with a model exported by dist_triplet training.")
    parser.add_argument("--model", required=True,
                        help="export directory (<run>/model) or the run directory")
    parser.add_argument("--input", required=True,
                        help="IDX images file (gzip or raw) or .npy images (N, F) / (N, r, c)")
    parser.add_argument("--output", required=True, help="output .npy, (N, D) float32")
    parser.add_argument("--batch-size", type=int, default=1024, help="images per forward pass")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu, or gpu (GPU 0)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on bad input)."""
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if os.path.isdir(args.output):  # before any work
            raise ValueError(f"output {args.output} is a directory: pass a file name")
        import mxnet as mx
        if args.device == "gpu":
            if mx.context.num_gpus() == 0:
                raise ValueError("--device gpu, but MXNet sees no GPU")
            ctx = mx.gpu(0)
        else:
            ctx = mx.cpu()
        model_dir = _resolve_model_dir(args.model)
        block = load_model(model_dir, ctx)
        in_units = _input_units(block, read_meta(model_dir), model_files(model_dir)[2])
        images = load_images(args.input, in_units)
        try:
            emb = embed_images(block, images, args.batch_size, ctx)
        except mx.base.MXNetError as exc:
            raise ValueError(f"the model in {model_dir} failed on {args.input}: "
                             f"{mxnet_error_line(exc)}") from None
        _save(args.output, emb)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} float32 embeddings of "
          f"{args.input}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
