# Sourced by the launch scripts: the project's virtualenv and per-process thread counts.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIST_TRIPLET_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
# threads_per_proc N: cores of this host divided among N processes (at least 1), so CPU
# ranks do not oversubscribe the cores. Users can still set OMP_NUM_THREADS themselves.
threads_per_proc() { local n=$(( $(nproc) / $1 )); echo $(( n > 0 ? n : 1 )); }
# count N: N is a whole number from 1 to 999999 (ranks, slots; more digits overflow bash).
count() { [[ "$1" =~ ^[0-9]{1,6}$ ]] && [ "$((10#$1))" -ge 1 ]; }
# refuse_override SCRIPT KEY VALUE ARGS...: the script appends KEY=VALUE after ARGS, so a
# KEY=other among ARGS would be overridden without a word: one line, exit 2 instead.
# Spaces and quotes are dropped first, as the config parser drops them ("key = 'v'" is key=v);
# a key set in a --config file is overridden all the same (docs/training.md, "Modes").
refuse_override() {
  local script=$1 key=$2 value=$3 a n; shift 3
  for a in "$@"; do
    n=$(printf '%s' "$a" | tr -d " \t'\"")
    case "$n" in "$key="*) [ "$n" = "$key=$value" ] || {
      echo "launch/$script: $a, but launch/$script sets $key=$value (for another, use the launch script that sets it)" >&2
      exit 2; } ;; esac
  done
}
# host_gpus: GPUs MXNet sees here. Without an NVIDIA device node there are none, and the
# answer costs nothing; with one, MXNet is asked (mx.context.num_gpus(), a 2 s import).
host_gpus() {
  compgen -G '/dev/nvidia[0-9]*' >/dev/null || { echo 0; return; }
  python -c 'import mxnet; print(mxnet.context.num_gpus())'
}
# host_sockets: CPU sockets here (lscpu's "Socket(s)"), 1 when lscpu cannot tell.
host_sockets() {
  local s
  s=$(lscpu 2>/dev/null | sed -n 's/^Socket(s):[[:space:]]*\([0-9][0-9]*\)[[:space:]]*$/\1/p' | head -n 1)
  [ "${s:-0}" -ge 1 ] 2>/dev/null && echo "$s" || echo 1
}
# main_job_ranks GPUS SOCKETS CORES: the main job's processes on this host and why (one line:
# "RANKS REASON..."). One rank per GPU where MXNet sees GPUs (the design card: 4 GPUs, 4
# ranks); on a CPU host one rank per socket, its cores as threads (Horovod's advice for
# CPUs: more ranks than sockets only add allreduce and its threads on the same cores).
main_job_ranks() {
  if [ "$1" -gt 0 ]; then echo "$1 $1 GPU(s): one rank per GPU"
  else echo "$2 CPU host, $2 socket(s), $3 core(s): one rank per socket, its cores as threads"
  fi
}
