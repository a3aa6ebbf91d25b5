"""Test helper: ``python -m dist_triplet.train`` that dies (or dawdles) at a chosen step.

Used by tests/test_checkpoint.py and tests/test_faults.py; not part of the package. It
uses the training loop's per-step hook (``train.main(argv, on_step=...)``, called by
``engine.run_epoch`` before every step). Run it exactly like the trainer:

    DIST_TRIPLET_FAULT='rank=1,epoch=2,step=3' \\
        horovodrun -np 2 -H localhost:2 --gloo python tests/_fault_train.py --config ...

DIST_TRIPLET_FAULT is a comma-separated list of key=value:

* ``epoch``, ``step``: 1-based, as in the log lines; the fault fires just before that step
  of that epoch runs (so ``step - 1`` updates of the epoch are done).
* ``rank``: the Horovod rank that dies (``HOROVOD_RANK``; 0 outside horovodrun). Default 0.
* ``how``: ``exit`` (``os._exit(code)``: no cleanup, no atexit, no flush, like a crash;
  default) or ``kill`` (SIGKILL to itself, as the OOM killer or a preempting scheduler).
* ``code``: exit status for ``exit``; default 17.
* ``sleep``: seconds to sleep before every step (no fault needed): makes epochs slow
  enough for a test to SIGKILL the process from outside while it trains.
"""
import os
import signal
import sys
import time

# Run from anywhere: the project root first on the path, as `python -m` from the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_triplet import train as train_mod  # noqa: E402


def parse(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def make_hook(spec: dict):
    """``(on_step, armed)``: the hook for ``train.main(argv, on_step=...)`` (called before
    every optimizer step with 0-based epoch and step), and whether this process is the
    one that must die."""
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    target = (int(spec["epoch"]), int(spec["step"])) if "epoch" in spec else None
    fire = target is not None and rank == int(spec.get("rank", 0))
    sleep = float(spec.get("sleep", 0))

    def on_step(epoch, step):
        if sleep:
            time.sleep(sleep)
        if fire and (epoch + 1, step + 1) == target:
            print(f"_fault_train: rank {rank} dies before epoch {target[0]} step {target[1]}",
                  file=sys.stderr, flush=True)
            if spec.get("how", "exit") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(int(spec.get("code", 17)))

    return on_step, fire


if __name__ == "__main__":
    hook, armed = make_hook(parse(os.environ.get("DIST_TRIPLET_FAULT", "")))
    status = train_mod.main(sys.argv[1:], on_step=hook)
    if armed:  # the run ended without reaching the fault: say so rather than pass quietly
        print("_fault_train: the fault point was never reached", file=sys.stderr, flush=True)
        status = 99
    sys.exit(status)
