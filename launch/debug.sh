#!/usr/bin/env bash
# Single-device debug mode: no launcher, no Horovod import; GPU 0 if MXNet sees one, else CPU.
#   launch/debug.sh [train args...]      (defaults to configs/debug.yaml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
[ $# -eq 0 ] && set -- --config configs/debug.yaml
exec python -m dist_triplet.train distributed.backend=local "$@"
