#!/usr/bin/env bash
# kvstore 'device' data parallelism: one process drives several devices.
#   launch/kvstore.sh DEVICES [train args...]     DEVICES: all | 0,1,2,3 (GPU ids) | cpu:N
#   launch/kvstore.sh cpu:2 --config configs/fashion_mnist.yaml
# train.batch_size is per device: global batch = devices x batch_size. One process, so
# MXNet's own thread defaults (all cores) apply; set OMP_NUM_THREADS to change them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DEVICES="${1:?usage: launch/kvstore.sh DEVICES [train args]}"; shift
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
exec python -m dist_triplet.train distributed.backend=kvstore "distributed.devices=$DEVICES" "$@"
