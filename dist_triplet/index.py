"""``python -m dist_triplet.index`` (``dist-triplet-index``): :mod:`dist_triplet.retrieval.cli`."""
from .retrieval.cli import index_main as main

if __name__ == "__main__":
    raise SystemExit(main())
