"""Every rank of tests/test_horovod_run.py: train as configured, then save this rank's
final parameters to OUT/params_rank{r}.npz so the test can compare the ranks.

    horovodrun -np 2 -H localhost:2 --gloo python tests/horovod_train_worker.py OUT \
        --config configs/debug.yaml section.key=value ...
"""
from __future__ import annotations

import os
import sys

import numpy as np

from dist_triplet.config import load_config
from dist_triplet.loop import train
from dist_triplet.train import parse_args


def main(argv) -> None:
    out_dir, args = argv[0], parse_args(argv[1:])
    result = train(load_config(args.config, args.overrides))
    ctx = result.backend.contexts[0]
    params = {name: p.data(ctx).asnumpy() for name, p in result.net.collect_params().items()}
    np.savez(os.path.join(out_dir, f"params_rank{result.backend.rank}.npz"), **params)


if __name__ == "__main__":
    main(sys.argv[1:])
