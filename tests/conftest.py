"""Test collection: tests/gpu/ run only through scripts/gpu_check.sh (in their own process: they start a
process group), where LIFT_DS_GPU_TESTS=1; CI runs them on CPU through `scripts/gpu_check.sh --cpu-smoke`."""

import os

collect_ignore_glob = [] if os.environ.get("LIFT_DS_GPU_TESTS") == "1" else ["gpu/*"]
