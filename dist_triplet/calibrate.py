"""``python -m dist_triplet.calibrate`` (console script ``dist-triplet-calibrate``): see
:mod:`dist_triplet.retrieval.cli`."""
import sys

from .retrieval.cli import calibrate_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
