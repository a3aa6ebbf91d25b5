#!/usr/bin/env bash
# TensorBoard (scalars + embedding projector) for a run, served on 127.0.0.1 only.
#   launch/board.sh [RUN_DIR]     default: the newest run directory under ./runs
#   PORT=6007 launch/board.sh     another port (default 6006)
# Installs TensorBoard into the project's venv when it is missing: 2.21 installs beside
# numpy 1.23.5 without upgrading it (the `numpy<1.24` pin keeps it so; the [board] extra).
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
source "$HERE/_env.sh"
RUN="${1:-}"
if [ -z "$RUN" ]; then
  # Newest run by modification time (run names carry their config's name, not only a
  # time); a run is a directory with tensorboard/ (runs/ may hold a data cache too).
  RUN="$(ls -1dt runs/*/tensorboard/ 2>/dev/null | head -n 1 || true)"
  RUN="${RUN%tensorboard/}"
  if [ -z "$RUN" ]; then
    echo "error: no run directory under $(pwd)/runs; pass one: launch/board.sh RUN_DIR" >&2
    exit 2
  fi
fi
LOGDIR="${RUN%/}/tensorboard"
if [ ! -d "$LOGDIR" ]; then
  echo "error: $LOGDIR does not exist: $RUN is not a run directory (a run writes RUN/tensorboard)" >&2
  exit 2
fi
if ! python -c 'import tensorboard' >/dev/null 2>&1; then
  echo "[board] installing tensorboard 2.21 into $VENV"
  python -m pip install --quiet 'tensorboard==2.21.*' 'numpy<1.24'
fi
echo "[board] serving $LOGDIR on http://127.0.0.1:${PORT:-6006}/#projector"
exec python -m tensorboard.main --logdir "$LOGDIR" --host 127.0.0.1 --port "${PORT:-6006}"
