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
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
NP="$1"; shift
# NP: a whole number >= 1 (0 would start nothing and exit 0).
[[ "$NP" =~ ^[0-9]+$ ]] && [ "$((10#$NP))" -ge 1 ] || {
  echo "$usage (NP must be an integer >= 1, got '$NP')" >&2; exit 2; }
NP=$((10#$NP))
HOSTS="localhost:$NP"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then HOSTS="$1"; shift; fi
# HOSTS: host:slots[,host:slots...], slots an integer >= 1 (horovodrun's -H); checked here,
# as horovodrun would only die with a traceback ("Invalid host input") after the pre-flight.
case "$HOSTS" in
  *=*) echo "$usage (HOSTS must be host:slots[,host:slots...], got '$HOSTS'; did you forget --?)" >&2
       exit 2 ;;
esac
IFS=, read -r -a _entries <<<"$HOSTS"
[[ "$HOSTS" != *, && "$HOSTS" != ,* && "$HOSTS" != *,,* && ${#_entries[@]} -ge 1 ]] || _bad=1
for _e in "${_entries[@]}"; do
  if [[ "$_e" =~ ^[A-Za-z0-9._-]+:([0-9]+)$ ]] && [ "$((10#${BASH_REMATCH[1]}))" -ge 1 ]; then :
  else _bad=1; fi
done
[ -z "${_bad:-}" ] || {
  echo "$usage (HOSTS must be host:slots[,host:slots...] with slots an integer >= 1, got '$HOSTS')" >&2
  exit 2; }
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || { echo "$usage" >&2; exit 2; }
  shift
fi
NHOSTS=$(( $(tr -cd , <<<"$HOSTS" | wc -c) + 1 ))
PER_HOST=$(( (NP + NHOSTS - 1) / NHOSTS ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(threads_per_proc "$PER_HOST")}"
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
# Pre-flight: config and data checked once, before any rank starts: bad input is one line, exit 2.
python -m dist_triplet.check --processes "$NP" "$@" distributed.backend=horovod || exit $?
exec horovodrun --gloo -np "$NP" -H "$HOSTS" \
  python -m dist_triplet.train "$@" distributed.backend=horovod
