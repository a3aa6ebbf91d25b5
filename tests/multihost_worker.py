"""Every rank of tests/test_multihost.py: train as configured and report what this rank saw.

    horovodrun --gloo -np 4 -H localhost:2,127.0.0.2:2 ... \\
        python tests/multihost_worker.py REPORT_DIR --config ... section.key=value ...

Writes into REPORT_DIR (a directory every "host" sees, as output.dir must be):

* ``pid_rank{r}``: at start, ``"<pid> <cross rank>"``, so the test can kill one host's ranks;
* ``report_rank{r}.json``: rank, local rank, cross rank and host as Horovod and the
  launcher give them, the context this rank trained on (and the one it would use with two
  GPUs per host), whether it came through ssh, its interpreter, the dist_triplet package
  it imported and its working directory, and every file under the run directory it
  opened for reading or changed (mkdir, open for writing, rename, remove), recorded with
  an audit hook (PEP 578), so no training code is patched;
* ``params_rank{r}.npz``: the final parameters.

``MULTIHOST_PAUSE="cross_rank=1,epoch=2,step=3"``: the ranks of that host stop just before
that step (1-based, as in the log lines) through the training loop's ``on_step`` hook,
write ``paused_rank{r}`` and sleep until they are killed: a host that dies mid-epoch at a
known point, while the others wait in that step's gradient allreduce.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# No sys.path change here: dist_triplet comes from PYTHONPATH (tests/_hvd.child_env puts
# this checkout there), which host B's ranks get only if horovodrun carries it over ssh.

RANK = int(os.environ.get("HOROVOD_RANK", "0"))
CROSS_RANK = int(os.environ.get("HOROVOD_CROSS_RANK", "0"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def file_audit(root: str):
    """Start recording file access under ``root``; returns (reads, writes), lists of
    absolute paths that grow as the process runs (one entry per event)."""
    root = os.path.abspath(root)
    reads, writes = [], []

    def under(path) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return None  # a file descriptor
        full = os.path.abspath(path)
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            full = under(path)
            if full:
                writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                           else bool(flags & _WRITE_FLAGS))
                (writes if writing else reads).append(full)
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                       "os.chmod", "os.symlink", "os.link"):
            full = under(args[0])
            if full:
                writes.append(full)
        elif event == "os.rename":  # also os.replace
            for path in args[:2]:
                full = under(path)
                if full:
                    writes.append(full)

    sys.addaudithook(hook)
    return reads, writes


def pause_hook(spec: str, report_dir: str):
    """The ``on_step(epoch, step)`` hook (0-based; ``loop.train`` calls it before every
    optimizer step) that stops this rank as ``spec`` says (see the module docstring), or
    None when ``spec`` names another host."""
    opts = dict(item.split("=", 1) for item in spec.split(",") if item)
    if int(opts["cross_rank"]) != CROSS_RANK:
        return None
    target = (int(opts["epoch"]), int(opts["step"]))

    def on_step(epoch, step):
        if (epoch + 1, step + 1) == target:
            with open(os.path.join(report_dir, f"paused_rank{RANK}"), "w") as fh:
                fh.write(str(os.getpid()))
            while True:  # until the test kills this "host"
                time.sleep(1)

    return on_step


def main(argv) -> int:
    report_dir, rest = argv[0], argv[1:]
    with open(os.path.join(report_dir, f"pid_rank{RANK}"), "w") as fh:
        fh.write(f"{os.getpid()} {CROSS_RANK}")

    from dist_triplet import dist
    from dist_triplet.config import load_config
    from dist_triplet.loop import train
    from dist_triplet.train import parse_args

    args = parse_args(rest)
    cfg = load_config(args.config, args.overrides)
    reads, writes = file_audit(cfg.output.dir)
    spec = os.environ.get("MULTIHOST_PAUSE")
    result = train(cfg, on_step=pause_hook(spec, report_dir) if spec else None)
    backend = result.backend
    ctx = backend.contexts[0]
    import horovod.mxnet as hvd  # the launcher's view, to compare with what dist reports
    # The device this rank would take on hosts with 2 GPUs each: gpu(local rank).
    would_use = str(dist.choose_contexts("horovod", "gpu", "all", local_rank=backend.local_rank,
                                         local_size=hvd.local_size(), gpu_count=2)[0])
    report = {
        "rank": backend.rank, "local_rank": backend.local_rank,
        "num_processes": backend.num_processes, "num_workers": backend.num_workers,
        "hvd": {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
                "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
                "cross_size": hvd.cross_size()},
        "env": {k: os.environ.get(k) for k in ("HOROVOD_HOSTNAME", "HOROVOD_CROSS_RANK",
                                               "SSH_CONNECTION", "OMP_NUM_THREADS")},
        # What ssh must carry to another host: the interpreter, the code and the cwd.
        "python": sys.executable, "package": os.path.dirname(os.path.abspath(dist.__file__)),
        "cwd": os.getcwd(),
        "context": str(ctx), "context_with_2_gpus": would_use,
        "pid": os.getpid(), "run_dir": os.path.abspath(result.run_dir),
        "reads": sorted(set(reads)), "writes": sorted(set(writes)),
    }
    # Names as in a checkpoint's params file (net.save_parameters), to compare with those.
    params = {name: p.data(ctx).asnumpy()
              for name, p in result.net._collect_params_with_prefix().items()}
    np.savez(os.path.join(report_dir, f"params_rank{backend.rank}.npz"), **params)
    tmp = os.path.join(report_dir, f".report_rank{backend.rank}.json")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, os.path.join(report_dir, f"report_rank{backend.rank}.json"))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
