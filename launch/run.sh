#!/usr/bin/env bash
# The main job: set up what is missing, then train on Fashion-MNIST with 4 Horovod ranks
# (Gloo, CPU here; one GPU per rank where MXNet sees GPUs). Extra args are config overrides,
# e.g. launch/run.sh train.epochs=2
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
bash "$HERE/setup.sh"
exec bash "$HERE/horovod.sh" "${NP:-4}" -- --config "$HERE/../configs/fashion_mnist.yaml" "$@"
