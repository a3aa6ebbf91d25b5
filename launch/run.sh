#!/usr/bin/env bash
# The main job: set up what is missing, then train the seed recipe on Fashion-MNIST
# (configs/fashion_mnist.yaml: 4 workers x 256 triplets = global batch 1024, SGD lr 0.05).
# Extra args are config overrides, e.g. launch/run.sh train.epochs=2
#   launch/run.sh        ranks chosen from this host: one per GPU where MXNet sees GPUs,
#                        else one per CPU socket with its cores as threads (here: 1 process,
#                        no horovodrun); the per-worker batch keeps the recipe's global
#                        batch, 4 x train.batch_size (4: the design card's world size)
#   NP=N launch/run.sh   N Horovod ranks of train.batch_size each (NP=4: the design card's job)
# One [run.sh] line says what was chosen and why (with NP too).
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
CONFIG="$HERE/../configs/fashion_mnist.yaml"
# The main job is this recipe; another config is launch/horovod.sh's (a --config here would
# silently replace it, and its batch would be rescaled as if it were the recipe's).
for a in "$@"; do
  case "$a" in
    --config|--config=*)
      echo "launch/run.sh: the main job runs configs/fashion_mnist.yaml and takes overrides only; for $a use launch/horovod.sh NP -- --config FILE" >&2
      exit 2 ;;
    distributed.backend=*)   # run.sh appends its own choice, which would win silently
      echo "launch/run.sh: the main job's backend follows the host (its [run.sh] line says which); for $a use launch/kvstore.sh, launch/horovod.sh or launch/debug.sh" >&2
      exit 2 ;;
  esac
done
bash "$HERE/setup.sh"
source "$HERE/_env.sh"
RECIPE_WORKERS=4
# The recipe's per-worker batch and sampler, as training will resolve them (config file and
# overrides; no MXNet; bad input is training's own one line and exit 2).
RESOLVED=$(python -m dist_triplet.train --config "$CONFIG" "$@" --print-config)
section_key() { awk -v s="$1:" -v k="$2:" '$0 ~ /^[^ ]/ {in_s = ($1 == s)} in_s && $1 == k {print $2}' <<<"$RESOLVED"; }
B=$(section_key train batch_size)
KIND=$(section_key sampler kind)
PK="P x K batches per rank, not rescaled (global batch: ranks x sampler.p x sampler.k)"
if [ -n "${NP:-}" ]; then
  # NP given: N ranks of train.batch_size each, as given. horovod.sh checks NP itself (its
  # one usage line, exit 2), so the line below is for a valid NP only.
  if count "$NP"; then
    N=$((10#$NP))
    BATCH="global batch $((N * B)) = $N x $B (train.batch_size per rank, not rescaled)"
    [ "$KIND" = offline ] || BATCH="$PK"
    echo "[run.sh] $N Horovod rank(s) (NP=$NP given); $BATCH" >&2
  fi
  exec bash "$HERE/horovod.sh" "$NP" -- --config "$CONFIG" "$@"
fi
read -r RANKS WHY <<<"$(main_job_ranks "$(host_gpus)" "$(host_sockets)" "$(nproc)")"
if [ "$KIND" = offline ]; then
  GLOBAL=$((RECIPE_WORKERS * B)); PER=$((GLOBAL / RANKS > 0 ? GLOBAL / RANKS : 1))
  BATCH="global batch $((RANKS * PER)) = $RANKS x $PER (the recipe: $RECIPE_WORKERS workers x $B)"
  set -- "$@" "train.batch_size=$PER"
else
  BATCH="$PK"
fi
THREADS=${OMP_NUM_THREADS:-$(threads_per_proc "$RANKS")}
echo "[run.sh] $RANKS process(es) x $THREADS thread(s)${OMP_NUM_THREADS:+ (OMP_NUM_THREADS given)} ($WHY; NP=4 for the design card's 4 Horovod ranks); $BATCH" >&2
[ "$RANKS" -eq 1 ] || exec bash "$HERE/horovod.sh" "$RANKS" -- --config "$CONFIG" "$@"
# One process: no horovodrun (its start-up and Horovod's threads buy nothing here).
export OMP_NUM_THREADS="$THREADS" MXNET_CPU_WORKER_NTHREADS="${MXNET_CPU_WORKER_NTHREADS:-1}"
exec python -m dist_triplet.train --config "$CONFIG" "$@" distributed.backend=local
