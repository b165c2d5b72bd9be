#!/usr/bin/env bash
# The README's test command: set up the environment if needed, then run the whole suite
# (fast unit tests and the slow 2-rank CPU tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
# ops that compile on first use (cpu_adam for offload) are cached here for the run
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=40 "$@"
