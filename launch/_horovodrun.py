"""``horovodrun`` without its per-start extension checks (used by launch/horovod.sh).

horovodrun (0.28.1) asks ``gloo_built()`` and ``mpi_built()`` before it starts the ranks,
and answers each by importing every framework's Horovod extension (TensorFlow, PyTorch,
MXNet) in a fresh subprocess: an MXNet import of its own at every launch, on the cores the
ranks are about to need. launch/setup.sh has already checked that this venv's Horovod has
MXNet and Gloo (``horovod.mxnet.gloo_built()``, remembered in its stamp until the venv
changes) and launch/horovod.sh always passes --gloo, so the answers are known: Gloo yes,
MPI no (setup.sh builds with HOROVOD_WITHOUT_MPI). Everything else is horovodrun's own
``run_commandline``. The pin (horovod==0.28.1) keeps these two names where they are; if a
later Horovod moved them, this raises AttributeError at once rather than misbehaving.
"""
import sys

import horovod.runner.launch as launch

for name, built in (("gloo_built", True), ("mpi_built", False)):
    getattr(launch, name)  # AttributeError if Horovod moved it: do not patch blindly
    setattr(launch, name, lambda verbose=False, _built=built: _built)

if __name__ == "__main__":
    sys.argv[0] = "horovodrun"
    sys.exit(launch.run_commandline())
