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
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
DEVICES="$1"; shift
# DEVICES: all, GPU ids (0,1,2) or cpu:N (N >= 1); the trainer checks the devices exist.
[[ "$DEVICES" =~ ^(all|[0-9]+(,[0-9]+)*|cpu:0*[1-9][0-9]*)$ ]] || {
  echo "$usage (DEVICES must be all, GPU ids like 0,1 or cpu:N with N >= 1, got '$DEVICES')" >&2
  exit 2; }
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || { echo "$usage" >&2; exit 2; }
  shift
fi
refuse_override kvstore.sh distributed.backend kvstore "$@"
refuse_override kvstore.sh distributed.devices "$DEVICES" "$@"
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
exec python -m dist_triplet.train "$@" distributed.backend=kvstore "distributed.devices=$DEVICES"
