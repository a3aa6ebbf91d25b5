"""``python -m dist_triplet.search`` (``dist-triplet-search``): :mod:`dist_triplet.retrieval.cli`."""
from .retrieval.cli import search_main as main

if __name__ == "__main__":
    raise SystemExit(main())
