# Sourced by the launch scripts: the project's virtualenv and per-process thread counts.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIST_TRIPLET_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
# threads_per_proc N: cores of this host divided among N processes (at least 1), so CPU
# ranks do not oversubscribe the cores. Users can still set OMP_NUM_THREADS themselves.
threads_per_proc() { local n=$(( $(nproc) / $1 )); echo $(( n > 0 ? n : 1 )); }
