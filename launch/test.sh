#!/usr/bin/env bash
# Set up what is missing, then run the test suite (CPU only; includes real 2-rank
# horovodrun --gloo jobs). Extra args go to pytest, e.g. launch/test.sh -k triplets
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
bash "$HERE/setup.sh" --test
source "$HERE/_env.sh"
cd "$ROOT"
exec python -m pytest -q "$@" tests
