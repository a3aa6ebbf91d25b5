"""``python -m dist_triplet.search`` (console script ``dist-triplet-search``): see
:mod:`dist_triplet.retrieval.cli`."""
import sys

from .retrieval.cli import search_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
