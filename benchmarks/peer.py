"""The peers, measured in the same run as the product: PyTorch's seed recipe and the
PyTorch + pytorch-metric-learning semi-hard P x K recipe, from a scratch venv of their own.

    python -m benchmarks.peer [--quick] [--peer-venv DIR] [--threads 2]

The peers are no dependencies of dist_triplet, so they live in their own virtualenv,
outside the product's (default ``runs/peer-venv`` in this repository, ignored by git; or
``--peer-venv``, or the ``DIST_TRIPLET_PEER_VENV`` variable), made on first use with the
ordinary clients (``python3 -m venv``, ``pip install``) from the package registry:

* ``torch==2.13.0+cpu``: the CPU build, named by its local version so that pip can never
  substitute the CUDA build PyPI serves under the plain version (a machine without the
  CPU wheel on its index fails here, saying so, instead of downloading ~2 GB of CUDA);
* ``pytorch-metric-learning`` and ``faiss-cpu`` (the library's optional kNN), whose
  ``torch`` requirement the CPU build already satisfies.

After installing it checks ``torch.version.cuda is None``. The drivers ``step`` and
``mining`` call :func:`peer_python` and run ``benchmarks/torch_seed.py`` /
``benchmarks/torch_pml.py`` inside their own section, minutes from the product's
measurement, so each ratio in the table is against a number taken in the same run on the
same machine. Run alone, this module prints both peers' rows.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional, Sequence

from . import common

PEER_PACKAGES = (["torch==2.13.0+cpu"], ["pytorch-metric-learning", "faiss-cpu"])
CHECK = ("import torch, pytorch_metric_learning, faiss; "
         "assert torch.version.cuda is None, 'a CUDA build of torch'; print(torch.__version__)")


def default_venv() -> str:
    return os.environ.get("DIST_TRIPLET_PEER_VENV") or os.path.join(common.ROOT, "runs",
                                                                    "peer-venv")


def peer_python(venv: Optional[str] = None, log=sys.stderr) -> str:
    """The peer venv's Python, the venv made and filled first when it lacks the peers.

    Raises RuntimeError with pip's tail when the installation or the CPU check fails."""
    venv = venv or default_venv()
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py) and subprocess.run([py, "-c", CHECK], capture_output=True).returncode == 0:
        return py
    print(f"[bench] setting up the peers' venv {venv} (torch CPU, pytorch-metric-learning)",
          file=log, flush=True)
    steps = [] if os.path.exists(py) else [[sys.executable, "-m", "venv", venv]]
    steps += [[py, "-m", "pip", "install", "--quiet", *pkgs] for pkgs in PEER_PACKAGES]
    steps.append([py, "-c", CHECK])
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"peer venv: {' '.join(cmd)} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    return py


def _run(py: str, script: str, args, extra: Sequence[str], threads: int) -> dict:
    sz = dict(warmup=3, windows=3, window_steps=4) if args.quick else \
        dict(warmup=40, windows=9, window_steps=60)
    cmd = [py, os.path.join(common.ROOT, "benchmarks", script), "--threads", str(threads),
           "--warmup", str(sz["warmup"]), "--windows", str(sz["windows"]),
           "--window-steps", str(sz["window_steps"]),
           "--train-size", str(getattr(args, "train_size", 0)), *extra]
    if getattr(args, "synthetic", False):
        cmd.append("--synthetic")
    return common.run_worker(cmd, common.child_env(threads), timeout=900)[0]


def seed_recipe(py: str, args, batch_size: int, threads: int) -> dict:
    """``benchmarks/torch_seed.py``: the seed's recipe in PyTorch, triplets/s."""
    return _run(py, "torch_seed.py", args, ["--batch-size", str(batch_size)], threads)


def pml_recipe(py: str, args, p: int, k: int, threads: int) -> dict:
    """``benchmarks/torch_pml.py``: semi-hard P x K with pytorch-metric-learning, images/s."""
    return _run(py, "torch_pml.py", args, ["--p", str(p), "--k", str(k)], threads)


def measure(args) -> dict:
    py = peer_python(args.peer_venv)
    return {"python": py, "seed": seed_recipe(py, args, args.batch_size, args.threads),
            "pml": pml_recipe(py, args, 10, 8, args.threads)}


def rows(doc: dict) -> List[common.Row]:
    s, m = doc["seed"], doc["pml"]
    return [common.Row("peer", f"PyTorch {s['torch']} seed recipe, {s['threads']} threads",
                       f"{s['median']:,.0f} triplets/s ({s['cpu_us_per_item']:.1f} CPU us/triplet)"),
            common.Row("peer", f"PyTorch + pytorch-metric-learning {m['pml']} semi-hard "
                               f"P x K {m['p']} x {m['k']}, {m['threads']} threads",
                       f"{m['median']:,.0f} images/s ({m['cpu_us_per_item']:.1f} CPU us/image)")]


def add_args(p) -> None:
    """The options of every driver that runs a peer."""
    p.add_argument("--peer-venv", default=None,
                   help="the peers' virtualenv (default runs/peer-venv or $DIST_TRIPLET_PEER_VENV)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer rows")


def parse_args(argv):
    p = common.driver_parser("peer", __doc__, "a few steps: for the smoke test")
    p.add_argument("--threads", type=int, default=0, help="default: the number of cores")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--train-size", type=int, default=0)
    add_args(p)
    args = p.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_driver("peer", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
