#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs dist_triplet with its pins, builds Horovod
# from source (after MXNet, as its build must see MXNet), checks that Horovod has MXNet
# and Gloo, and installs Debian's Fashion-MNIST when it is missing and apt is usable.
# Safe to run again: each step checks first and skips what is already in place; when the
# venv's packages and setup.py are unchanged since the last full check (a stamp file in the
# venv), the check takes ~10 ms instead of ~8 s.
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

# Fast path: a stamp written after the last full check, keyed by every package installed in
# the venv (dist-info names carry the versions: mxnet, horovod, numpy, ...) and by setup.py's
# pins. While nothing changed, the Python checks below (~3 s of imports, and
# `horovodrun --check-build`, ~5 s) are skipped: the check costs a directory listing.
STAMP="$VENV/.dist_triplet_setup_ok"
venv_key() {
  { ls -d "$VENV"/lib/python*/site-packages/*.dist-info 2>/dev/null | sed 's|.*/||'
    cat "$ROOT/setup.py"; } | cksum
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(venv_key)" ]; then
  rm -f "$STAMP"
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
    log "building horovod 0.28.1 with MXNet + Gloo (3-7 minutes on 2 cores)"
    HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
    MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip install --quiet --no-build-isolation --no-cache-dir 'horovod==0.28.1'
  fi
  # What `horovodrun --check-build` reports, from Horovod's Python API in one import (0.8 s
  # against 5 s): horovod.mxnet imports only if its MXNet extension was built, and
  # gloo_built() reads the compiled-in controller.
  if ! "$PY" -c 'import sys, horovod.mxnet as h; sys.exit(0 if h.gloo_built() else 1)'; then
    "$VENV/bin/horovodrun" --check-build >&2 || true
    echo "[setup] error: Horovod in $VENV lacks MXNet or Gloo support (see above)" >&2
    exit 1
  fi
  venv_key > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
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
