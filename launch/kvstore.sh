#!/usr/bin/env bash
# kvstore 'device' data parallelism: one process drives several devices. Sets
# distributed.backend=kvstore (the configs do not name a backend: the launch script chooses it).
#   launch/kvstore.sh DEVICES [-- train args...]     DEVICES: all | 0,1,2,3 (GPU ids) | cpu:N
#   launch/kvstore.sh cpu:2 -- --config configs/fashion_mnist.yaml
# Same shape as launch/horovod.sh: what the script needs first, then --, then the trainer's
# arguments. train.batch_size is per device: global batch = devices x batch_size. One
# process, so MXNet's own thread defaults (all cores) apply; set OMP_NUM_THREADS to change them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
usage="usage: launch/kvstore.sh DEVICES [-- train args...]"
DEVICES="${1:?$usage}"; shift
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || { echo "$usage" >&2; exit 2; }
  shift
fi
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
exec python -m dist_triplet.train "$@" distributed.backend=kvstore "distributed.devices=$DEVICES"
