"""``horovodrun`` without its per-start extension checks (used by launch/horovod.sh).

horovodrun (0.28.1) asks ``gloo_built()`` and ``mpi_built()`` before it starts the ranks,
and answers each by importing every framework's Horovod extension (TensorFlow, PyTorch,
MXNet) in a fresh subprocess: an MXNet import of its own at every launch, on the cores the
ranks are about to need. launch/setup.sh has already checked that this venv's Horovod has
MXNet and Gloo (``horovod.mxnet.gloo_built()``, remembered in its stamp until the venv
changes) and launch/horovod.sh always passes --gloo, so the answers are known: Gloo yes,
MPI no (setup.sh builds with HOROVOD_WITHOUT_MPI). Everything else is horovodrun's own
``run_commandline``, except that its traceback on a failed job becomes one line: a Ctrl-C
(or SIGTERM) exits 130; a rank that exited 2 (or 130) has printed its line, and the job
exits with its code; any other exit (a killed rank: 137) is named, with how to resume, and
exits 1. The pin (horovod==0.28.1) keeps these names where they are; if a later Horovod
moved them, this raises AttributeError at once rather than misbehaving.
"""
import re
import sys

import horovod.runner.gloo_run as gloo_run
import horovod.runner.launch as launch

for name, built in (("gloo_built", True), ("mpi_built", False)):
    getattr(launch, name)  # AttributeError if Horovod moved it: do not patch blindly
    setattr(launch, name, lambda verbose=False, _built=built: _built)

# Ctrl-C: horovodrun's handler sets this event and stops the ranks, then raises its "one or
# more processes exited with non-zero status" traceback. Keep the event to tell the two apart.
_stopped = []
_register = gloo_run.register_shutdown_event
gloo_run.register_shutdown_event = lambda: _stopped.append(_register()) or _stopped[-1]

if __name__ == "__main__":
    sys.argv[0] = "horovodrun"
    try:
        sys.exit(launch.run_commandline())
    except (RuntimeError, KeyboardInterrupt) as exc:
        resume = ("the run directory keeps its last complete checkpoint if one was written, "
                  "and the same command with checkpoint.resume=auto and that output.dir "
                  "continues from it")
        if any(event.is_set() for event in _stopped):
            print(f"interrupted: the ranks were stopped; {resume}", file=sys.stderr, flush=True)
            sys.exit(130)
        failed = re.search(r"Process name: (\S+)\nExit code: (-?\d+)", str(exc))
        if failed is None:
            raise
        rank, code = failed.group(1), int(failed.group(2))
        if code in (2, 130):      # the rank said why in one line: bad input; Ctrl-C
            sys.exit(code)
        signal = code - 128 if code > 128 else -code if code < 0 else 0
        print(f"error: rank {rank} exited with code {code}"
              + (f" (killed by signal {signal})" if signal else "") + f"; {resume}",
              file=sys.stderr, flush=True)
        sys.exit(1)
