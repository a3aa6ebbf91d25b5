"""Training entry point: ``python -m dist_triplet.train --config FILE [section.key=value ...]``.

The same command runs in every mode; ``distributed.backend: auto`` (the default) picks
Horovod under ``horovodrun`` / ``mpirun`` and one local device otherwise:

* single device (debug):  ``python -m dist_triplet.train --config configs/debug.yaml``
* Horovod, N processes:    ``horovodrun -np 4 python -m dist_triplet.train --config
  configs/fashion_mnist.yaml`` (``launch/horovod.sh 4 -- ...`` adds a pre-flight check)
* kvstore, N devices:      ``launch/kvstore.sh cpu:2 -- --config ...``
  (``distributed.backend=kvstore distributed.devices=cpu:2``)

This module is the command line only: it reads the config (config.py), prints it with
``--print-config``, chooses the backend (launcher.py) and the OpenMP threads, then hands
over to ``loop.run`` (the training run). Bad input before MXNet starts is one ``error:``
line from rank 0 (the other ranks exit with the same status, silently) and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

from .config import ConfigError, config_yaml, load_config, parse_devices
from .configfile import CommandLine
from .launcher import choose_backend, launcher_rank, local_size
from .rundir import check_run_config

StepHook = Callable[[int, int], None]

KEY_REFERENCE = ("Every config key, with its meaning, units and default, is documented where "
                 "it is declared: dist_triplet/config.py (sections data, model, loss, sampler, "
                 "optim, train, distributed, eval, checkpoint, output); docs/data.md covers "
                 "the data keys. --print-config shows the resolved values.")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = CommandLine(
        prog="python -m dist_triplet.train",
        description="Train a triplet-loss embedding (MXNet Gluon; local, Horovod or kvstore).",
        epilog=KEY_REFERENCE)
    parser.add_argument("--config", help="YAML config; keys not given keep their defaults")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, file, overrides) as YAML "
                             "and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=2 optim.lr=0.01")
    return parser.parse_intermixed_args(argv)


def default_threads(backend: str, devices: str) -> None:
    """Set OMP_NUM_THREADS, unless the user did, to this host's cores divided among the
    processes (``launcher.local_size``) and kvstore CPU devices that share them. Only
    effective before MXNet is imported.

    MXNet's own default is half the cores (it assumes two hyper-threads per core): one
    thread on a 2-core VM, which halves the step rate there (benchmark section 2).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    share = local_size()
    if backend == "kvstore":  # a config value: MXNet (and so the backend) is not up yet
        try:
            kind, n = parse_devices(devices)
        except ValueError:
            kind = None  # choose_contexts reports the malformed value
        share *= n if kind == "cpu" else 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))


# Seconds a rank other than 0 waits before exiting on bad input (see main).
_QUIET_RANK_WAIT_S = 10.0


def main(argv: Optional[Sequence[str]] = None, on_step: Optional[StepHook] = None) -> int:
    """Command-line entry point; returns the exit status (tests call it directly).
    ``on_step``: as in ``loop.train`` (tests/_fault_train.py uses it)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_config(args.config, cfg, args.overrides)
        backend = choose_backend(cfg.distributed.backend)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Every rank finds the same error; one line is enough (rank 0's). horovodrun ends
        # every rank when the first one exits non-zero, so the others wait (bounded) for
        # that: exiting first, they could end rank 0 before its line is out.
        if launcher_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(_QUIET_RANK_WAIT_S)
        return 2
    if args.print_config:
        sys.stdout.write(config_yaml(cfg))
        return 0
    default_threads(backend, cfg.distributed.devices)
    # MXNet loads here, after default_threads: OpenMP reads OMP_NUM_THREADS once, when
    # the library loads (and --print-config and bad input need no MXNet).
    from .loop import run
    return run(cfg, on_step=on_step)


if __name__ == "__main__":
    sys.exit(main())
