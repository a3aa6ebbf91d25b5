"""``python -m dist_triplet.index`` (console script ``dist-triplet-index``): see
:mod:`dist_triplet.retrieval.cli`."""
import sys

from .retrieval.cli import index_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
