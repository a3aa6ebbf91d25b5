#!/usr/bin/env bash
# Horovod data parallelism: one process per device. Sets distributed.backend=horovod (the
# configs do not name a backend: the launch script chooses it, see README "Modes").
#   launch/horovod.sh NP [HOSTS] [-- train args...]
#   launch/horovod.sh 4 -- --config configs/fashion_mnist.yaml
#   launch/horovod.sh 8 host1:4,host2:4 -- --config configs/fashion_mnist.yaml
# Gloo controller (no MPI needed). Each rank gets OMP_NUM_THREADS = cores / processes per
# host (cores of this host; horovodrun passes the variable to every rank), unless set;
# the choice is printed as one [horovod.sh] line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
usage="usage: launch/horovod.sh NP [HOSTS] [-- train args...]"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
NP="$1"; shift
# NP: a count (_env.sh; 0 would start nothing and exit 0).
count "$NP" || {
  echo "$usage (NP must be an integer from 1 to 999999, got '$NP')" >&2; exit 2; }
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
_slots=0
for _e in "${_entries[@]}"; do
  if [[ "$_e" =~ ^[A-Za-z0-9._-]+:([0-9]+)$ ]] && _n=${BASH_REMATCH[1]} && count "$_n"; then
    _slots=$(( _slots + 10#$_n ))
  else _bad=1; fi
done
[ -z "${_bad:-}" ] || {
  echo "$usage (HOSTS must be host:slots[,host:slots...] with slots an integer >= 1, got '$HOSTS')" >&2
  exit 2; }
[ "$_slots" -ge "$NP" ] || {     # horovodrun: "Requested more processes ..." and a traceback
  echo "$usage (HOSTS '$HOSTS' hold $_slots slot(s), fewer than NP=$NP ranks)" >&2; exit 2; }
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || { echo "$usage" >&2; exit 2; }
  shift
fi
refuse_override horovod.sh distributed.backend horovod "$@"
NHOSTS=$(( $(tr -cd , <<<"$HOSTS" | wc -c) + 1 ))
PER_HOST=$(( (NP + NHOSTS - 1) / NHOSTS ))
CORES=$(nproc)
# Threads per rank: this host's cores divided among its ranks, at least 1 (MXNet's own
# default, half the cores in every rank, would oversubscribe them).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(threads_per_proc "$PER_HOST")}"
# One MXNet engine worker per rank runs the operators (MXNet's default, stated here: the
# operators' own threads are OMP_NUM_THREADS).
export MXNET_CPU_WORKER_NTHREADS="${MXNET_CPU_WORKER_NTHREADS:-1}"
# Horovod's background thread coordinates the ranks once per cycle even when idle (7-8% of
# a core per rank at its default 1 ms, 3% at 5 ms, measured idle), and an allreduce waits
# about a cycle. With more ranks than cores the cores are the bottleneck: poll every 2 ms
# (the 4-rank main job used 14% less CPU than at 1 ms, docs/benchmark.md).
CHOSE="Horovod cycle ${HOROVOD_CYCLE_TIME:-1} ms"
if [ "$PER_HOST" -gt "$CORES" ]; then
  export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-2}"
  CHOSE="more ranks than cores, so they take turns on the cores and Horovod polls every $HOROVOD_CYCLE_TIME ms"
fi
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
# Pre-flight: config and data checked once, before any rank starts: bad input is one line, exit 2.
python -m dist_triplet.check --processes "$NP" "$@" distributed.backend=horovod || exit $?
# What was chosen, once the pre-flight has passed (bad input stays one line).
echo "[horovod.sh] $NP rank(s), $PER_HOST per host on $CORES core(s) here: $OMP_NUM_THREADS thread(s) per rank (cores / ranks per host, at least 1); $CHOSE" >&2
# horovodrun itself, without its per-start import of every framework to ask what
# launch/setup.sh has checked already (launch/_horovodrun.py says why).
exec python "$ROOT/launch/_horovodrun.py" --gloo -np "$NP" -H "$HOSTS" \
  python -m dist_triplet.train "$@" distributed.backend=horovod
