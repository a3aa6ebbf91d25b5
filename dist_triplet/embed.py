"""``python -m dist_triplet.embed`` (console script ``dist-triplet-embed``): see
:mod:`dist_triplet.retrieval.cli`."""
import sys

from .retrieval.cli import embed_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
