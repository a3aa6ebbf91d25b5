#!/usr/bin/env bash
# Single-device debug mode: no launcher, no Horovod import; GPU 0 if MXNet sees one, else CPU.
# Sets distributed.backend=local (the configs do not name a backend).
#   launch/debug.sh [train args...]      (--config defaults to configs/debug.yaml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
# configs/debug.yaml unless an argument is --config (as its own word, or --config=FILE).
has_config=0
for arg in "$@"; do
  case "$arg" in --config|--config=*) has_config=1 ;; esac
done
[ "$has_config" = 1 ] || set -- --config "$ROOT/configs/debug.yaml" "$@"
exec python -m dist_triplet.train "$@" distributed.backend=local
