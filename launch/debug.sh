#!/usr/bin/env bash
# Single-device debug mode: no launcher, no Horovod import; GPU 0 if MXNet sees one, else CPU.
#   launch/debug.sh [train args...]      (defaults to configs/debug.yaml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# No cd: relative --config, data.root and output.dir mean what they say from the caller's directory.
# configs/debug.yaml unless the arguments name another --config.
case " $* " in *" --config"*) ;; *) set -- --config "$ROOT/configs/debug.yaml" "$@" ;; esac
exec python -m dist_triplet.train distributed.backend=local "$@"
