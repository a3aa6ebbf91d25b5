#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs dist_triplet with its pins, builds Horovod
# from source (after MXNet, as its build must see MXNet), checks that Horovod has MXNet
# and Gloo, and installs Debian's Fashion-MNIST when it is missing and apt is usable.
# Safe to run again: each step checks first and skips what is already in place.
#   launch/setup.sh          what training needs
#   launch/setup.sh --test   also what the tests need from Debian (launch/test.sh passes it):
#                            openssh-server (two-host horovodrun tests over ssh to 127.0.0.2)
#                            and chromium (the report page is loaded in a real browser).
#                            Installed only as root with apt-get; without them those tests skip.
set -euo pipefail
WANT_TEST=0
[ "${1:-}" = "--test" ] && WANT_TEST=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIST_TRIPLET_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi

# Runtime pins (setup.py) and the test/bench tools (the [test] extra). `wheel` must be
# present before Horovod's --no-build-isolation build.
if ! "$PY" -c 'import mxnet, numpy, tensorboardX, yaml, PIL, tqdm, matplotlib, faiss, tensorboard, pytest, dist_triplet' >/dev/null 2>&1; then
  log "installing dist_triplet and its pinned dependencies"
  "$PY" -m pip install --quiet --upgrade pip wheel
  "$PY" -m pip install --quiet -e "$ROOT[test]"
fi

# Horovod 0.28.1: built from source against the MXNet now in the venv. Without
# --no-build-isolation pip builds in a clean environment that cannot see MXNet and fails.
if ! "$PY" -c 'import horovod.mxnet' >/dev/null 2>&1; then
  log "building horovod 0.28.1 with MXNet + Gloo (takes about 2 minutes)"
  HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
  MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip install --quiet --no-build-isolation --no-cache-dir 'horovod==0.28.1'
fi
build="$("$VENV/bin/horovodrun" --check-build)"
if ! grep -q '\[X\] MXNet' <<<"$build" || ! grep -q '\[X\] Gloo' <<<"$build"; then
  printf '%s\n' "$build" >&2
  echo "[setup] error: horovodrun --check-build does not list both MXNet and Gloo" >&2
  exit 1
fi

# Real data for the main job. Tests never need it: they write the small files they read.
if [ ! -d "$FMNIST_DIR" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian's dataset-fashion-mnist into $FMNIST_DIR"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || log "warning: could not install dataset-fashion-mnist; the main job will say how to get the data"
  else
    log "warning: $FMNIST_DIR is missing and apt-get is not usable here (needs root);" \
        "install Debian's dataset-fashion-mnist or point data.root at an MNIST-format directory"
  fi
fi
# Debian packages for the tests only; each test skips with the reason when its tool is absent.
if [ "$WANT_TEST" = 1 ]; then
  missing=()
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      log "installing ${missing[*]} for the tests"
      # sshd is not started here (the tests start their own on 127.0.0.2 and stop it);
      # policy-rc.d 101 keeps the package from starting the system's sshd on install.
      made_policy=0
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
      fi
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) \
        || log "warning: could not install ${missing[*]}; the tests that need them will skip"
      if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
      log "note: ${missing[*]} missing and apt-get is not usable (needs root); those tests will skip"
    fi
  fi
fi
log "ready: $VENV"
