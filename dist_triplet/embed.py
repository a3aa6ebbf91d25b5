"""``python -m dist_triplet.embed`` (``dist-triplet-embed``): :mod:`dist_triplet.retrieval.cli`."""
from .retrieval.cli import embed_main as main

if __name__ == "__main__":
    raise SystemExit(main())
