#!/usr/bin/env bash
# Horovod data parallelism: one process per device. Sets distributed.backend=horovod (the
# configs do not name a backend: the launch script chooses it, see README "Modes").
#   launch/horovod.sh NP [HOSTS] [-- train args...]
#   launch/horovod.sh 4 -- --config configs/fashion_mnist.yaml
#   launch/horovod.sh 8 host1:4,host2:4 -- --config configs/fashion_mnist.yaml
# Gloo controller (no MPI needed). Each rank gets OMP_NUM_THREADS = cores / processes per
# host (cores of this host; horovodrun passes the variable to every rank), unless set.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
usage="usage: launch/horovod.sh NP [HOSTS] [-- train args...]"
NP="${1:?$usage}"; shift
HOSTS="localhost:$NP"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then HOSTS="$1"; shift; fi
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || { echo "$usage" >&2; exit 2; }
  shift
fi
NHOSTS=$(( $(tr -cd , <<<"$HOSTS" | wc -c) + 1 ))
PER_HOST=$(( (NP + NHOSTS - 1) / NHOSTS ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(threads_per_proc "$PER_HOST")}"
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
exec horovodrun --gloo -np "$NP" -H "$HOSTS" \
  python -m dist_triplet.train "$@" distributed.backend=horovod
