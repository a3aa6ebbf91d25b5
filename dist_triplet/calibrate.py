"""``python -m dist_triplet.calibrate`` (``dist-triplet-calibrate``): :mod:`dist_triplet.retrieval.cli`."""
from .retrieval.cli import calibrate_main as main

if __name__ == "__main__":
    raise SystemExit(main())
